"""One registry of methods: every name list is derived from it, and a new method is one module and
one YAML (shown with a toy method that lives in this test directory, not in the package)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore

from amata_runner.cli import config_dir
from amata_runner.config import register_schemas, resolve_config
from amata_runner.engine import Trainer
from amata_runner.errors import ConfigError
from amata_runner.logging.metrics import read_rows
from amata_runner.methods import build_method
from amata_runner.methods.registry import (
    base_specs,
    method_names,
    method_spec,
    scheduled_method_names,
    unregister_method,
)
from conftest import FAST, amata_run, compose_resolved

TOY_CONF = Path(__file__).parent / "toy_conf"


def test_every_method_yaml_is_a_registered_name_and_back() -> None:
    yamls = {p.stem for p in Path(config_dir(), "method").glob("*.yaml")}
    assert set(method_names()) == yamls
    for spec in base_specs():
        stored = ConfigStore.instance().repo["schema"]["method"]
        assert f"{spec.name}.yaml" in stored, spec.name
        assert spec.annealed is None or spec.scheduled, spec.name  # a variant needs a schedule


def test_the_derived_lists_agree_with_the_methods() -> None:
    assert {"erm", "pgd", "amata", "fat", "fosc"} <= set(method_names())
    scheduled = set(scheduled_method_names())
    assert {"pgd", "amata", "free", "amata_free"} <= scheduled
    assert not {"erm", "fosc", "fat"} & scheduled  # they carry no or their own schedule
    assert method_spec("amata") is method_spec("pgd")
    with pytest.raises(ConfigError, match=r"method\.name='nope': allowed: .*amata"):
        method_spec("nope")


def test_a_method_is_built_from_its_typed_config() -> None:
    from conftest import cpu_context

    cfg = compose_resolved([*FAST, "method=pgd", "method.eps=8/255"])
    method = build_method(cfg.method, cpu_context(torch.nn.Linear(64, 10)))
    assert type(method.cfg).__name__ == "PGDConfig"  # a dataclass, not a DictConfig
    assert method.cfg.eps == pytest.approx(8 / 255) and isinstance(method.cfg.eps, float)


@pytest.fixture
def toy() -> Iterator[type]:
    """The toy method registered (importing its module did it once; re-registered after a test
    removed it) and its schema stored; removed again afterwards."""
    import toy_method

    if "toy" not in method_names():
        from amata_runner.methods.registry import register_method

        register_method("toy", toy_method.ToyConfig, annealed="amata_toy")(toy_method.Toy)
    register_schemas()
    yield toy_method.Toy
    unregister_method("toy")


def compose_toy(*overrides: str):  # type: ignore[no-untyped-def]
    with initialize_config_dir(version_base="1.3", config_dir=config_dir(), job_name="test"):
        return compose(
            config_name="config",
            overrides=[f"hydra.searchpath=[file://{TOY_CONF}]", *FAST, *overrides],
        )


def test_a_toy_method_from_a_test_module_trains_under_amata(toy: type, tmp_path: Path) -> None:
    assert {"toy", "amata_toy"} <= set(method_names())
    assert "amata_toy" in scheduled_method_names()
    cfg = resolve_config(
        compose_toy("method=amata_toy", "schedule.k_min=1", "schedule.endpoint=inclusive")
    )
    assert cfg.method.name == "amata_toy" and cfg.schedule.name == "linear"
    assert cfg.method.steps == 3  # the YAML lists no key: the dataclass's defaults
    trainer = Trainer(cfg, tmp_path)
    summary = trainer.run()
    assert isinstance(trainer.parts.method, toy)
    seen = [control.steps for control in trainer.parts.method.controls]
    n, batch = 1238, 128  # digits training images less the validation split
    per_epoch = -(-n // batch)
    assert seen == [1] * per_epoch + [3] * per_epoch  # K_min in epoch 1, K_max in epoch 2
    assert summary["forward_passes"] == 2 * n  # the toy takes no gradient steps: 1 pass per image
    assert 0 < trainer.parts.method.largest_step <= cfg.method.eps + 1e-6  # inside the eps-ball
    rows = read_rows(tmp_path / "metrics.jsonl")
    assert [r["K"] for r in rows] == [1, 3]
    assert json.loads((tmp_path / "summary.json").read_text())["final"]["examples"] == 359


def test_a_wrong_toy_value_is_one_line_naming_the_key(toy: type) -> None:
    with pytest.raises(ConfigError, match=r"method.steps=0: must be >= 1"):
        resolve_config(compose_toy("method=toy", "method.steps=0"))


def test_amata_run_trains_a_plugin_method(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real console script, with the method's module named in AMATA_RUNNER_PLUGINS and its
    YAML directory on hydra.searchpath: no file of the package is touched."""
    tests = str(Path(__file__).parent)
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")]))
    )
    monkeypatch.setenv("AMATA_RUNNER_PLUGINS", "toy_method")
    run_dir = tmp_path / "run"
    args = [
        f"hydra.searchpath=[file://{TOY_CONF}]",
        "method=amata_toy",
        *FAST,
        f"hydra.run.dir={run_dir}",
    ]
    result = amata_run(args, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final"]["examples"] == 359
    assert [r["K"] for r in read_rows(run_dir / "metrics.jsonl")] == [2, 3]  # k_min 2 -> steps 3

    bad = amata_run(["method=toy", *FAST], tmp_path)  # the plugin's YAML is not on the path
    assert (
        bad.returncode == 2
        and "allowed:" in bad.stderr
        and "toy" not in bad.stderr.split("allowed:")[1]
    )


def test_a_plugin_that_cannot_be_imported_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AMATA_RUNNER_PLUGINS", "no_such_module_here")
    result = amata_run(["epochs=1"], tmp_path)
    assert result.returncode == 2
    assert (
        result.stderr.strip().splitlines() == [result.stderr.strip().splitlines()[0]]
        and "AMATA_RUNNER_PLUGINS='no_such_module_here': cannot import it" in result.stderr
    )
