"""amata-run as users call it: the installed console script, in a fresh working directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import FAST, amata_run

REPO = Path(__file__).resolve().parents[1]


def only_dir(parent: Path) -> Path:
    found = [p for p in parent.rglob("summary.json")]
    assert len(found) == 1, found
    return found[0].parent


def test_default_run_on_digits_leaves_a_complete_run_dir(tmp_path: Path) -> None:
    result = amata_run(FAST, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run_dir = only_dir(tmp_path / "outputs" / "runs")
    for name in (
        "metrics.jsonl",
        "metrics.csv",
        "summary.json",
        "last.ckpt",
        "best.ckpt",
        "config_resolved.yaml",
        ".hydra/config.yaml",
        ".hydra/overrides.yaml",
    ):
        assert (run_dir / name).is_file(), name
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"
    resolved = yaml.safe_load((run_dir / "config_resolved.yaml").read_text())
    assert (resolved["method"]["name"], resolved["schedule"]["name"]) == ("amata", "linear")
    assert resolved["method"]["eps"] == 0.2  # plain numbers, no interpolations
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["method"] == "amata" and summary["epochs"] == 2
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2


def test_multirun_gives_each_job_its_own_dir(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    result = amata_run(
        ["-m", "method=pgd,amata", *FAST, "epochs=1", f"hydra.sweep.dir={sweep}"], cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert (sweep / "multirun.yaml").is_file()
    methods = {json.loads((sweep / str(n) / "summary.json").read_text())["method"] for n in (0, 1)}
    assert methods == {"pgd", "amata"}


def test_a_failing_job_does_not_stop_the_grid(tmp_path: Path) -> None:
    broken = tmp_path / "broken" / "cifar-10-batches-py"
    broken.mkdir(parents=True)
    for name in ("data_batch_1", "test_batch"):
        (broken / name).write_bytes(b"this is not a pickle")
    sweep = tmp_path / "sweep"
    result = amata_run(
        [
            "-m",
            "dataset=cifar10,digits",
            f"dataset.root={broken.parent}",
            "model=lenet",
            *FAST,
            "epochs=1",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
    )
    assert result.returncode != 0  # the grid reports the failure ...
    failed = json.loads((sweep / "0" / "status.json").read_text())
    assert failed["status"] == "failed" and "cifar" in failed["error"].lower()
    done = json.loads((sweep / "1" / "status.json").read_text())
    assert done["status"] == "completed"  # ... and the other job still ran to the end
    assert (sweep / "1" / "summary.json").is_file()


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("schedule.k_min=50", "schedule.k_min=50: must be <= 10 (method.steps)"),
        (
            "schedule.k_max=20",
            "unknown key; the schedule anneals from schedule.k_min up to the method",
        ),
        ("method.eps=0", "method.eps=0.0: must be a finite number > 0"),
        ("schedule.tau=-0.1", "schedule.tau=-0.1: must be a finite number > 0"),
        ("method=fgsm", "method='fgsm': allowed: amata, amata_atta, amata_fast, amata_free"),
        ("dataset=mnist", "set dataset.download=true"),
    ],
)
def test_bad_override_is_one_line_and_writes_nothing(
    tmp_path: Path, override: str, needle: str
) -> None:
    result = amata_run([override], cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "outputs").exists()


def test_inspection_commands_work_from_any_directory(tmp_path: Path) -> None:
    cfg = amata_run(["--cfg", "job"], cwd=tmp_path)
    assert cfg.returncode == 0 and "method:" in cfg.stdout
    resolved = amata_run(["--cfg", "job", "--resolve", "method.eps=8/255"], cwd=tmp_path)
    assert "eps: 8/255" in resolved.stdout
    info = amata_run(["--info", "defaults"], cwd=tmp_path)
    assert info.returncode == 0 and "method/amata" in info.stdout
    helptext = amata_run(["--help"], cwd=tmp_path)
    assert helptext.returncode == 0 and "amata-run" in helptext.stdout
    for group in ("dataset", "model", "method", "schedule", "optim", "logger", "experiment"):
        assert f"{group}:" in helptext.stdout
    assert not (tmp_path / "outputs").exists()


def test_built_wheel_carries_its_configs(tmp_path: Path) -> None:
    """A wheel (not the editable checkout) composes configs from inside the installed package."""
    dist, site = tmp_path / "dist", tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(REPO)],
        capture_output=True,
        text=True,
    )
    if build.returncode != 0 and "hatchling" in build.stderr.lower():
        pytest.skip(f"cannot build a wheel here: {build.stderr.strip()[-200:]}")
    assert build.returncode == 0, build.stderr
    wheel = next(dist.glob("amata_runner-*.whl"))
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(site),
            str(wheel),
        ],
        capture_output=True,
        text=True,
    )
    assert install.returncode == 0, install.stderr
    assert (site / "amata_runner" / "conf" / "config.yaml").is_file()
    env = {**os.environ, "PYTHONPATH": str(site)}
    code = "import sys; from amata_runner.cli.train import main; main()"
    shown = subprocess.run(
        [sys.executable, "-c", code, "--info", "searchpath"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
    )
    assert shown.returncode == 0, shown.stderr
    assert str(site / "amata_runner" / "conf") in shown.stdout
    job = subprocess.run(
        [sys.executable, "-c", code, "--cfg", "job", "method=pgd"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
    )
    assert job.returncode == 0 and "name: pgd" in job.stdout


def test_ci_runs_the_readme_commands() -> None:
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    block = readme.split("## Set up", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    install, test = (line.split("#")[0].strip() for line in block.strip().splitlines())
    assert install == 'pip install -e ".[dev]"' and test == "pytest"
    ci_commands = [line.split("#")[0].strip() for line in ci.splitlines()]
    assert install in ci_commands and test in ci_commands


@pytest.mark.slow
def test_quickstart_learns_a_robust_model(tmp_path: Path) -> None:
    """`amata-run` with no arguments, exactly as the README says (about a minute on a CPU)."""
    result = amata_run([], cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr
    summary = json.loads((only_dir(tmp_path / "outputs") / "summary.json").read_text())
    assert summary["epochs"] == 15 and summary["method"] == "amata"
    assert summary["final"]["clean_accuracy"] > 0.7
    assert summary["final"]["robust_accuracy"]["pgd20"] > 0.25  # chance is 0.1


ALL_METHODS = (
    "erm,pgd,amata,fosc,fat,yopo,amata_yopo,free,amata_free,fast,amata_fast,atta,amata_atta"
)


@pytest.mark.slow
def test_every_method_trains_cifar10_shaped_preactresnet18(tmp_path: Path) -> None:
    """All thirteen method configs on CIFAR10-shaped data with the paper's CIFAR network."""
    sweep = tmp_path / "sweep"
    tiny = ["dataset.num_train=64", "dataset.num_test=32", "batch_size=32", "epochs=2"]
    result = amata_run(
        [
            "-m",
            f"method={ALL_METHODS}",
            "dataset=synthetic",
            "dataset.channels=3",
            "dataset.image_size=32",
            "dataset.augment=crop_flip",
            "dataset.threat.eps=8/255",
            "dataset.threat.step_size=2/255",
            "dataset.threat.steps=3",
            "model=preactresnet18",
            *tiny,
            "eval.subset=32",
            "eval.attack.steps=2",
            "eval.final_attacks=[pgd2]",
            "schedule.switch=1",
            "progress=false",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
        timeout=1800,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    methods = set()
    for job in range(13):
        summary = json.loads((sweep / str(job) / "summary.json").read_text())
        assert summary["forward_passes"] > 0 and summary["train_seconds"] > 0
        methods.add(summary["method"])
    assert methods == set(ALL_METHODS.split(","))
