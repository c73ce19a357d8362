"""``amata-report DIR [DIR...] [out=DIR] [smoothing=W] [targets=[E,...]] [baseline=ROW] ...``.

Each DIR is a run directory, a sweep directory (numbered job directories) or a tree of sweeps. The
report (report.md, report.csv, error_vs_seconds.png, error_vs_passes.png) goes to ``out``, by
default the one DIR given. ``smoothing`` overrides the experiment's TensorBoard smoothing weight
(the paper's 0.6 on CIFAR10, 0.09 on MNIST); ``targets`` adds robust-error levels to the
time-to-target columns, found on the runs' metrics rows after the fact; ``baseline`` names the row
the ratio columns divide by (instead of the experiment's own baseline).
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path

from amata_runner.cli.options import parse_options, run_tool
from amata_runner.errors import ConfigError

USAGE = (
    "usage: amata-report DIR [DIR...] [out=DIR] [smoothing=W] [targets=[E,...]] [baseline=ROW]\n"
    "                    [plots=false]\n"
    "  DIR        a run directory, a sweep directory or a tree of them\n"
    "  out        where report.md, report.csv and the PNG plots go (default: the one DIR)\n"
    "  smoothing  TensorBoard smoothing weight in [0, 1) (default: the experiment's, else 0.6 on\n"
    "             CIFAR10 and 0.09 on MNIST-like data as in the paper)\n"
    "  targets    extra robust-error levels for the time-to-target columns, e.g. targets=[0.6]\n"
    "  baseline   the row (its name in the table) every ratio column divides by (default: each\n"
    "             experiment's own baseline row; none for plain sweeps)\n"
    "  plots      false skips the PNG plots"
)


@dataclass
class ReportOptions:
    dirs: list[str] = field(default_factory=list)
    out: str | None = None
    smoothing: float | None = None
    targets: list[float] = field(default_factory=list)
    plots: bool = True
    baseline: str | None = None


def _body(argv: list[str]) -> int:
    from amata_runner.report import write_report

    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    positional = [a for a in argv if "=" not in a]
    options = parse_options(ReportOptions, [a for a in argv if "=" in a])
    dirs = [Path(d) for d in [*positional, *options.dirs]]
    if not dirs:
        raise ConfigError("dirs", [], "give at least one run or sweep directory (--help for usage)")
    for d in dirs:
        if not d.is_dir():
            raise ConfigError("dirs", str(d), "no such directory")
    if options.out is None and len(dirs) > 1:
        raise ConfigError("out", None, "required with several directories: out=DIR")
    smoothing = options.smoothing
    if smoothing is not None and not 0 <= smoothing < 1:
        raise ConfigError("smoothing", smoothing, "must be in [0, 1)")
    targets = list(options.targets)
    if not all(0 <= t <= 1 for t in targets):
        raise ConfigError("targets", targets, "errors must be in [0, 1]")
    out = Path(options.out) if options.out is not None else dirs[0]
    if options.plots and importlib.util.find_spec("matplotlib") is None:
        print(
            "amata-report: matplotlib is not installed, so no plots: pip install "
            "'amata-runner[report]'",
            file=sys.stderr,
        )
    try:
        report = write_report(
            dirs,
            out,
            smoothing=smoothing,
            plots=options.plots,
            targets=targets,
            baseline=options.baseline,
        )
    except FileNotFoundError as exc:
        raise ConfigError("dirs", " ".join(map(str, dirs)), str(exc)) from exc
    configs = sum(len(s.configs) for s in report.sections)
    runs = "1 run" if report.runs == 1 else f"{report.runs} runs"
    configurations = "1 configuration" if configs == 1 else f"{configs} configurations"
    print(f"amata-report: {runs} in {configurations}")
    for path in [report.markdown, report.csv, *report.plots]:
        print(f"  {path}")
    return 0


def main(argv: list[str] | None = None) -> None:
    sys.exit(run_tool("amata-report", _body, argv))


if __name__ == "__main__":
    main()
