"""The throughput benchmark prints one stable JSON line per case (no speed is asserted here)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_throughput

KEYS = {
    "date", "device", "torch", "threads", "method", "model", "shape", "batch", "steps",
    "precision", "reference", "iters", "images_per_s", "reference_images_per_s", "ratio",
    "s_per_50k_epoch", "reference_s_per_50k_epoch", "peak_mem_mib", "reference_peak_mem_mib",
    "compile", "model_gflop_per_image", "passes_per_step", "model_flop_per_s",
    "reference_model_flop_per_s", "peak_flop_per_s", "peak_dtype", "peak_fraction",
    "reference_peak_fraction",
}  # fmt: skip
COMPILED_KEYS = {
    "compiled_images_per_s", "compile_speedup", "compiled_model_flop_per_s",
    "compiled_peak_fraction", "compiled_peak_mem_mib",
}  # fmt: skip
TINY = ["--model", "lenet", "--shape", "1x28x28", "--batch", "8", "--iters", "2", "--warmup", "1"]


@pytest.mark.parametrize("method", ["pgd", "free", "fast", "erm"])
def test_each_case_is_one_json_line_with_the_stable_keys(
    method: str, capsys: pytest.CaptureFixture[str]
) -> None:
    bench_throughput.main([*TINY, "--method", method, "--steps", "2", "--rounds", "2"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    row = json.loads(lines[0])
    assert set(row) == KEYS
    assert row["method"] == method and row["device"] == "cpu" and row["precision"] == "fp32"
    assert row["ratio"] == pytest.approx(
        row["images_per_s"] / row["reference_images_per_s"], rel=0.01
    )
    assert row["s_per_50k_epoch"] == pytest.approx(50_000 / row["images_per_s"], rel=0.01)


def test_amata_projection_follows_algorithm_1(capsys: pytest.CaptureFixture[str]) -> None:
    bench_throughput.main([*TINY, "--amata", "1,3,4", "--rounds", "1"])
    row = json.loads(capsys.readouterr().out)
    per_k = {int(k): v for k, v in row["s_per_iter_by_k"].items()}
    assert sorted(per_k) == [1, 2, 3]
    iters = math.ceil(50_000 / 8)
    schedule = [1, 2, 2, 3]  # round-half-up of 1 + 2 t / 4, t = 0..3
    expected = sum(per_k[k] for k in schedule) * iters
    assert row["amata_train_s"] == pytest.approx(expected, rel=1e-3)
    assert row["pgd_train_s"] == pytest.approx(per_k[3] * iters * 4, rel=1e-3)
    assert row["ratio"] == pytest.approx(row["amata_train_s"] / row["pgd_train_s"], rel=1e-3)


def test_flop_rate_is_counted_passes_times_model_flops_over_time(
    capsys: pytest.CaptureFixture[str],
) -> None:
    bench_throughput.main([*TINY, "--method", "pgd", "--steps", "2", "--rounds", "1"])
    row = json.loads(capsys.readouterr().out)
    assert row["passes_per_step"] == 3  # K = 2 attack passes and one update
    assert row["compile"] is False and row["peak_dtype"] == "fp32"
    # forward + full backward FLOPs of each pass, images per second
    expected = row["passes_per_step"] * row["model_gflop_per_image"] * 1e9 * row["images_per_s"]
    assert row["model_flop_per_s"] == pytest.approx(expected, rel=0.02)
    assert row["peak_flop_per_s"] > 0
    assert row["peak_fraction"] == pytest.approx(
        row["model_flop_per_s"] / row["peak_flop_per_s"], rel=0.02, abs=1e-4
    )


def test_model_flops_match_lenet_by_hand() -> None:
    """flop_counter's forward count for LeNet at 1x28x28 is the sum of its convs and linears."""
    case = bench_throughput.parse([*TINY, "--steps", "1"])[0]
    forward, backward = bench_throughput.model_flops(case)
    # conv 1->20 5x5 to 24x24, conv 20->50 5x5 to 8x8, linears 800->500->10 (2 FLOPs per MAC)
    by_hand = 2 * (20 * 24 * 24 * 25 + 50 * 8 * 8 * 20 * 25 + 800 * 500 + 500 * 10)
    assert forward == pytest.approx(by_hand, rel=0.01)
    assert backward == pytest.approx(2 * forward, rel=0.1)  # weight and input gradients


@pytest.mark.slow
def test_compile_both_times_eager_and_compiled_in_the_same_run(
    capsys: pytest.CaptureFixture[str],
) -> None:
    bench_throughput.main(
        [*TINY, "--method", "pgd", "--steps", "2", "--rounds", "1", "--compile", "both"]
    )
    row = json.loads(capsys.readouterr().out)
    assert set(row) == KEYS | COMPILED_KEYS
    assert row["compile_speedup"] == pytest.approx(
        row["compiled_images_per_s"] / row["images_per_s"], rel=0.01
    )
