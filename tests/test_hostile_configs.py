"""Hostile command lines: each is refused in one line naming the key, before anything is written.

Every case runs the real ``amata-run`` entry point in-process from an empty working directory and
checks: exit status 2, exactly one line on stderr that starts with ``amata-run: error: <key>=``,
no traceback, and no ``outputs/`` (nor anything else) created.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import pytest

from amata_runner.cli import train

# (command line, the key the error must name)
HOSTILE: list[tuple[str, str]] = [
    # wrong types
    ("epochs=abc", "epochs"),
    ("seed=1.5", "seed"),
    ("deterministic=maybe", "deterministic"),
    ("method.eps=abc", "method.eps"),
    ("method.eps=1/0", "method.eps"),
    ("optim.lr=fast", "optim.lr"),
    ("eval.target_robust_errors=0.5", "eval.target_robust_errors"),
    # out of range
    ("epochs=0", "epochs"),
    ("epochs=-3", "epochs"),
    ("batch_size=0", "batch_size"),
    ("seed=-1", "seed"),
    ("method.eps=-0.1", "method.eps"),
    ("method.eps=2", "method.eps"),
    ("method.step_size=0", "method.step_size"),
    ("method.steps=0", "method.steps"),
    ("schedule=linear schedule.k_min=0", "schedule.k_min"),
    ("schedule=exponential schedule.eta=-1", "schedule.eta"),
    ("optim.lr=-1", "optim.lr"),
    ("optim.momentum=1.5", "optim.momentum"),
    ("optim.weight_decay=-0.1", "optim.weight_decay"),
    ("eval.every=0", "eval.every"),
    ("eval.subset=0", "eval.subset"),
    ("eval.batch_size=0", "eval.batch_size"),
    ("eval.attack.steps=-1", "eval.attack.steps"),
    ("eval.attack.eps=-1", "eval.attack.eps"),
    ("eval.target_robust_errors=[1.5]", "eval.target_robust_errors"),
    ("dataset=synthetic dataset.num_classes=1", "dataset.num_classes"),
    ("dataset=synthetic dataset.image_size=4", "dataset.image_size"),
    ("method=fosc method.c_max=-1", "method.c_max"),
    ("method=fat method.tau=-1", "method.tau"),
    ("method=yopo method.inner_steps=0", "method.inner_steps"),
    ("method=free method.steps=0", "method.steps"),
    # unknown options and keys
    ("model=vgg16", "model"),
    ("method=mma", "method"),
    ("dataset=svhn", "dataset"),
    ("schedule=cosine", "schedule"),
    ("optim=adam", "optim"),
    ("logger=mlflow", "logger"),
    ("experiment=paper_missing", "experiment"),
    ("precision=fp16", "precision"),
    ("device=tpu", "device"),
    ("nonfinite=ignore", "nonfinite"),
    ("optim.lr_schedule=poly", "optim.lr_schedule"),
    ("eval.unit=week", "eval.unit"),
    ("dataset.augment=rotate", "dataset.augment"),
    ("schedule=linear schedule.endpoint=middle", "schedule.endpoint"),
    ("logger=wandb logger.mode=sometimes", "logger.mode"),
    ("bogus=1", "bogus"),
    ("+bogus=1", "bogus"),
    ("method.unknown_knob=3", "method.unknown_knob"),
    # contradictory settings
    ("schedule=linear schedule.k_min=12 method.steps=10", "schedule.k_min"),
    ("optim.milestones=[90,75]", "optim.milestones"),
    ("dataset=synthetic dataset.mean=[0.5,0.5]", "dataset.mean"),
    ("model=resnet18 dataset=synthetic dataset.channels=3 dataset.std=[0,1,1]", "dataset.std"),
    # missing files
    ("dataset=mnist paths.data_dir={tmp}/nothing-here", "dataset.root"),
    ("dataset=cifar10 paths.data_dir={tmp}/nothing-here", "dataset.root"),
    # paths that cannot be written, names that would escape the run directory
    ("paths.output_dir={tmp}/a-file/outputs", "paths.output_dir"),
    ("hydra.run.dir={tmp}/a-file/run", "hydra.run.dir"),
    ("-m hydra.sweep.dir={tmp}/a-file/sweep seed=0,1", "hydra.sweep.dir"),
    ("name=../../escape", "name"),
    ("name=a/b", "name"),
    # absurd sizes
    ("epochs=1000000000", "epochs"),
    ("batch_size=1000000000000", "batch_size"),
    ("dataset=synthetic dataset.image_size=100000", "dataset.image_size"),
    # values no comparison catches: infinities and NaNs
    ("optim.lr=inf", "optim.lr"),
    ("optim.weight_decay=inf", "optim.weight_decay"),
    ("method.step_size=inf", "method.step_size"),
    ("dataset.mean=[nan]", "dataset.mean"),
    ("dataset.std=[inf]", "dataset.std"),
    ("nonfinite=skip nonfinite_skip_limit=2", "nonfinite_skip_limit"),
    # settings that contradict the data
    ("dataset.num_classes=3", "dataset.num_classes"),
    ("dataset.test_fraction=0.0001", "dataset.test_fraction"),
    ("dataset.test_fraction=0.9999", "dataset.test_fraction"),
    ("dataset.image_size=20000", "dataset.image_size"),
    # a run directory no file system will create
    ("hydra.run.dir=/proc/amata/run", "hydra.run.dir"),
    # one bad job in a grid
    ("-m seed=0,1 method.eps=0.1,7", "method.eps"),
]


def test_the_table_is_big_and_has_no_duplicates() -> None:
    commands = [command for command, _ in HOSTILE]
    assert len(commands) >= 40
    assert len(set(commands)) == len(commands)


@pytest.mark.parametrize(("command", "key"), HOSTILE, ids=[c for c, _ in HOSTILE])
def test_hostile_command_line_is_one_line_and_writes_nothing(
    command: str,
    key: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "a-file").write_text("not a directory")
    monkeypatch.chdir(work)
    argv = shlex.split(command.format(tmp=tmp_path))
    monkeypatch.setattr(sys, "argv", ["amata-run", *argv])
    with pytest.raises(SystemExit) as info:
        train.main()
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"amata-run: error: {key}="), lines[0]
    assert "Traceback" not in err
    assert os.listdir(work) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "work"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_a_read_only_output_dir_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["amata-run", f"paths.output_dir={locked}/out"])
    try:
        with pytest.raises(SystemExit) as info:
            train.main()
    finally:
        locked.chmod(0o700)
    assert info.value.code == 2
    assert "paths.output_dir=" in capsys.readouterr().err
    assert list(locked.iterdir()) == []
