"""Named evaluation attacks and the loop that runs a list of them over a test set.

One grammar names an attack everywhere (``amata-eval attacks=[...]``, a run's final evaluation):
``clean``, ``fgsm``, ``pgd<K>``, ``pgd<K>x<R>``, ``cw_inf``, ``cw_l2``, ``autoattack``.
Everything beyond the name comes from :class:`SuiteOptions`, so a result is identified by its name
plus :func:`attack_params`.

Evaluation is a measurement, so it is made the same way every time, for the final evaluation, for
``amata-eval`` and for the periodic rows (evaluation.py runs this suite on the fixed subset): the
model in eval mode, fp32 (autocast off), parameters frozen, and a dedicated generator for the
random starts, so the training random stream is never touched.  The generator is re-seeded at
every batch from ``(seed, index of the batch's first example)``.  That makes each batch's random
starts independent of which attacks ran before it and of how many restarts an attack draws, so a
run that was killed and resumes at batch b computes exactly what the uninterrupted run would have,
and ``pgdKxR`` with more restarts sees the same first R starts (accuracy monotone in R).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from amata_runner.attacks.autoattack import (
    AUTOATTACK_ATTACKS,
    AUTOATTACK_VERSIONS,
    autoattack_linf,
    load_autoattack,
)
from amata_runner.attacks.cw import CW_L2_INITS, CW_L2_KEEP, cw_l2, cw_linf
from amata_runner.attacks.pgd import attack_mode, frozen_parameters, pgd_linf
from amata_runner.attacks.restarts import pgd_restarts
from amata_runner.errors import ConfigError

GRAMMAR = (
    "clean, fgsm (one sign step of eps from the clean image), pgd<K> (K steps, e.g. pgd20), "
    "pgd<K>x<R> (R random restarts, e.g. pgd50x10), cw_inf, cw_l2, autoattack"
)
_PGD = re.compile(r"^pgd([1-9][0-9]*)(?:x([1-9][0-9]*))?$")
_FIXED = ("clean", "fgsm", "cw_inf", "cw_l2", "autoattack")

# Appendix A's CW constant: "eps" 100 on MNIST (A.1) and 0.5 on CIFAR10 (A.2) in BayesianDefense's
# cw.py.  The MNIST value also serves the MNIST-shaped sets (digits, Fashion-MNIST).
PAPER_CW_L2_C = {"mnist": 100.0, "fashion_mnist": 100.0, "digits": 100.0, "cifar10": 0.5}


@dataclass(frozen=True)
class SuiteOptions:
    """Attack parameters beyond the name; eps and step_size are the run's ``dataset.threat``."""

    eps: float
    step_size: float  # PGD and CW-inf sign-step size
    # pgd<K> from the clean image when false (eval.attack.random_start=false in the periodic rows);
    # restarts are random starts by definition and ignore it.
    pgd_random_start: bool = True
    # FAT/CAT/DAT's CW-inf ("dat" protocol, docs/methods.md, Evaluation attacks): 30 steps,
    # kappa 50, random start; their step 0.031/4 is CIFAR10's threat step 2/255, so the threat
    # step is used.
    cw_inf_steps: int = 30
    cw_inf_kappa: float = 50.0
    # BayesianDefense cw.py (docs/methods.md, Evaluation attacks) with Amata's Appendix A
    # settings: 100 iterations, Adam lr 0.01 (the repo's HEAD), kappa 0, black start; c is 0.5 for
    # CIFAR10 (A.2), 100 for MNIST (A.1): see ``paper_cw_l2_c``.
    cw_l2_c: float = 0.5
    cw_l2_steps: int = 100
    cw_l2_lr: float = 0.01
    cw_l2_kappa: float = 0.0
    cw_l2_init: str = "zero"
    # "final" scores the last iterate, as the reference does.  "best" (the smallest-L2 iterate that
    # fooled the model, Carlini's bookkeeping) suits init=input/random: from the black start the
    # first near-black iterates already "fool" most models (a digits net at c=0.5: 3% accuracy
    # with best, 64.5% with final).
    cw_l2_keep: str = "final"
    # RobustBench's protocol: standard AutoAttack; ``custom`` runs ``autoattack_attacks`` only.
    autoattack_version: str = "standard"
    autoattack_attacks: tuple[str, ...] = ()


