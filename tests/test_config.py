"""Every config option composes and validates; every class of bad value is one clear ConfigError."""

from __future__ import annotations

from pathlib import Path

import pytest

from amata_runner.checks import as_float
from amata_runner.cli import config_dir
from amata_runner.cli.preflight import preflight
from amata_runner.errors import ConfigError
from amata_runner.methods.registry import method_spec
from conftest import compose_raw, compose_resolved

GROUPS = [
    "dataset",
    "model",
    "method",
    "schedule",
    "optim",
    "eval",
    "logger",
    "paths",
    "experiment",
]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(config_dir()) / group).glob("*.yaml"))


@pytest.mark.parametrize(
    ("group", "option"), [(g, o) for g in GROUPS for o in options(g)], ids=lambda v: str(v)
)
def test_every_group_option_composes_and_validates(group: str, option: str) -> None:
    cfg = compose_resolved([f"{group}={option}"])
    if group == "experiment":
        assert cfg.report.title and cfg.paper.source  # what amata-report prints beside ours
    elif group in ("eval", "paths"):
        assert cfg[group] is not None
    else:
        assert cfg[group].name == option


def test_every_group_has_options() -> None:
    for group in GROUPS:
        assert options(group), group


def test_defaults_are_amata_lenet_digits() -> None:
    cfg = compose_resolved()
    assert (cfg.dataset.name, cfg.model.name, cfg.method.name) == ("digits", "lenet", "amata")
    assert cfg.schedule.name == "linear"


def test_fractions_are_read_as_users_type_them() -> None:
    cfg = compose_resolved(["dataset=cifar10", "method=pgd", "method.eps=8/255"])
    assert cfg.method.eps == pytest.approx(8 / 255)
    assert cfg.method.step_size == pytest.approx(2 / 255)  # 2/255 written in the YAML
    assert cfg.eval.attack.eps == pytest.approx(8 / 255)
    assert as_float("k", "0.3") == 0.3 and as_float("k", 1) == 1.0
    for bad in ("abc", "1/0", True, "8//255"):
        with pytest.raises(ConfigError):
            as_float("method.eps", bad)


def test_paper_settings_compose() -> None:
    mnist = compose_resolved(["dataset=mnist", "model=lenet", "method=pgd"])
    assert (mnist.method.steps, mnist.method.step_size, mnist.method.eps) == (40, 0.01, 0.3)
    assert mnist.schedule.name == "constant"
    cifar = compose_resolved(["dataset=cifar10", "model=preactresnet18", "method=amata"])
    assert (cifar.schedule.k_min, cifar.method.steps) == (2, 10)  # K_max is method.steps
    assert (cifar.optim.lr, list(cifar.optim.milestones), cifar.epochs) == (0.05, [75, 90], 100)
    # the same method under another schedule is the Appendix B.2 ablation
    exp = compose_resolved(["method=amata", "schedule=exponential", "schedule.eta=0.5"])
    assert (exp.method.name, exp.schedule.name, exp.schedule.eta) == ("amata", "exponential", 0.5)
    pgd_exp = compose_resolved(["method=pgd", "schedule=exponential"])
    assert method_spec("pgd").k_max(pgd_exp) == pgd_exp.method.steps


