"""metrics.jsonl: one JSON row per evaluation point, flushed and fsynced as it is written.

Rows are appended, so a crash loses at most the row being written; on resume, rows newer than the
checkpoint are dropped (they will be produced again), so the file never holds duplicates.
A metrics.csv copy with a fixed column order is rewritten from the rows at each checkpoint, for
spreadsheets; the JSONL file is the source of truth.
"""

from __future__ import annotations

import csv
import errno
import json
import os
from pathlib import Path
from typing import Any, Protocol

from amata_runner.errors import StorageError


class MetricsSink(Protocol):
    """Somewhere metrics rows and the final summary go (besides metrics.jsonl)."""

    run_id: str | None

    def log(self, row: dict[str, Any]) -> None: ...

    def summary(self, summary: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The complete rows of a metrics file (a torn last line from a crash is ignored)."""
    rows: list[dict[str, Any]] = []
    if not path.exists():
        return rows
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows


def write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, sort_keys=False)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class MetricsFile:
    """Append-only metrics.jsonl with truncation to a checkpoint on resume."""

    def __init__(
        self, run_dir: Path, *, keep_until_iteration: int | None = None, write: bool = True
    ) -> None:
        """``write=False`` (torchrun ranks other than 0) keeps the rows in memory only."""
        self.path = run_dir / "metrics.jsonl"
        self.csv_path = run_dir / "metrics.csv"
        self.write = write
        rows = read_rows(self.path)
        if keep_until_iteration is None:
            rows = []
        else:
            rows = [r for r in rows if r.get("iteration", 0) <= keep_until_iteration]
        self.rows = rows
        self._handle: Any = None
        if write:
            self._rewrite()
            self._handle = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (kept open)

    def _rewrite(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w", encoding="utf-8") as handle:
            for row in self.rows:
                handle.write(json.dumps(row) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)

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
            reason = "the disk is full" if exc.errno == errno.ENOSPC else exc.strerror or str(exc)
            raise StorageError(
                exc.errno or 0,
                f"could not append to {self.path}: {reason}; the rows before it and the last "
                "checkpoint are intact (resume=true once there is space)",
            ) from exc
        self.rows.append(row)

    def write_csv(self) -> None:
        if not self.rows or not self.write:
            return
        columns: list[str] = []
        for row in self.rows:
            columns.extend(k for k in row if k not in columns)
        tmp = self.csv_path.with_name(f".{self.csv_path.name}.tmp")
        with open(tmp, "w", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(tmp, self.csv_path)

    def close(self) -> None:
        if self._handle is not None and not self._handle.closed:
            self._handle.close()