def paper_cw_l2_c(dataset: str) -> float:
    """The CW-L2 constant Appendix A used for this dataset (0.5, the CIFAR10 value, otherwise)."""
    return PAPER_CW_L2_C.get(dataset, 0.5)


def check_options(options: SuiteOptions) -> None:
    """One-line ConfigError, keyed by the option's name, for any value out of range."""

    def need(ok: bool, key: str, allowed: str) -> None:
        if not ok:
            raise ConfigError(key, getattr(options, key), allowed)

    need(0 < options.eps <= 1, "eps", "must be in (0, 1] (pixel units, data in [0,1])")
    need(options.step_size > 0, "step_size", "must be > 0")
    need(options.cw_inf_steps >= 1, "cw_inf_steps", "must be >= 1")
    need(options.cw_inf_kappa > 0, "cw_inf_kappa", "must be > 0")
    need(options.cw_l2_c >= 0, "cw_l2_c", "must be >= 0")
    need(options.cw_l2_steps >= 1, "cw_l2_steps", "must be >= 1")
    need(options.cw_l2_lr > 0, "cw_l2_lr", "must be > 0")
    need(options.cw_l2_kappa >= 0, "cw_l2_kappa", "must be >= 0")
    need(options.cw_l2_init in CW_L2_INITS, "cw_l2_init", "allowed: " + ", ".join(CW_L2_INITS))
    need(options.cw_l2_keep in CW_L2_KEEP, "cw_l2_keep", "allowed: " + ", ".join(CW_L2_KEEP))
    versions = ", ".join(AUTOATTACK_VERSIONS)
    need(options.autoattack_version in AUTOATTACK_VERSIONS, "autoattack_version", versions)
    known = all(a in AUTOATTACK_ATTACKS for a in options.autoattack_attacks)
    custom_ok = options.autoattack_version != "custom" or bool(options.autoattack_attacks)
    need(
        known and custom_ok,
        "autoattack_attacks",
        "with autoattack_version=custom, a non-empty list from: " + ", ".join(AUTOATTACK_ATTACKS),
    )


@dataclass(frozen=True)
class Attack:
    """A parsed attack name: ``kind`` is clean, fgsm, pgd, cw_inf, cw_l2 or autoattack."""

    name: str
    kind: str
    steps: int = 0
    restarts: int = 0  # pgd<K>x<R>: R >= 1 restarts of the masked protocol; 0 for plain pgd<K>


def parse_attack(name: Any, key: str = "attacks") -> Attack:
    """Read one name of the grammar, or raise ConfigError naming ``key``, the value and GRAMMAR."""
    text = str(name).strip()
    if text in _FIXED:
        return Attack(text, text)
    match = _PGD.match(text)
    if match is None:
        raise ConfigError(key, name, "attacks are " + GRAMMAR)
    steps, restarts = int(match.group(1)), int(match.group(2) or 0)
    return Attack(text, "pgd", steps=steps, restarts=restarts)


def parse_attacks(names: Sequence[Any], key: str = "attacks") -> list[Attack]:
    """Parse a list of names (duplicates dropped, order kept); an empty list is an error."""
    if isinstance(names, str):
        names = [n for n in names.strip("[]").split(",") if n.strip()]
    attacks: dict[str, Attack] = {}
    for name in names:
        attack = parse_attack(name, key)
        attacks.setdefault(attack.name, attack)
    if not attacks:
        raise ConfigError(key, list(names), "at least one attack: " + GRAMMAR)
    return list(attacks.values())


