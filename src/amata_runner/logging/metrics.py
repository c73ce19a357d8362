"""metrics.jsonl: one JSON row per evaluation point, flushed and fsynced as it is written.

Rows are appended, so a crash loses at most the row being written; on resume, rows newer than the
checkpoint are dropped (they will be produced again), so the file never holds duplicates. A line
that is not a JSON row (a torn write, a disk fault, an editor) never costs the rows around it: on
resume it is moved, with a warning, to ``metrics.jsonl.bad`` and every valid row is kept.
A metrics.csv copy with a fixed column order is rewritten from the rows at each checkpoint, for
spreadsheets; the JSONL file is the source of truth.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from pathlib import Path
from typing import Any, Protocol

from amata_runner.runtime.run_dir import replace_file, storage_error

log = logging.getLogger(__name__)


class MetricsSink(Protocol):
    """Somewhere metrics rows and the final summary go (besides metrics.jsonl)."""

    run_id: str | None

    def log(self, row: dict[str, Any]) -> None: ...

    def summary(self, summary: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The valid rows of a metrics file (unreadable lines are left out)."""
    return read_rows_and_rejects(path)[0]


def read_rows_and_rejects(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The valid rows of a metrics file, and the lines that are not rows."""
    rows: list[dict[str, Any]] = []
    rejects: list[str] = []
    if not path.exists():
        return rows, rejects
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            text = line.strip()
            if not text:
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError:
                row = None
            if isinstance(row, dict):
                rows.append(row)
            else:
                rejects.append(text)
    return rows, rejects


def write_json_atomic(path: Path, payload: Any) -> None:
    """Replace ``path`` whole; a failed write (full disk) is a StorageError, the old file kept."""
    try:
        replace_file(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")
    except OSError as exc:
        raise storage_error(path, exc) from exc


class MetricsFile:
    """Append-only metrics.jsonl with truncation to a checkpoint on resume."""

    def __init__(
        self, run_dir: Path, *, keep_until_iteration: int | None = None, write: bool = True
    ) -> None:
        """``write=False`` (torchrun ranks other than 0) keeps the rows in memory only."""
        self.path = run_dir / "metrics.jsonl"
        self.csv_path = run_dir / "metrics.csv"
        self.write = write
        rows, rejects = read_rows_and_rejects(self.path)
        if keep_until_iteration is None:
            rows = []
        else:
            if rejects and write:
                self._set_aside(rejects)
            rows = [r for r in rows if r.get("iteration", 0) <= keep_until_iteration]
        self.rows = rows
        self._handle: Any = None
        if write:
            self._rewrite()
            self._handle = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (kept open)

    def _set_aside(self, rejects: list[str]) -> None:
        bad = self.path.with_name(self.path.name + ".bad")
        try:
            with open(bad, "a", encoding="utf-8") as handle:
                handle.writelines(line + "\n" for line in rejects)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:
            raise storage_error(bad, exc, f"{self.path} was not changed") from exc
        log.warning(
            "%d line(s) of %s are not metrics rows (a torn or damaged write); they were moved to "
            "%s and every valid row was kept",
            len(rejects),
            self.path,
            bad,
        )

    def _rewrite(self) -> None:
        try:
            replace_file(self.path, "".join(json.dumps(row) + "\n" for row in self.rows))
        except OSError as exc:
            raise storage_error(self.path, exc, "its previous rows were kept") from exc

    def log(self, row: dict[str, Any]) -> None:
        """Append one row as a single write; a failed write (full disk) is a StorageError."""
        line = json.dumps(row) + "\n"
        if not self.write:
            self.rows.append(row)
            return
        try:
            self._handle.write(line)
            self._handle.flush()
            os.fsync(self._handle.fileno())
        except OSError as exc:
            kept = "the rows before it and the last checkpoint are intact"
            raise storage_error(self.path, exc, kept) from exc
        self.rows.append(row)

    def write_csv(self) -> None:
        if not self.rows or not self.write:
            return
        columns: list[str] = []
        for row in self.rows:
            columns.extend(k for k in row if k not in columns)
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=columns)
        writer.writeheader()
        writer.writerows(self.rows)
        try:
            replace_file(self.csv_path, text.getvalue())
        except OSError as exc:
            raise storage_error(self.csv_path, exc) from exc

    def close(self) -> None:
        if self._handle is not None and not self._handle.closed:
            self._handle.close()
