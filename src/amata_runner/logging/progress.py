"""What a run says in plain text: one line per evaluation point, the final evaluation, the end.

Every line goes to ``train.log`` in the run directory (so it is never empty after a run), and to
stdout when no progress bar is on the terminal or when stdout is not one (``nohup``, SLURM, a pipe,
``> out``), so a batch job's output holds its progress and results. A failed write of these lines
(a full disk, a closed pipe) is never what stops a run: metrics.jsonl is the record.
"""

from __future__ import annotations

import contextlib
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

LOG_NAME = "train.log"
# Metrics-row keys that are a method's strength knobs (methods' ``knobs()``), in display order.
KNOB_KEYS = ("K", "m", "n", "alpha", "sigma", "tau", "c", "reset", "weak_start")


def _stamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def write_line(run_dir: Path | None, text: str, *, stdout: TextIO | None) -> None:
    """Append ``text`` (timestamped) to ``run_dir/train.log`` and print it to ``stdout``."""
    line = f"[{_stamp()}] {text}"
    if run_dir is not None:
        with contextlib.suppress(OSError), open(run_dir / LOG_NAME, "a", encoding="utf-8") as log:
            log.write(line + "\n")
    if stdout is not None:
        with contextlib.suppress(OSError, ValueError):  # a closed pipe never stops a run
            print(line, file=stdout, flush=True)


def say(text: str, stream: TextIO | None = None) -> None:
    """One untimestamped line to stdout (the run dir, the closing line), flushed at once."""
    with contextlib.suppress(OSError, ValueError):
        print(text, file=stream or sys.stdout, flush=True)


def plain_lines_wanted(bar_shown: bool) -> bool:
    """Lines on stdout when no bar is on the terminal or stdout is not the terminal."""
    try:
        stdout_tty = sys.stdout.isatty()
    except (AttributeError, ValueError):
        stdout_tty = False
    return not bar_shown or not stdout_tty


def seconds(value: float) -> str:
    if value < 60:
        return f"{value:.1f}s"
    if value < 3600:
        return f"{int(value // 60)}m{int(value % 60):02d}s"
    return f"{int(value // 3600)}h{int(value % 3600 // 60):02d}m"


def count(value: float) -> str:
    """1234 -> 1.2k, 2_500_000 -> 2.5M: passes are counted in the hundreds of thousands."""
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            return f"{value / limit:.3g}{suffix}"
    return f"{value:g}"