def attack_params(attack: Attack | str, options: SuiteOptions) -> dict[str, Any]:
    """The parameters that, with the name, determine what the attack computes."""
    attack = parse_attack(attack) if isinstance(attack, str) else attack
    o = options
    if attack.kind == "clean":
        return {}
    if attack.kind == "fgsm":  # Goodfellow et al.: x + eps * sign(grad), no random start
        return {"eps": o.eps, "step_size": o.eps, "steps": 1, "random_start": False}
    if attack.kind == "pgd":
        params: dict[str, Any] = {"eps": o.eps, "step_size": o.step_size, "steps": attack.steps}
        if attack.restarts:
            params["restarts"] = attack.restarts
        params["random_start"] = bool(attack.restarts) or o.pgd_random_start
        return params
    if attack.kind == "cw_inf":
        return {
            "eps": o.eps,
            "step_size": o.step_size,
            "steps": o.cw_inf_steps,
            "kappa": o.cw_inf_kappa,
            "random_start": True,
        }
    if attack.kind == "cw_l2":
        params = {
            "c": o.cw_l2_c,
            "steps": o.cw_l2_steps,
            "lr": o.cw_l2_lr,
            "kappa": o.cw_l2_kappa,
            "init": o.cw_l2_init,
            "keep": o.cw_l2_keep,
        }
        if o.cw_l2_init == "random":
            params["init_radius"] = o.eps
        return params
    params = {"eps": o.eps, "norm": "Linf", "version": o.autoattack_version}
    if o.autoattack_version == "custom":
        params["attacks"] = list(o.autoattack_attacks)
    return params


AttackFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Generator, int], torch.Tensor]


def attack_function(attack: Attack, options: SuiteOptions, batch_size: int) -> AttackFn:
    """``(model, x, y, generator, seed) -> x_adv`` for one parsed attack."""
    o = options
    if attack.kind == "clean":
        return lambda model, x, y, gen, seed: x
    if attack.kind == "fgsm":
        return lambda model, x, y, gen, seed: pgd_linf(
            model, x, y, eps=o.eps, step_size=o.eps, steps=1, random_start=False, generator=gen
        )
    if attack.kind == "pgd" and attack.restarts:
        return lambda model, x, y, gen, seed: pgd_restarts(
            model,
            x,
            y,
            eps=o.eps,
            step_size=o.step_size,
            steps=attack.steps,
            restarts=attack.restarts,
            generator=gen,
        )
    if attack.kind == "pgd":
        return lambda model, x, y, gen, seed: pgd_linf(
            model,
            x,
            y,
            eps=o.eps,
            step_size=o.step_size,
            steps=attack.steps,
            random_start=o.pgd_random_start,
            generator=gen,
        )
    if attack.kind == "cw_inf":
        return lambda model, x, y, gen, seed: cw_linf(
            model,
            x,
            y,
            eps=o.eps,
            step_size=o.step_size,
            steps=o.cw_inf_steps,
            kappa=o.cw_inf_kappa,
            generator=gen,
        )
    if attack.kind == "cw_l2":
        return lambda model, x, y, gen, seed: cw_l2(
            model,
            x,
            y,
            c=o.cw_l2_c,
            steps=o.cw_l2_steps,
            lr=o.cw_l2_lr,
            kappa=o.cw_l2_kappa,
            init=o.cw_l2_init,
            keep=o.cw_l2_keep,
            init_radius=o.eps,
            generator=gen,
        )
    return lambda model, x, y, gen, seed: autoattack_linf(
        model,
        x,
        y,
        eps=o.eps,
        version=o.autoattack_version,
        attacks=o.autoattack_attacks,
        seed=seed,
        batch_size=batch_size,
    )


class ProgressStore(Protocol):
    """Where a long attack leaves its per-batch progress, so a killed evaluation resumes."""

    def load(self, name: str) -> dict[str, Any] | None: ...

    def save(self, name: str, state: dict[str, Any]) -> None: ...


