"""amata-eval on a checkpoint written by amata-run: eval.json, its cache, resumption and errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from amata_runner.cli import evaluate
from amata_runner.cli.evaluate import main
from amata_runner.data import load_splits
from amata_runner.runtime.run_files import load_trained
from conftest import FAST, amata_run

SMALL = ["n_examples=24", "batch_size=12", "device=cpu", "cw_inf_steps=3"]


@pytest.fixture(scope="module")
def trained_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """best.ckpt of a one-epoch amata-run on the digits (FAST settings, no final evaluation)."""
    cwd = tmp_path_factory.mktemp("run")
    result = amata_run([*FAST, "epochs=1", "eval.final=false"], cwd=cwd)
    assert result.returncode == 0, result.stderr
    (ckpt,) = (cwd / "outputs").rglob("best.ckpt")
    return ckpt


@pytest.fixture
def ckpt(trained_ckpt: Path, tmp_path: Path) -> Path:
    """A private copy (with the run's config files) so each test has its own eval.json."""
    for name in ("best.ckpt", "config_resolved.yaml"):
        shutil.copy(trained_ckpt.parent / name, tmp_path / name)
    return tmp_path / "best.ckpt"


def run_eval(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[dict[str, Any], str, str]:
    main(list(args))
    out, err = capsys.readouterr()
    (path,) = [a.split("=", 1)[1] for a in args if a.startswith("ckpt=")]
    return json.loads((Path(path).parent / "eval.json").read_text()), out, err


def by_attack(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["attack"]: r for r in data["results"].values()}


def test_round_trip_of_an_amata_run_checkpoint(
    ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, out, _ = run_eval(capsys, f"ckpt={ckpt}", "attacks=[clean,pgd3,cw_inf]", *SMALL)
    # the model and data come from the checkpoint's own config: recompute clean accuracy by hand
    trained = load_trained(ckpt, torch.device("cpu"))
    _, test = load_splits(trained.cfg.dataset)
    with torch.no_grad():
        logits = trained.model(test.images[:24].float() / 255)
    clean = (logits.argmax(1) == test.labels[:24]).float().mean().item()
    results = by_attack(data)
    assert results["clean"]["accuracy"] == pytest.approx(clean)
    # RobustBench-shaped headline fields
    assert data["clean_acc"] == round(100 * clean, 2)
    assert (data["architecture"], data["dataset"], data["norm"]) == ("lenet", "digits", "Linf")
    assert data["eps"] == "0.2" and data["n_examples"] == 24 and "autoattack_acc" not in data
    assert data["threat_model"] == {"norm": "Linf", "eps": 0.2, "step_size": 0.05}
    assert data["partial"] == {}
    for name in ("pgd3", "cw_inf"):
        assert results[name]["accuracy"] <= results["clean"]["accuracy"]
        assert results[name]["max_linf"] <= 0.2 + 1e-6
        assert results[name]["examples"] == 24 and results[name]["checkpoint"] == "best.ckpt"
    assert results["pgd3"]["params"] == {
        "eps": 0.2,
        "step_size": 0.05,
        "steps": 3,
        "random_start": True,
    }
    table = out.strip().splitlines()
    assert table[0].split() == ["attack", "accuracy", "error", "examples", "seconds"]
    assert [line.split()[0] for line in table[1:]] == ["clean", "pgd3", "cw_inf"]
    assert f"{100 * clean:.2f}%" in table[1]


def test_second_invocation_skips_what_is_done_and_keeps_everything(
    ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first, _, _ = run_eval(capsys, f"ckpt={ckpt}", "attacks=[clean,pgd3,cw_inf]", *SMALL)
    second, out, err = run_eval(capsys, f"ckpt={ckpt}", "attacks=[clean,pgd3,pgd2]", *SMALL)
    assert "clean: already in eval.json, skipped" in err
    assert "pgd3: already in eval.json, skipped" in err
    assert "running pgd2" in err and "running pgd3" not in err
    assert "(cached)" in out
    for key, entry in first["results"].items():  # nothing earlier lost or recomputed
        assert second["results"][key] == entry
    assert {r["attack"] for r in second["results"].values()} == {"clean", "pgd3", "cw_inf", "pgd2"}
    # another setting of the same attack is another result, beside the first one
    third, _, err = run_eval(capsys, f"ckpt={ckpt}", "attacks=[pgd3]", *SMALL, "n_examples=12")
    assert "running pgd3" in err
    pgd3_sizes = sorted(r["examples"] for r in third["results"].values() if r["attack"] == "pgd3")
    assert pgd3_sizes == [12, 24]
    assert third["clean_acc"] is None  # no clean result for 12 examples yet
    # force recomputes (same seed: the same number)
    forced, _, err = run_eval(capsys, f"ckpt={ckpt}", "attacks=[pgd3]", *SMALL, "force=true")
    assert "running pgd3" in err
    key = next(k for k, r in first["results"].items() if r["attack"] == "pgd3")
    assert forced["results"][key]["correct"] == first["results"][key]["correct"]


def test_killed_evaluation_resumes_at_its_batch(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ["attacks=[pgd2x2]", "n_examples=24", "batch_size=8", "device=cpu"]
    reference = tmp_path / "uninterrupted.json"
    main([f"ckpt={ckpt}", *args, f"output={reference}"])
    whole = by_attack(json.loads(reference.read_text()))["pgd2x2"]

    saves: list[int] = []
    original = evaluate.EvalFile.save

    def save_then_die(self: evaluate.EvalFile, name: str, state: dict[str, Any]) -> None:
        original(self, name, state)
        saves.append(state["next"])
        if saves == [8, 16]:
            raise KeyboardInterrupt  # killed after the second of three batches

    monkeypatch.setattr(evaluate.EvalFile, "save", save_then_die)
    with pytest.raises(SystemExit) as info:
        main([f"ckpt={ckpt}", *args])
    assert info.value.code == 130
    assert "interrupted; finished batches are in eval.json" in capsys.readouterr().err
    partial = json.loads((ckpt.parent / "eval.json").read_text())["partial"]
    assert [state["next"] for state in partial.values()] == [16]

    data, _, _ = run_eval(capsys, f"ckpt={ckpt}", *args)
    assert saves == [8, 16, 24]  # the resumed run did only the third batch
    resumed = by_attack(data)["pgd2x2"]
    assert data["partial"] == {}
    assert (resumed["correct"], resumed["max_linf"]) == (whole["correct"], whole["max_linf"])
    assert resumed["mean_l2"] == pytest.approx(whole["mean_l2"], rel=1e-9)


def test_eps_override_takes_fractions_and_scales_the_step(
    ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, _, _ = run_eval(
        capsys, f"ckpt={ckpt}", "attacks=[pgd3]", *SMALL, "eps=8/255", "cw_l2_c=1/2"
    )
    assert data["eps"] == "8/255"
    assert data["threat_model"]["eps"] == pytest.approx(8 / 255)
    assert data["threat_model"]["step_size"] == pytest.approx(0.05 * (8 / 255) / 0.2)  # 2/255
    assert by_attack(data)["pgd3"]["max_linf"] <= 8 / 255 + 1e-6


def test_autoattack_through_the_cli_fills_autoattack_acc(
    ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, _, _ = run_eval(
        capsys,
        f"ckpt={ckpt}",
        "attacks=[clean,autoattack]",
        "autoattack_version=custom",
        "autoattack_attacks=[apgd-ce]",
        "n_examples=8",
        "batch_size=8",
        "device=cpu",
    )
    results = by_attack(data)
    assert data["autoattack_acc"] == round(100 * results["autoattack"]["accuracy"], 2)
    assert data["autoattack_acc"] <= data["clean_acc"]
    assert results["autoattack"]["params"]["attacks"] == ["apgd-ce"]
    assert results["autoattack"]["max_linf"] <= 0.2 + 1e-6


@pytest.mark.parametrize(
    ("arg", "needle"),
    [
        ("attacks=[pgd20,bim]", "attacks='bim': attacks are clean, fgsm"),
        ("n_examples=100000", "n_examples=100000: must be in 1..359"),
        ("eps=abc", "eps='abc': expected a number"),
        ("cw_l2_init=ones", "cw_l2_init='ones': allowed: zero, input, random"),
        ("device=tpu", "device='tpu'"),
        ("bogus=1", "bogus='1': unknown key"),
    ],
)
def test_bad_settings_are_one_line_and_exit_2(
    ckpt: Path, capsys: pytest.CaptureFixture[str], arg: str, needle: str
) -> None:
    with pytest.raises(SystemExit) as info:
        main([f"ckpt={ckpt}", arg])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("amata-eval: error: ") and needle in err[0], err
    assert not (ckpt.parent / "eval.json").exists()


def test_console_script_reports_a_bad_key_in_one_line(ckpt: Path) -> None:
    script = Path(sys.executable).with_name("amata-eval")
    command = [str(script)] if script.exists() else [sys.executable, "-m", evaluate.__name__]
    result = subprocess.run(
        [*command, f"ckpt={ckpt}", "atacks=[pgd20]"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    needle = "atacks='[pgd20]': unknown key; did you mean attacks? keys: ckpt"
    assert len(lines) == 1 and needle in lines[0]
    missing = subprocess.run([*command], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "ckpt='???': required" in missing.stderr


def test_missing_autoattack_extra_is_one_line_before_any_work(
    ckpt: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pyautoattack", None)  # as if the extra were not installed
    with pytest.raises(SystemExit) as info:
        main([f"ckpt={ckpt}", "attacks=[clean,autoattack]", *SMALL])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'amata-runner[autoattack]'" in err[0]
    assert not (ckpt.parent / "eval.json").exists()