BAD_OVERRIDES = [
    (["schedule.k_min=12"], "schedule.k_min", "<= 10 (method.steps)"),
    (["method.eps=0"], "method.eps", "> 0"),
    (["method.eps=-8/255"], "method.eps", "> 0"),
    (["method.eps=2"], "method.eps", "<= 1.0"),
    (["method.step_size=0"], "method.step_size", "> 0"),
    (["schedule.tau=0"], "schedule.tau", "> 0"),
    (["schedule.tau=-1"], "schedule.tau", "> 0"),
    (
        ["method=nope"],
        "method",
        "allowed: amata, amata_atta, amata_fast, amata_free, amata_mart, amata_trades, amata_yopo, "
        "atta, erm, fast, fat, fosc, free, mart, pgd, trades, yopo",
    ),
    (["dataset=svhn"], "dataset", "allowed: caltech256, cifar10, digits"),
    (["dataset=imagenet", "paths.data_dir=/nonexistent"], "dataset.root", "train/"),
    (["schedule.name=cosine"], "schedule.name", "allowed: constant, linear, exponential"),
    (["method.attack_bn=frozen"], "method.attack_bn", "allowed: eval, train"),
    (["epochs=0"], "epochs", ">= 1"),
    (["epochs=many"], "epochs", "must be an integer"),
    (["method.stepz=3"], "method.stepz", "unknown key"),
    (["optim.lr=0"], "optim.lr", "> 0"),
    (["optim.milestones=[90,75]"], "optim.milestones", "increasing"),
    (["eval.every=0"], "eval.every", ">= 1"),
    (["precision=fp8"], "precision", "allowed"),
    (["dataset=mnist"], "dataset.root", "dataset.download=true"),
    (["dataset=cifar10"], "dataset.root", "dataset.download=true"),
    (["schedule=exponential", "schedule.eta=0"], "schedule.eta", "> 0"),
]


@pytest.mark.parametrize(("overrides", "key", "allowed"), BAD_OVERRIDES, ids=lambda v: str(v))
def test_bad_values_are_one_line_naming_key_and_allowed(
    overrides: list[str], key: str, allowed: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # relative data dirs resolve in an empty place
    with pytest.raises(ConfigError) as info:
        preflight(overrides, config_dir())
    message = str(info.value)
    assert info.value.key == key
    assert allowed in message
    assert "\n" not in message
    assert not (tmp_path / "outputs").exists()


def test_multirun_grid_is_checked_job_by_job(tmp_path: Path) -> None:
    preflight(["-m", "method=pgd,amata", "seed=0,1"], config_dir())
    with pytest.raises(ConfigError, match=r"schedule\.k_min"):
        preflight(["-m", "schedule.k_min=2,30"], config_dir())


def test_inspection_flags_are_left_to_hydra() -> None:
    for argv in (["--cfg", "job", "method=nope"], ["--help"], ["--info", "defaults"]):
        preflight(argv, config_dir())  # no error: Hydra prints these itself


def test_unknown_key_fails_at_composition() -> None:
    with pytest.raises(Exception, match="stepz"):
        compose_raw(["method.stepz=3"])


@pytest.mark.parametrize(
    "argv",
    [
        ["-m", "method=pgd,amata", "seed=range(3)", "epochs=1"],
        ["-m", "experiment=paper_table2_cifar10", "+experiment@_global_=paper_table2_cifar10_pgd2"],
        ["-m", "experiment=paper_appendix_b2_mnist", "seed=0,1", "~logger"],
        ["--multirun", "schedule=linear,exponential", "schedule.eta=0.5,1"],
    ],
)
def test_preflight_forms_the_jobs_hydras_basic_sweeper_forms(argv: list[str]) -> None:
    """The pre-flight check uses only Hydra's public API; it must form the very jobs (same
    overrides, same order) that the basic sweeper, a private class, will run."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper  # the reference only
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from amata_runner.cli.preflight import experiment_grid, job_overrides

    parser = OverridesParser.create()
    overrides = [a for a in argv if not a.startswith("-")]
    grid = experiment_grid(config_dir(), parser.parse_overrides(overrides))
    expected = BasicSweeper.split_arguments(parser.parse_overrides(grid + overrides), None)
    assert job_overrides(argv, config_dir()) == [job for batch in expected for job in batch]


def test_preflight_leaves_inspection_flags_to_hydra() -> None:
    from amata_runner.cli.preflight import job_overrides

    for argv in (["--cfg", "job"], ["--help"], ["-m", "--info"], ["--config-dir", "x", "epochs=1"]):
        assert job_overrides(argv, config_dir()) is None
    assert job_overrides(["-r", "epochs=2"], config_dir()) == [["epochs=2"]]
