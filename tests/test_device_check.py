"""scripts/device_check.sh: its CPU rehearsal runs every stage and writes one JSON summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "device_check.sh"


def _run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def test_script_parses_and_refuses_an_unknown_argument_in_one_line() -> None:
    assert subprocess.run(["bash", "-n", str(SCRIPT)], check=False).returncode == 0
    refused = _run("--gpu")
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        "device_check.sh: unknown argument '--gpu' (use --cpu, --out FILE)"
    ]
    usage = _run("--help")
    assert usage.returncode == 0 and "--cpu" in usage.stdout


@pytest.mark.slow
def test_cpu_rehearsal_runs_every_stage_and_writes_the_summary(tmp_path: Path) -> None:
    out = tmp_path / "summary.json"
    done = _run("--cpu", "--out", str(out), timeout=1900)
    summary = json.loads(out.read_text())
    assert done.returncode == 0, summary["stages"]
    assert summary["all_ok"] and summary["mode"] == "cpu"
    assert list(summary["stages"]) == [
        "install", "pytest", "bench_eager_8_fp32", "bench_eager_8_bf16", "train_amata",
        "train_pgd", "bench_compiled_8_fp32", "bench_compiled_8_bf16",
    ]  # fmt: skip
    rows = [(row["precision"], "compile_speedup" in row) for row in summary["bench"]]
    assert sorted(rows) == [("bf16", False), ("bf16", True), ("fp32", False), ("fp32", True)]
    assert summary["train"]["amata_over_pgd_train_seconds"] > 0