def _knob(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _error(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3f}"


class RunLog:
    """The plain-text account of one run (rank 0 only; other ranks pass ``write=False``)."""

    def __init__(
        self,
        run_dir: Path,
        *,
        epochs: int,
        iterations: int,
        done: int,
        bar_shown: bool,
        write: bool = True,
    ) -> None:
        self.run_dir = run_dir if write else None
        self.stdout: TextIO | None = sys.stdout if write and plain_lines_wanted(bar_shown) else None
        self.epochs = epochs
        self.iterations = iterations
        self._start_iteration = done
        self._started = time.monotonic()

    def line(self, text: str) -> None:
        if self.run_dir is not None:
            write_line(self.run_dir, text, stdout=self.stdout)

    def _eta(self, iteration: int) -> str:
        done = iteration - self._start_iteration
        left = self.iterations - iteration
        if done <= 0 or left <= 0:
            return ""
        per = (time.monotonic() - self._started) / done
        return f"  eta {seconds(per * left)}"

    def row(self, row: dict[str, Any]) -> None:
        """One evaluation point: epoch, knobs, train seconds, passes, errors, ETA of training."""
        epoch = f"{float(row.get('epoch', 0)):g}"  # 1.0 -> 1; 0.5 with eval.unit=iteration
        knobs = " ".join(f"{k}={_knob(row[k])}" for k in KNOB_KEYS if row.get(k) is not None)
        passes = row.get("forward_passes", 0) + row.get("backward_passes", 0)
        attack = row.get("eval_attack") or "attack"
        parts = [
            f"epoch {epoch}/{self.epochs}",
            knobs,
            f"train {seconds(row.get('train_seconds', 0.0))}",
            f"passes {count(passes)}",
            f"clean err {_error(row.get('clean_error'))}",
            f"robust err {_error(row.get('robust_error'))} ({attack}, "
            f"{row.get('eval_examples', '?')} imgs)",
        ]
        self.line("  ".join(p for p in parts if p) + self._eta(int(row.get("iteration", 0))))

    def evaluating(self, attacks: Sequence[str], examples: int) -> None:
        names = ", ".join(attacks)
        self.line(f"evaluating {names} on {examples} test images ...")


def closing_line(status: str, summary: dict[str, Any] | None, run_dir: Path) -> str:
    """``completed: clean 89.1%, pgd20 41.2% (359 test images); train 6.2s; passes 290k; ...``"""
    parts = [status]
    if summary:
        final = summary.get("final")
        if final:
            accs = [f"clean {100 * final['clean_accuracy']:.2f}%"]
            accs += [f"{n} {100 * a:.2f}%" for n, a in final["robust_accuracy"].items()]
            parts.append(f"{', '.join(accs)} ({final['examples']} test images)")
        else:
            best = summary.get("best") or {}
            accuracy = best.get("robust_accuracy")
            parts.append(
                "no final evaluation (eval.final=false)"
                if not isinstance(accuracy, int | float)
                else f"best robust acc {100 * accuracy:.2f}% ({best.get('eval_attack', '?')}, "
                "evaluation subset; no final evaluation: eval.final=false)"
            )
        passes = summary.get("forward_passes", 0) + summary.get("backward_passes", 0)
        parts.append(f"train {seconds(summary.get('train_seconds', 0.0))}")
        parts.append(f"passes {count(passes)}")
        parts.append(f"epochs {summary.get('epochs', '?')}")
    summary_path = run_dir / "summary.json"
    parts.append(f"summary: {summary_path}" if summary else f"run dir: {run_dir}")
    return f"{parts[0]}: " + "; ".join(parts[1:])


def resume_command(
    run_dir: Path,
    task_overrides: Sequence[str],
    hydra_overrides: Sequence[str] = (),
    *,
    prog: str = "amata-run",
) -> str:
    """The exact command that continues ``run_dir``: its overrides, its directory, resume=true."""
    keep = [o for o in task_overrides if o.partition("=")[0].lstrip("+~") != "resume"]
    dropped = ("hydra.mode", "hydra.run.dir", "hydra.sweep.dir", "hydra.job.")
    keep += [o for o in hydra_overrides if not o.startswith(dropped)]
    args = [*keep, f"hydra.run.dir={run_dir.resolve()}", "resume=true"]
    return " ".join([prog, *(shlex.quote(a) for a in args)])


def sweep_resume_command(argv: Sequence[str], sweep_dir: Path, *, prog: str = "amata-run") -> str:
    """The command that continues a whole grid: the same line, its sweep dir, resume=auto."""
    drop = ("resume", "hydra.sweep.dir")
    keep = [
        a
        for a in argv
        if a not in ("-m", "--multirun") and a.partition("=")[0].lstrip("+~") not in drop
    ]
    args = ["-m", *keep, f"hydra.sweep.dir={sweep_dir.resolve()}", "resume=auto"]
    return " ".join([prog, *(shlex.quote(a) for a in args)])


def continue_command(hydra_cfg: Any, run_dir: Path, *, multirun: bool, world: int = 1) -> str:
    """The command that continues this job (a single run) or its whole grid (``-m``).

    A grid job in a process that is not the ``amata-run -m`` line itself (a launcher's worker)
    gets the command that continues this one job in its own directory."""
    prog = "amata-run"
    if world > 1:
        prog = f"torchrun --nproc_per_node={world} -m amata_runner.cli.train"
    argv = sys.argv[1:]
    if multirun and ("-m" in argv or "--multirun" in argv):
        return sweep_resume_command(argv, Path(str(hydra_cfg.sweep.dir)), prog=prog)
    task = [str(o) for o in hydra_cfg.overrides.task]
    extra = [str(o) for o in hydra_cfg.overrides.hydra]
    return resume_command(run_dir, task, extra, prog=prog)


def finish(run_dir: Path, status: str, summary: dict[str, Any] | None) -> None:
    """The closing line, to stdout and train.log (rank 0 only)."""
    write_line(run_dir, closing_line(status, summary, run_dir), stdout=sys.stdout)


def ended(run_dir: Path, message: str) -> None:
    """How a run that did not complete ended, in train.log (stderr already has the line)."""
    write_line(run_dir, message, stdout=None)
