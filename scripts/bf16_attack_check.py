"""How much weaker is a PGD attack run under bf16 autocast than the same attack in fp32?

For each trained run (a run directory or checkpoint), on its test images: the fraction of input-
gradient signs that bf16 autocast gets the same as fp32 (over pixels where the fp32 gradient is
non-zero), and the robust accuracy under the run's own training attack (K steps of step_size at
eps, the model in eval mode, the same random start) computed in fp32 and in bf16.  A higher
robust accuracy under the bf16 attack means the bf16 attack is weaker: that is what precision=bf16
would train against.  One JSON line per run.

    python scripts/bf16_attack_check.py outputs/multirun/DATE/TIME/0 [more runs] [--images 512]
"""

from __future__ import annotations

import argparse
import json
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from amata_runner.attacks.pgd import attack_mode, pgd_linf
from amata_runner.data import eval_subset, load_run_data
from amata_runner.runtime.run_files import load_trained


def autocast(device: torch.device, bf16: bool) -> torch.autocast | nullcontext[None]:
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def input_grad_sign(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, bf16: bool
) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    with autocast(x.device, bf16):
        loss = F.cross_entropy(model(x), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x)
    return grad.float().sign()


def check(path: str, images: int, device: torch.device) -> dict[str, object]:
    run = load_trained(path, device)
    cfg, model = run.cfg, run.model
    for p in model.parameters():
        p.requires_grad_(False)
    test = load_run_data(cfg).test
    n = min(images, len(test))
    x_u8, y = eval_subset(test, torch.arange(n), device)
    x = x_u8.float().div(255)
    eps, step, steps = (float(cfg.method[k]) for k in ("eps", "step_size", "steps"))
    row: dict[str, object] = {
        "run": str(run.run_dir),
        "method": cfg.method.name,
        "trained_precision": cfg.precision,
        "images": n,
        "attack": f"pgd{int(steps)} eps={eps:.4g} step={step:.4g}",
    }
    with attack_mode(model, "eval"):
        fp32, bf16 = input_grad_sign(model, x, y, False), input_grad_sign(model, x, y, True)
        nonzero = fp32 != 0
        row["grad_sign_agreement"] = round(float((fp32 == bf16)[nonzero].float().mean()), 4)
        for name, use_bf16 in (("fp32", False), ("bf16", True)):
            generator = torch.Generator(device=device).manual_seed(0)
            with autocast(device, use_bf16):
                x_adv = pgd_linf(
                    model,
                    x,
                    y,
                    eps=eps,
                    step_size=step,
                    steps=int(steps),
                    generator=generator,
                )
            with torch.no_grad():
                robust = (model(x_adv).argmax(1) == y).float().mean()
            row[f"robust_acc_{name}_attack"] = round(float(robust), 4)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories or checkpoints")
    parser.add_argument("--images", type=int, default=512, help="test images per run")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    for path in args.runs:
        print(json.dumps(check(path, args.images, device)), flush=True)


if __name__ == "__main__":
    main()