def batch_seed(seed: int, start: int) -> int:
    """The random-start seed of the batch whose first example is ``start`` (fits in 31 bits)."""
    return (seed * 0x9E3779B1 + start * 0x85EBCA77 + 0x27D4EB2F) % (2**31 - 1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_attack(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    attack: Attack,
    options: SuiteOptions,
    *,
    batch_size: int,
    seed: int,
    store: ProgressStore | None = None,
    offset: int = 0,
) -> dict[str, Any]:
    """Accuracy of ``model`` on (uint8 images, labels) under one attack; see :func:`run_suite`.

    ``offset``: the index of ``images[0]`` in the whole test set, when it is one chunk of it (the
    random starts depend on the example's place in the set, not in the chunk)."""
    device = images.device
    n = int(images.shape[0])
    fn = attack_function(attack, options, batch_size)
    generator = torch.Generator(device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    sum_l2 = torch.zeros((), dtype=torch.float64, device=device)
    max_linf = torch.zeros((), device=device)
    begin, seconds = 0, 0.0
    saved = store.load(attack.name) if store is not None else None
    if saved and saved.get("batch_size") == batch_size and saved.get("examples") == n:
        begin, seconds = int(saved["next"]), float(saved["seconds"])
        correct += int(saved["correct"])
        sum_l2 += float(saved["sum_l2"])
        max_linf += float(saved["max_linf"])
    for start in range(begin, n, batch_size):
        _sync(device)
        tic = time.perf_counter()
        x = images[start : start + batch_size].float().div_(255)
        y = labels[start : start + batch_size]
        generator.manual_seed(batch_seed(seed, offset + start))
        x_adv = fn(model, x, y, generator, batch_seed(seed, offset + start))
        with torch.no_grad():
            correct += (model(x_adv).argmax(1) == y).sum()
            diff = (x_adv - x).flatten(1)
            sum_l2 += diff.norm(dim=1).double().sum()
            max_linf.copy_(torch.maximum(max_linf, diff.abs().amax()))
        _sync(device)
        seconds += time.perf_counter() - tic
        if store is not None:
            state = {
                "batch_size": batch_size,
                "examples": n,
                "next": min(start + batch_size, n),
                "correct": int(correct.item()),
                "sum_l2": float(sum_l2.item()),
                "max_linf": float(max_linf.item()),
                "seconds": seconds,
            }
            store.save(attack.name, state)
    hits = int(correct.item())
    return {
        "accuracy": hits / n,
        "correct": hits,
        "examples": n,
        "seconds": seconds,
        "max_linf": float(max_linf.item()),
        "mean_l2": float(sum_l2.item()) / n,
        "params": attack_params(attack, options),
    }


def merge_results(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One attack's results over consecutive chunks of a test set, as if run in one piece."""
    examples = sum(p["examples"] for p in parts)
    correct = sum(p["correct"] for p in parts)
    return {
        "accuracy": correct / examples,
        "correct": correct,
        "examples": examples,
        "seconds": sum(p["seconds"] for p in parts),
        "max_linf": max(p["max_linf"] for p in parts),
        "mean_l2": sum(p["mean_l2"] * p["examples"] for p in parts) / examples,
        "params": parts[0]["params"],
    }


def run_suite(
    model: nn.Module,
    images_uint8: torch.Tensor,
    labels: torch.Tensor,
    names: Sequence[str],
    options: SuiteOptions,
    *,
    batch_size: int,
    seed: int,
    store: ProgressStore | None = None,
    on_result: Callable[[str, dict[str, Any]], None] | None = None,
    offset: int = 0,
) -> dict[str, dict[str, Any]]:
    """Run each named attack over the whole set; ``{name: {accuracy, correct, examples, ...}}``.

    ``images_uint8`` (N,C,H,W) and ``labels`` live on the model's device.  Each result has
    ``accuracy``, ``correct``, ``examples``, ``seconds`` (attack and forward, device-synchronised),
    ``max_linf`` and ``mean_l2`` (distance of the examples it scored) and ``params``.  Names are all
    checked (and AutoAttack imported) before any work.  ``store`` receives per-batch progress and
    is consulted to resume; ``on_result`` is called as each attack finishes.
    """
    attacks = parse_attacks(names)
    check_options(options)
    if batch_size < 1:
        raise ConfigError("batch_size", batch_size, "must be >= 1")
    if any(a.kind == "autoattack" for a in attacks):
        load_autoattack()
    results: dict[str, dict[str, Any]] = {}
    autocast_off = torch.autocast(images_uint8.device.type, enabled=False)
    with attack_mode(model, "eval"), frozen_parameters(model), autocast_off:
        for attack in attacks:
            result = run_attack(
                model,
                images_uint8,
                labels,
                attack,
                options,
                batch_size=batch_size,
                seed=seed,
                store=store,
                offset=offset,
            )
            results[attack.name] = result
            if on_result is not None:
                on_result(attack.name, result)
    return results
