"""The set-up every CLI shares (runtime/device.py), the one schedule protocol the engine relies
on, and resuming checkpoints written by older versions."""

from __future__ import annotations

import pytest
import torch

from amata_runner.build import build_schedule
from amata_runner.errors import ConfigError
from amata_runner.runtime.device import select_device
from conftest import compose_resolved


def test_device_names_are_checked_in_one_place() -> None:
    assert select_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert select_device("auto").type == expected
    for bad in ("gpu", "cpu:0", "cudax", ""):
        with pytest.raises(ConfigError) as info:
            select_device(bad)
        assert info.value.key == "device" and "allowed: auto, cpu, cuda, cuda:N" in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message on a machine without CUDA")
def test_asking_for_cuda_without_a_gpu_says_what_to_use() -> None:
    with pytest.raises(ConfigError, match="use device=auto or device=cpu"):
        select_device("cuda:0")


@pytest.mark.parametrize("schedule", ["constant", "linear", "exponential", "step"])
def test_an_annealing_schedule_decides_by_its_formula_and_keeps_no_state(schedule: str) -> None:
    cfg = compose_resolved(["method=pgd", f"schedule={schedule}", "schedule.k_min=2"])
    annealing = build_schedule(cfg, epochs=6, iters_per_epoch=5)
    model = torch.nn.Linear(2, 2)
    for epoch in range(6):
        for iteration in range(5):
            assert annealing.decide(model, epoch, iteration) == annealing.at(epoch, iteration)
    assert annealing.state_dict() == {} and annealing.metrics() == {}
    annealing.load_state_dict({})  # a checkpoint of a static schedule restores nothing
    assert annealing.at(3, 2) == build_schedule(cfg, epochs=6, iters_per_epoch=5).at(3, 2)


def test_a_checkpoint_from_before_k_max_moved_resumes_and_a_change_is_refused() -> None:
    """Older versions kept K_max in schedule.k_max; their checkpoints must still resume when the
    run is the same (K_max now lives in the method's own key) and refuse when it is not."""
    import copy

    from omegaconf import OmegaConf

    from amata_runner.errors import ConfigError
    from amata_runner.runtime.run_state import check_same_run, upgrade_saved_config
    from conftest import compose_resolved

    for method, knob in (("amata", "steps"), ("atta", "reset"), ("fast", None), ("erm", None)):
        current = OmegaConf.to_container(compose_resolved([f"method={method}"]))
        saved = copy.deepcopy(current)
        k_max = saved["method"][knob] if knob else 1
        saved["schedule"]["k_max"] = k_max  # how the old version wrote it
        check_same_run(saved, current)  # the same run: no error
        assert "k_max" not in upgrade_saved_config(saved)["schedule"]
        if knob is None:
            continue
        saved["schedule"]["k_max"] = k_max + 5  # the old run annealed to another K
        with pytest.raises(
            ConfigError, match=f"method.{knob}={k_max} \\(checkpoint: {k_max + 5}\\)"
        ):
            check_same_run(saved, current)
