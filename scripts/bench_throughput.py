"""Throughput of the runner's own training step against a plain reference-style loop.

The only source of speed claims in this project. For each case it builds the *project's* step the
way ``amata-run`` does (the method from its composed config, bf16 autocast and channels_last on
CUDA, frozen parameters during the attack, device-resident batches) and a *reference* loop written
here the way public reference repositories write it (fp32, NCHW, eager, model in train mode during
the attack, ``loss.backward()`` inside the attack so parameter gradients are formed and thrown
away). Both run in the same process on the same random data, so the printed ratio is free of
machine-to-machine noise. One JSON line per case, stable keys, so results can be diffed over time.

    python scripts/bench_throughput.py --method pgd --model preactresnet18 --shape 3x32x32 \
        --batch 128 --steps 10 --iters 50
    python scripts/bench_throughput.py --amata 2,10,100 --model preactresnet18 --shape 3x32x32

``--compile both`` also times the project's step with ``compile=true`` (torch.compile; inductor on
the CPU, CUDA graphs on CUDA) in the same alternating rounds and prints ``compiled_images_per_s``
and ``compile_speedup`` (compiled over eager images/s); ``--compile on`` times only the compiled
step as "ours".  Compilation happens in the warm-up, outside the timed rounds.

Distance to the hardware limit: every case prints ``model_flop_per_s`` (the model's forward +
backward FLOPs per image, counted once with ``torch.utils.flop_counter``, times the passes the step
made, per second) and ``peak_fraction``, that over ``peak_flop_per_s``, the dense-matmul rate this
device reaches in the same precision, measured in the same run.  The convention is the usual
"model FLOPs utilisation": each pass is costed as a full forward + backward (weight and input
gradients), although an attack's backward forms input gradients only, so the figure is the useful
model work per second, comparable between a laptop CPU and an H100.

``--amata KMIN,KMAX,EPOCHS`` times the project's PGD step at every K in [KMIN, KMAX] and projects
the total train time of Amata's linear schedule (Algorithm 1) against PGD-KMAX over EPOCHS epochs
of 50k images, printing that ratio (the paper's claim: about 0.6).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from amata_runner.cli import config_dir
from amata_runner.config import register_schemas, resolve_config
from amata_runner.control.schedules import Control
from amata_runner.data.loader import Batch
from amata_runner.methods import TrainContext, build_method
from amata_runner.runtime.nonfinite import GuardedSGD
from amata_runner.runtime.passes import PassCounter
from amata_runner.runtime.precision import Precision, maybe_compile, training_precision
from amata_runner.runtime.run_files import build_model_for

EPOCH_IMAGES = 50_000
REFERENCE_KINDS = {"erm": "clean", "free": "free", "amata_free": "free", "fast": "fgsm_rs"}


@dataclass(frozen=True)
class Case:
    method: str
    model: str
    channels: int
    size: int
    classes: int
    batch: int
    steps: int
    precision: str  # fp32 | bf16 | bf16_update (the project's; the reference is fp32)
    iters: int
    warmup: int
    rounds: int
    device: torch.device
    compile: str = "off"  # off | on | both (time eager and compiled)


def compose_run(case: Case) -> Any:
    """The resolved run config ``amata-run`` would build for this case (synthetic data)."""
    overrides = [
        f"method={case.method}",
        f"model={case.model}",
        "dataset=synthetic",
        f"dataset.channels={case.channels}",
        f"dataset.image_size={case.size}",
        f"dataset.num_classes={case.classes}",
        f"batch_size={case.batch}",
        f"dataset.threat.steps={case.steps}",
        "dataset.threat.eps=0.03137",
        "dataset.threat.step_size=0.00784",
        "device=" + case.device.type,
        "precision=" + case.precision,
    ]
    register_schemas()
    with initialize_config_dir(version_base="1.3", config_dir=config_dir(), job_name="bench"):
        return resolve_config(compose(config_name="config", overrides=overrides))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(steps: dict[str, Callable[[int], None]], case: Case) -> dict[str, tuple[float, float]]:
    """Median seconds per iteration and peak device MiB of each step, measured in alternation.

    Rounds alternate between the steps (A, B, A, B, ...), so a machine that speeds up or slows
    down during the run (clock boost, another process) affects both sides alike.
    """
    for step in steps.values():
        for i in range(case.warmup):
            step(i)
    samples: dict[str, list[float]] = {name: [] for name in steps}
    peaks: dict[str, float] = dict.fromkeys(steps, 0.0)
    per_round = max(1, case.iters // case.rounds)
    for _ in range(case.rounds):
        for name, step in steps.items():
            synchronize(case.device)
            if case.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(case.device)
            start = time.perf_counter()
            for i in range(per_round):
                step(i)
            synchronize(case.device)
            samples[name].append((time.perf_counter() - start) / per_round)
            if case.device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(case.device) / 2**20
                peaks[name] = max(peaks[name], peak)
    return {name: (statistics.median(samples[name]), peaks[name]) for name in steps}


def project_step(
    case: Case,
    data: tuple[torch.Tensor, torch.Tensor],
    compiled: bool = False,
    counter: PassCounter | None = None,
) -> Callable[[int], None]:
    cfg = compose_run(case)
    torch.manual_seed(0)
    model = build_model_for(cfg, case.device)
    optimizer = GuardedSGD(
        model.parameters(), lr=cfg.optim.lr, momentum=0.9, weight_decay=cfg.optim.weight_decay
    )
    precision = Precision(case.precision, case.device)
    ctx = TrainContext(
        model=maybe_compile(model, compiled, case.device),
        optimizer=optimizer,
        counter=PassCounter() if counter is None else counter,
        autocast=precision.update,
        attack_autocast=precision.attack,
        device=case.device,
        num_train=case.batch * 4,
        image_shape=(case.channels, case.size, case.size),
        num_classes=case.classes,
        iters_per_epoch=4,
        epochs=1,
    )
    method = build_method(cfg.method, ctx)
    model.train()
    method.start_epoch(0, None)
    control = Control(case.steps, float(cfg.method.get("step_size", 0.0)), 1.0)
    images, labels = data
    index = torch.arange(case.batch, device=case.device)

    def step(i: int) -> None:
        offset = (i % 4) * case.batch
        x = images[offset : offset + case.batch]
        if case.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        batch = Batch(x, labels[offset : offset + case.batch], index + offset, None)
        method.train_batch(batch, control)

    return step


def reference_step(
    case: Case, data: tuple[torch.Tensor, torch.Tensor], counter: PassCounter | None = None
) -> Callable[[int], None]:
    """The loop as reference repos write it: fp32, NCHW, eager, weight grads in the attack."""
    counter = PassCounter() if counter is None else counter
    cfg = compose_run(case)
    torch.manual_seed(0)
    model = build_model_for(cfg, torch.device("cpu")).to(case.device)  # NCHW, fp32
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=0.9)
    eps, alpha, kind = 8 / 255, 2 / 255, REFERENCE_KINDS.get(case.method, "pgd")
    images, labels = data
    carried = torch.zeros_like(images[: case.batch])  # Free's perturbation across batches

    def update(x: torch.Tensor, y: torch.Tensor) -> None:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        counter.add(x.shape[0])

    def step(i: int) -> None:
        offset = (i % 4) * case.batch
        x, y = images[offset : offset + case.batch], labels[offset : offset + case.batch]
        model.train()
        if kind == "clean":
            update(x, y)
            return
        if kind == "free":
            for _ in range(case.steps):
                delta = carried.clone().requires_grad_(True)
                optimizer.zero_grad()
                F.cross_entropy(model((x + delta).clamp(0, 1)), y).backward()
                optimizer.step()
                counter.add(case.batch)
                carried.copy_((delta + eps * delta.grad.sign()).clamp(-eps, eps).detach())
            return
        delta = torch.empty_like(x).uniform_(-eps, eps)
        steps, size = (1, 1.25 * eps) if kind == "fgsm_rs" else (case.steps, alpha)
        for _ in range(steps):
            delta.requires_grad_(True)
            loss = F.cross_entropy(model((x + delta).clamp(0, 1)), y)
            loss.backward()  # the reference's way: parameter gradients formed and discarded
            delta = (delta + size * delta.grad.sign()).clamp(-eps, eps).detach()
            counter.add(case.batch)
        update((x + delta).clamp(0, 1), y)

    return step


def make_data(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    shape = (4 * case.batch, case.channels, case.size, case.size)
    images = torch.rand(shape, generator=generator).to(case.device)
    labels = torch.randint(0, case.classes, (4 * case.batch,), generator=generator)
    return images, labels.to(case.device)


def environment(case: Case) -> dict[str, Any]:
    device = torch.cuda.get_device_name(case.device) if case.device.type == "cuda" else "cpu"
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def model_flops(case: Case) -> tuple[float, float]:
    """FLOPs of one forward and of one full backward (weights and input) per image.

    Counted by ``torch.utils.flop_counter`` (matmuls and convolutions; elementwise work is not
    counted) on a small batch on the CPU: the count is linear in the batch and the same on every
    device and in every precision.
    """
    from torch.utils.flop_counter import FlopCounterMode

    cfg = compose_run(Case(**{**case.__dict__, "device": torch.device("cpu")}))
    model = build_model_for(cfg, torch.device("cpu")).train()
    n = 2
    x = torch.rand(n, case.channels, case.size, case.size, requires_grad=True)
    y = torch.arange(n) % case.classes
    with FlopCounterMode(display=False) as forward:
        loss = F.cross_entropy(model(x), y)
    with FlopCounterMode(display=False) as backward:
        loss.backward()
    return forward.get_total_flops() / n, backward.get_total_flops() / n


def matmul_peak(case: Case) -> float:
    return _matmul_peak(case.device, torch.bfloat16 if case.precision == "bf16" else torch.float32)


@functools.cache
def _matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """The dense-matmul FLOP/s this device reaches in the attack's precision, measured now.

    bf16 for precision=bf16, fp32 otherwise (the attack's passes dominate a PGD step, and
    bf16_update attacks in fp32); on CUDA fp32 matmuls use TF32, as the training step does.
    Best of several timed trials of square matmuls, so it is an achievable ceiling; measured once
    per process for each device and dtype.
    """
    n = 8192 if device.type == "cuda" else 1024
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=generator).to(device, dtype)
    b = torch.randn(n, n, generator=generator).to(device, dtype)
    reps = 20 if device.type == "cuda" else 2
    best = math.inf
    for trial in range(6):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        synchronize(device)
        if trial:  # the first trial is a warm-up
            best = min(best, (time.perf_counter() - start) / reps)
    return 2 * n**3 / best


def run_case(case: Case) -> dict[str, Any]:
    data = make_data(case)
    counters = {"ours": PassCounter(), "compiled": PassCounter(), "ref": PassCounter()}
    steps: dict[str, Callable[[int], None]] = {}
    if case.compile in ("off", "both"):
        steps["ours"] = project_step(case, data, counter=counters["ours"])
    if case.compile in ("on", "both"):
        name = "compiled" if case.compile == "both" else "ours"
        steps[name] = project_step(case, data, compiled=True, counter=counters[name])
    steps["ref"] = reference_step(case, data, counter=counters["ref"])
    calls = dict.fromkeys(steps, 0)

    def counted(name: str, step: Callable[[int], None]) -> Callable[[int], None]:
        def call(i: int) -> None:
            calls[name] += 1
            step(i)

        return call

    times = timed({name: counted(name, step) for name, step in steps.items()}, case)
    forward_flops, backward_flops = model_flops(case)
    peak = matmul_peak(case)

    def flop_per_s(name: str) -> float:
        counter = counters[name]
        per_step = (counter.forward * forward_flops + counter.backward * backward_flops) / max(
            calls[name], 1
        )
        return per_step / times[name][0]

    (ours, ours_peak), (theirs, theirs_peak) = times["ours"], times["ref"]
    row: dict[str, Any] = {
        **environment(case),
        "method": case.method,
        "model": case.model,
        "shape": f"{case.channels}x{case.size}x{case.size}",
        "batch": case.batch,
        "steps": case.steps,
        "precision": case.precision,
        "compile": case.compile == "on",
        "reference": REFERENCE_KINDS.get(case.method, "pgd") + " fp32 nchw eager",
        "iters": case.iters,
        "images_per_s": round(case.batch / ours, 3),
        "reference_images_per_s": round(case.batch / theirs, 3),
        "ratio": round(theirs / ours, 3),
        "s_per_50k_epoch": round(EPOCH_IMAGES / case.batch * ours, 3),
        "reference_s_per_50k_epoch": round(EPOCH_IMAGES / case.batch * theirs, 3),
        "peak_mem_mib": round(ours_peak, 1),
        "reference_peak_mem_mib": round(theirs_peak, 1),
        "model_gflop_per_image": round((forward_flops + backward_flops) / 1e9, 6),
        "passes_per_step": round(counters["ours"].forward / max(calls["ours"], 1) / case.batch, 3),
        "model_flop_per_s": float(f"{flop_per_s('ours'):.4g}"),
        "reference_model_flop_per_s": float(f"{flop_per_s('ref'):.4g}"),
        "peak_flop_per_s": float(f"{peak:.4g}"),
        "peak_dtype": "bf16" if case.precision == "bf16" else "fp32",
        "peak_fraction": round(flop_per_s("ours") / peak, 4),
        "reference_peak_fraction": round(flop_per_s("ref") / peak, 4),
    }
    if case.compile == "both":
        compiled = times["compiled"][0]
        row["compiled_images_per_s"] = round(case.batch / compiled, 3)
        row["compile_speedup"] = round(ours / compiled, 3)
        row["compiled_model_flop_per_s"] = float(f"{flop_per_s('compiled'):.4g}")
        row["compiled_peak_fraction"] = round(flop_per_s("compiled") / peak, 4)
        row["compiled_peak_mem_mib"] = round(times["compiled"][1], 1)
    return row


def amata_projection(case: Case, k_min: int, k_max: int, epochs: int) -> dict[str, Any]:
    """Project Amata's total train time from the measured cost of each K (Algorithm 1's K_t)."""
    data = make_data(case)
    steps = {
        str(k): project_step(Case(**{**case.__dict__, "steps": k}), data, case.compile == "on")
        for k in range(k_min, k_max + 1)
    }
    per_k = {int(k): seconds for k, (seconds, _) in timed(steps, case).items()}
    iters = math.ceil(EPOCH_IMAGES / case.batch)
    schedule = [math.floor(k_min + (k_max - k_min) * t / epochs + 0.5) for t in range(epochs)]
    amata = sum(per_k[k] * iters for k in schedule)
    pgd = per_k[k_max] * iters * epochs
    return {
        **environment(case),
        "method": "amata_vs_pgd",
        "model": case.model,
        "shape": f"{case.channels}x{case.size}x{case.size}",
        "batch": case.batch,
        "precision": case.precision,
        "compile": case.compile == "on",
        "k_min": k_min,
        "k_max": k_max,
        "epochs": epochs,
        "s_per_iter_by_k": {str(k): round(v, 6) for k, v in per_k.items()},
        "amata_train_s": round(amata, 2),
        "pgd_train_s": round(pgd, 2),
        "ratio": round(amata / pgd, 4),
    }


def parse(argv: list[str]) -> tuple[Case, str | None]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="pgd")
    parser.add_argument("--model", default="preactresnet18")
    parser.add_argument("--shape", default="3x32x32", help="CxHxW (H = W)")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="K (PGD steps; Free's replays m)")
    parser.add_argument(
        "--precision", choices=("auto", "fp32", "bf16", "bf16_update"), default="auto"
    )
    parser.add_argument(
        "--compile",
        choices=("off", "on", "both"),
        default="off",
        help="time the eager step, the compiled one (torch.compile), or both side by side",
    )
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5, help="alternating timing rounds")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amata", default=None, help="KMIN,KMAX,EPOCHS: project Amata vs PGD")
    args = parser.parse_args(argv)
    channels, height, width = (int(v) for v in args.shape.lower().split("x"))
    if height != width:
        parser.error(f"--shape {args.shape}: square images only")
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    precision = training_precision(args.precision, device)
    if args.amata and args.compile == "both":
        parser.error("--amata times one step per K: use --compile on or off with it")
    case = Case(
        method=args.method,
        model=args.model,
        channels=channels,
        size=height,
        classes=args.classes,
        batch=args.batch,
        steps=args.steps,
        precision=precision,
        iters=args.iters,
        warmup=args.warmup,
        rounds=args.rounds,
        device=device,
        compile=args.compile,
    )
    return case, args.amata


def main(argv: list[str] | None = None) -> None:
    case, amata = parse(sys.argv[1:] if argv is None else argv)
    if case.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if amata:
        k_min, k_max, epochs = (int(v) for v in amata.split(","))
        result = amata_projection(case, k_min, k_max, epochs)
    else:
        result = run_case(case)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
