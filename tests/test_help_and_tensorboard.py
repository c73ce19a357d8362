"""Issue 15: real help for every tool, "did you mean" for mistyped keys, our own type errors,
the FGSM evaluation attack, and ``logger=tensorboard`` read back with TensorBoard's own reader."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from amata_runner.attacks.suite import SuiteOptions, attack_params, parse_attack, run_suite
from amata_runner.cli import train
from amata_runner.cli.evaluate import EvalOptions
from amata_runner.cli.landscape import LandscapeOptions
from amata_runner.cli.options import _field_comments
from amata_runner.logging import build_sinks
from conftest import amata_run, compose_resolved

BIN = Path(sys.executable).parent


def _tool(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / name), *args], capture_output=True, text=True, timeout=120, check=False
    )


# --------------------------------------------------------------------------- help
@pytest.mark.parametrize(
    ("tool", "schema"), [("amata-eval", EvalOptions), ("amata-landscape", LandscapeOptions)]
)
def test_tool_help_exits_0_with_every_key_its_default_and_meaning(
    tool: str, schema: type, tmp_path: Path
) -> None:
    result = _tool(tool, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[0] == f"usage: {tool} key=value ..."
    table = lines[lines.index("keys (key=value; default; meaning):") + 1 :]
    meanings = _field_comments(schema)
    fields = dataclasses.fields(schema)
    assert len(table) == len(fields)
    for field, line in zip(fields, table, strict=True):
        name, default, *meaning = line.split()
        assert name == field.name
        assert meanings.get(field.name), f"{tool}: {field.name} has no meaning"
        assert " ".join(meaning) == meanings[field.name]
        if field.name == "ckpt":
            assert default == "(required)"
    by_name = {line.split()[0]: line.split()[1] for line in table}
    assert by_name["seed"] == "0"
    if tool == "amata-eval":
        assert by_name["attacks"] == "[clean,pgd20,cw_l2]"
        assert by_name["force"] == "false"
    else:
        assert by_name["grid"] == "41" and by_name["amata_k_max"] == "null"


def test_amata_run_help_lists_every_method_and_experiment_one_line_each(tmp_path: Path) -> None:
    result = amata_run(["--help"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    conf = Path(__file__).resolve().parents[1] / "conf"
    for group, heading in (("method", "Methods"), ("experiment", "Experiments")):
        block = text.split(f"{heading} ({group}=NAME):\n", 1)[1].split("\n\n", 1)[0]
        names = [line.split()[0] for line in block.splitlines()]
        assert names == sorted(p.stem for p in (conf / group).glob("*.yaml"))
        assert all(len(line.split()) > 2 for line in block.splitlines())  # a description each
    assert "pgd  " in text and "PGD adversarial training (Madry et al.)" in text
    assert not (tmp_path / "outputs").exists()


# --------------------------------------------------------------------------- bad keys
@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("epoch=3", "amata-run: error: epoch='3': unknown key; did you mean epochs?"),
        ("method.step=3", "amata-run: error: method.step='3': unknown key; did you mean "),
        (
            "save_bst=false",
            "amata-run: error: save_bst='false': unknown key; did you mean save_best?",
        ),
        ("epochs=abc", "amata-run: error: epochs='abc': must be an integer (e.g. 3)"),
        ("optim.lr=fast", "amata-run: error: optim.lr='fast': must be a number (e.g. 0.1)"),
        ("deterministic=maybe", "amata-run: error: deterministic='maybe': must be true or false"),
    ],
)
def test_mistyped_keys_and_wrong_types_are_our_one_line(
    command: str,
    expected: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["amata-run", command])
    with pytest.raises(SystemExit) as info:
        train.main()
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2
    assert err.startswith(expected), err
    assert len(err.splitlines()) == 1
    assert "converted to" not in err and "not in struct" not in err
    assert list(tmp_path.iterdir()) == []


def test_method_step_suggests_method_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["amata-run", "method.step=3"])
    with pytest.raises(SystemExit):
        train.main()
    assert capsys.readouterr().err.strip().endswith("did you mean method.steps?")


@pytest.mark.parametrize(
    ("tool", "args", "expected"),
    [
        ("amata-eval", ["ckpt=x", "atacks=[pgd3]"], "atacks='[pgd3]': unknown key; did you mean"),
        ("amata-landscape", ["ckpt=x", "grid=abc"], "grid='abc': must be an integer (e.g. 3)"),
    ],
)
def test_tools_suggest_keys_and_say_types_plainly(
    tool: str, args: list[str], expected: str
) -> None:
    result = _tool(tool, *args)
    assert result.returncode == 2
    assert result.stderr.strip().startswith(f"{tool}: error: {expected}"), result.stderr
    if "did you mean" in expected:
        assert "did you mean attacks?" in result.stderr


# --------------------------------------------------------------------------- FGSM
def test_fgsm_is_one_sign_step_of_eps_from_the_clean_image() -> None:
    attack = parse_attack("fgsm")
    options = SuiteOptions(eps=0.1, step_size=0.01)
    assert attack.kind == "fgsm"
    assert attack_params(attack, options) == {
        "eps": 0.1,
        "step_size": 0.1,
        "steps": 1,
        "random_start": False,
    }
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval()
    images = torch.randint(0, 256, (32, 1, 4, 4), dtype=torch.uint8)
    x = images.float() / 255
    y = torch.randint(0, 3, (32,))
    x_req = x.clone().requires_grad_(True)
    nn.functional.cross_entropy(model(x_req), y, reduction="sum").backward()
    expected = (x + 0.1 * x_req.grad.sign()).clamp(0, 1)
    expected_correct = int((model(expected).argmax(1) == y).sum())
    results = run_suite(
        model, images, y, ["clean", "fgsm"], options, batch_size=8, seed=0, offset=0, store=None
    )
    assert results["fgsm"]["correct"] == expected_correct
    assert results["fgsm"]["accuracy"] == pytest.approx(expected_correct / 32)
    assert results["fgsm"]["accuracy"] <= results["clean"]["accuracy"]


# --------------------------------------------------------------------------- TensorBoard
def _rows() -> list[dict[str, Any]]:
    """Metrics rows shaped as the engine writes them (two evaluation points)."""
    return [
        {
            "epoch": float(epoch),
            "iteration": 4 * epoch,
            "examples": 256 * epoch,
            "train_seconds": 1.2345 * epoch,
            "forward_passes": 690 * epoch,
            "backward_passes": 600 * epoch,
            "K": 1 + epoch,
            "alpha": 0.5 / (1 + epoch),
            "lr": 0.05,
            "train_loss": 2.0 / epoch,
            "train_error": 0.9 / epoch,
            "clean_error": 0.5 / epoch,
            "robust_error": 0.95 / epoch,
            "eval_examples": 64,
            "eval_split": "test",
            "eval_attack": "pgd2",
        }
        for epoch in (1, 2)
    ]


def test_logger_tensorboard_writes_scalars_against_passes_and_train_time(tmp_path: Path) -> None:
    """``logger=tensorboard`` builds the sink (through the config, as a run does); what it writes
    is read back with TensorBoard's own reader. The end-to-end run is in test_observability."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    cfg = compose_resolved(["logger=tensorboard", "dataset=synthetic"])
    resolved = OmegaConf.to_container(cfg, resolve=True)
    sinks = build_sinks(cfg, tmp_path, resume_id=None, resolved=resolved)
    assert len(sinks) == 1
    rows = _rows()
    summary = {
        "train_seconds": rows[-1]["train_seconds"],
        "forward_passes": rows[-1]["forward_passes"],
        "backward_passes": rows[-1]["backward_passes"],
        "final": {
            "examples": 64,
            "clean_accuracy": 0.75,
            "robust_accuracy": {"pgd2": 0.25, "fgsm": 0.375},
        },
    }
    for row in rows:
        sinks[0].log(row)
    sinks[0].summary(summary)
    sinks[0].close()

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    passes = [r["forward_passes"] + r["backward_passes"] for r in rows]
    by_passes = events.Scalars("vs_passes/robust_error")
    assert [e.step for e in by_passes] == passes == [1290, 2580]
    assert [e.value for e in by_passes] == pytest.approx([r["robust_error"] for r in rows])
    by_time = events.Scalars("vs_train_ms/clean_error")
    assert [e.step for e in by_time] == [1234, 2469]  # train_seconds in milliseconds
    assert [e.value for e in by_time] == pytest.approx([r["clean_error"] for r in rows])
    assert [e.value for e in events.Scalars("vs_passes/K")] == [2, 3]
    scalars = events.Tags()["scalars"]
    assert not any("eval_examples" in tag or "iteration" in tag for tag in scalars)
    assert events.Scalars("final/clean_accuracy")[0].value == pytest.approx(0.75)
    assert events.Scalars("final/fgsm_accuracy")[0].value == pytest.approx(0.375)
    assert events.Scalars("final/passes")[0].value == 2580

    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hparams = start.session_start_info.hparams
    assert hparams["method.name"].string_value == "amata"
    assert hparams["dataset.name"].string_value == "synthetic"
    assert hparams["epochs"].number_value == cfg.epochs
    assert not any(key.startswith(("paths.", "logger.")) for key in hparams)
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
    metrics = {m.name.tag for m in experiment.experiment.metric_infos}
    assert metrics == {
        "final/clean_accuracy",
        "final/pgd2_accuracy",
        "final/fgsm_accuracy",
        "final/train_seconds",
        "final/passes",
    }


def test_logger_tensorboard_without_the_package_is_one_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib.util

    from amata_runner.errors import ConfigError

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name)
    )
    with pytest.raises(ConfigError, match=r"pip install 'amata-runner\[tensorboard\]'"):
        compose_resolved(["logger=tensorboard"])
