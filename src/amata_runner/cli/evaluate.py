"""``amata-eval``: strong evaluation of a checkpoint the runner wrote, saved in ``eval.json``.

    amata-eval ckpt=outputs/runs/.../best.ckpt attacks=[clean,pgd20,pgd100,cw_inf,cw_l2,autoattack]

A run directory means its ``last.ckpt`` (the final model, not selected); ``best.ckpt`` (the epoch
with the highest validation robust accuracy, never chosen on test images) only when named. The
tool prints which checkpoint it evaluates and eval.json records it (``checkpoint_selection``).
The model is rebuilt from the run's own saved config and evaluated on the run's test split (the
first ``n_examples``, default all) under the run's threat model (``dataset.threat``, unless
``eps=``/``step_size=`` are given; a new eps alone scales the step with it).  Evaluations are
expensive, so ``eval.json`` beside the checkpoint is a cache that only grows:

- each result is stored under its attack name plus everything that determines it (parameters,
  n_examples, seed, checkpoint file and epoch); an attack already there is skipped (``force=true``
  recomputes it), other entries are never dropped;
- an attack running over many batches saves its counts after every batch, so a killed evaluation
  resumes at the batch where it stopped (the suite seeds each batch on its own, so the resumed
  result equals an uninterrupted one);
- the file is replaced atomically, so a crash leaves the previous version.

Top-level fields follow RobustBench's leaderboard entries for the latest invocation: ``clean_acc``
and ``autoattack_acc`` in percent (as RobustBench writes them), ``eps``, ``norm``,
``architecture``, ``dataset``, ``n_examples``; ``threat_model`` adds the step size.  Accuracies in
``results`` are fractions, as in summary.json.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, open_dict

from amata_runner.attacks.autoattack import load_autoattack
from amata_runner.attacks.suite import (
    Attack,
    SuiteOptions,
    attack_params,
    check_options,
    paper_cw_l2_c,
    parse_attacks,
    run_suite,
)
from amata_runner.checks import as_float
from amata_runner.cli.options import parse_options, run_tool
from amata_runner.errors import ConfigError
from amata_runner.logging.metrics import write_json_atomic
from amata_runner.runtime.device import select_device

TOOL = "amata-eval"
EVAL_FORMAT = 1
# The paper's Table 2 columns: clean accuracy, PGD-20, CW (BayesianDefense's CW-L2).
DEFAULT_ATTACKS = ("clean", "pgd20", "cw_l2")


@dataclass
class EvalOptions:
    ckpt: str = MISSING  # a run's last.ckpt / best.ckpt, or its run directory (its last.ckpt)
    attacks: Any = field(default_factory=lambda: list(DEFAULT_ATTACKS))
    # clean, fgsm, pgdK (pgdKxR: R restarts), cw_inf, cw_l2, autoattack; run in this order
    n_examples: int | None = None  # the first N test examples; default: the whole test split
    batch_size: int = 500  # examples per attack batch
    device: str = "auto"  # auto (CUDA when there is a GPU), cpu, cuda, cuda:N
    seed: int = 0  # seeds every batch's random start (a resumed evaluation gives the same result)
    eps: Any = None  # default: the run's dataset.threat.eps; fractions such as 8/255 work
    step_size: Any = None  # default: the run's dataset.threat.step_size (scaled with eps=)
    cw_inf_steps: int = SuiteOptions.cw_inf_steps  # CW-inf: PGD steps on the CW margin loss
    cw_inf_kappa: float = SuiteOptions.cw_inf_kappa  # CW-inf: margin confidence kappa
    cw_l2_c: Any = None  # default: the paper's value for the run's dataset (Appendix A)
    cw_l2_steps: int = SuiteOptions.cw_l2_steps  # CW-L2: Adam steps
    cw_l2_lr: float = SuiteOptions.cw_l2_lr  # CW-L2: Adam learning rate
    cw_l2_kappa: float = SuiteOptions.cw_l2_kappa  # CW-L2: margin confidence kappa
    cw_l2_init: str = SuiteOptions.cw_l2_init  # CW-L2: where the search starts
    cw_l2_keep: str = SuiteOptions.cw_l2_keep  # CW-L2: which iterate counts as the attack
    autoattack_version: str = SuiteOptions.autoattack_version  # AutoAttack's version preset
    autoattack_attacks: Any = field(default_factory=list)  # with version=custom: its attacks
    dataset_root: str | None = None  # where the test data is, if not where the run found it
    output: str | None = None  # default: eval.json beside the checkpoint
    force: bool = False  # recompute attacks already in eval.json


def _names(value: Any) -> list[str]:
    if isinstance(value, str):
        return [n.strip() for n in value.strip("[]").split(",") if n.strip()]
    return [str(v) for v in value]


def suite_options(opts: DictConfig, run_cfg: DictConfig) -> SuiteOptions:
    """The attack parameters: the command line where given, else the run's threat model."""
    threat = run_cfg.dataset.threat
    run_eps, run_step = as_float("eps", threat.eps), as_float("step_size", threat.step_size)
    eps = run_eps if opts.eps is None else as_float("eps", opts.eps)
    # A new eps alone keeps the run's step-to-eps ratio (CIFAR10 8/255 with 2/255 -> 16/255 with
    # 4/255), so a larger ball is not searched with a step made for a smaller one.
    if opts.step_size is None:
        step_size = run_step if opts.eps is None else run_step * eps / run_eps
    else:
        step_size = as_float("step_size", opts.step_size)
    c = paper_cw_l2_c(run_cfg.dataset.name) if opts.cw_l2_c is None else opts.cw_l2_c
    options = SuiteOptions(
        eps=eps,
        step_size=step_size,
        cw_inf_steps=opts.cw_inf_steps,
        cw_inf_kappa=opts.cw_inf_kappa,
        cw_l2_c=as_float("cw_l2_c", c),
        cw_l2_steps=opts.cw_l2_steps,
        cw_l2_lr=opts.cw_l2_lr,
        cw_l2_kappa=opts.cw_l2_kappa,
        cw_l2_init=opts.cw_l2_init,
        cw_l2_keep=opts.cw_l2_keep,
        autoattack_version=opts.autoattack_version,
        autoattack_attacks=tuple(_names(opts.autoattack_attacks)),
    )
    check_options(options)
    return options


def result_key(identity: dict[str, Any]) -> str:
    """``<attack>-<digest>``: readable, and distinct for every setting that changes the number."""
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return f"{identity['attack']}-{hashlib.sha1(canonical.encode()).hexdigest()[:10]}"


class EvalFile:
    """eval.json: finished results and per-batch progress, rewritten atomically on every change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {"format": EVAL_FORMAT, "results": {}, "partial": {}}
        if path.exists():
            try:
                loaded = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as exc:
                raise ConfigError(
                    "output", str(path), f"an eval.json this tool can extend (unreadable: {exc})"
                ) from exc
            if not isinstance(loaded, dict) or not isinstance(loaded.get("results", {}), dict):
                raise ConfigError("output", str(path), "an eval.json written by amata-eval")
            self.data.update(loaded)
            self.data.setdefault("results", {})
            self.data.setdefault("partial", {})
        self.keys: dict[str, str] = {}  # attack name -> result key, for this invocation

    @property
    def results(self) -> dict[str, Any]:
        return self.data["results"]

    def write(self) -> None:
        # Headline fields first, then the results and any unfinished attack's progress.
        tail = ("results", "partial")
        payload = {k: v for k, v in self.data.items() if k not in tail}
        payload.update({k: self.data[k] for k in tail})
        write_json_atomic(self.path, payload)

    # ProgressStore, used by run_suite
    def load(self, name: str) -> dict[str, Any] | None:
        return self.data["partial"].get(self.keys[name])

    def save(self, name: str, state: dict[str, Any]) -> None:
        self.data["partial"][self.keys[name]] = state
        self.write()


def _eps_text(eps: float) -> str:
    """A budget as people write it: ``0.3`` on MNIST, ``8/255`` (RobustBench's form) on CIFAR10."""
    text = f"{eps:.6g}"
    k = round(eps * 255)
    if len(text) > 5 and k > 0 and abs(eps - k / 255) < 1e-9:
        return f"{k}/255"
    return text


def _print_table(rows: list[tuple[str, dict[str, Any], str]]) -> None:
    header = ("attack", "accuracy", "error", "examples", "seconds", "")
    lines = [header]
    for name, result, note in rows:
        acc = result["accuracy"]
        lines.append(
            (
                name,
                f"{100 * acc:.2f}%",
                f"{100 * (1 - acc):.2f}%",
                str(result["examples"]),
                f"{result['seconds']:.1f}",
                note,
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        cells = [line[0].ljust(widths[0])]
        cells += [cell.rjust(width) for cell, width in zip(line[1:5], widths[1:5], strict=True)]
        print("  ".join([*cells, line[5]]).rstrip())


def evaluate_checkpoint(argv: Sequence[str]) -> dict[str, Any]:
    """The body of ``amata-eval``; returns the eval.json payload it wrote."""
    opts = parse_options(EvalOptions, argv)
    attacks: list[Attack] = parse_attacks(_names(opts.attacks))
    if opts.batch_size < 1:
        raise ConfigError("batch_size", opts.batch_size, "must be >= 1")
    device = select_device(opts.device)
    if any(a.kind == "autoattack" for a in attacks):
        load_autoattack()  # a missing optional extra stops here, before any loading or work

    from amata_runner.data import eval_subset, load_splits
    from amata_runner.runtime.run_files import load_trained

    trained = load_trained(opts.ckpt, device)
    run_cfg = trained.cfg
    options = suite_options(opts, run_cfg)
    if opts.dataset_root is not None:
        with open_dict(run_cfg):
            run_cfg.dataset.root = opts.dataset_root
    _, test = load_splits(run_cfg.dataset)
    total = len(test.labels)
    n = total if opts.n_examples is None else opts.n_examples
    if not 1 <= n <= total:
        raise ConfigError("n_examples", opts.n_examples, f"must be in 1..{total} (the test split)")
    print(f"{TOOL}: evaluating {trained.path} ({trained.selection})", file=sys.stderr)
    images, labels = eval_subset(test, range(n), device)  # folder sets: decodes n images

    out = Path(opts.output) if opts.output else trained.path.parent / "eval.json"
    store = EvalFile(out)
    epoch = trained.state.get("progress", {}).get("epoch")

    def identity(attack: Attack | str) -> dict[str, Any]:
        return {
            "attack": attack if isinstance(attack, str) else attack.name,
            "params": attack_params(attack, options),
            "n_examples": n,
            "seed": opts.seed,
            "checkpoint": trained.path.name,
            "checkpoint_epoch": epoch,
        }

    rows: list[tuple[str, dict[str, Any], str]] = []
    for attack in attacks:
        key = result_key(identity(attack))
        store.keys[attack.name] = key
        done = store.results.get(key)
        if done is not None and not opts.force:
            print(f"{TOOL}: {attack.name}: already in {out.name}, skipped", file=sys.stderr)
            rows.append((attack.name, done, "(cached)"))
            continue
        if opts.force:
            store.data["partial"].pop(key, None)
        print(f"{TOOL}: running {attack.name} on {n} examples", file=sys.stderr)
        result = run_suite(
            trained.model,
            images,
            labels,
            [attack.name],
            options,
            batch_size=opts.batch_size,
            seed=opts.seed,
            store=store,
        )[attack.name]
        entry = {**identity(attack), **result, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        store.results[key] = entry
        store.data["partial"].pop(key, None)
        store.write()
        rows.append((attack.name, entry, ""))

    # The headline fields describe this checkpoint and setting: clean and AutoAttack accuracy come
    # from this invocation or from an earlier one with the same parameters.
    by_name = {name: result for name, result, _ in rows}
    for name in ("clean", "autoattack"):
        earlier = store.results.get(result_key(identity(name)))
        if name not in by_name and earlier is not None:
            by_name[name] = earlier
    store.data.pop("autoattack_acc", None)
    store.data.update(_robustbench_fields(run_cfg, trained.path, epoch, options, n, by_name))
    store.data["checkpoint_selection"] = trained.selection
    store.write()
    _print_table(rows)
    print(f"{TOOL}: wrote {out}", file=sys.stderr)
    return store.data


def _robustbench_fields(
    cfg: DictConfig,
    ckpt: Path,
    epoch: int | None,
    options: SuiteOptions,
    n: int,
    results: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    def percent(name: str) -> float | None:
        return round(100 * results[name]["accuracy"], 2) if name in results else None

    fields: dict[str, Any] = {
        "checkpoint": str(ckpt),
        "checkpoint_epoch": epoch,
        "architecture": cfg.model.name,
        "dataset": cfg.dataset.name,
        "method": cfg.method.name,
        "additional_data": False,
        "norm": "Linf",
        "eps": _eps_text(options.eps),
        "threat_model": {"norm": "Linf", "eps": options.eps, "step_size": options.step_size},
        "n_examples": n,
        "clean_acc": percent("clean"),
    }
    if "autoattack" in results:
        fields["autoattack_acc"] = percent("autoattack")
    return fields


def main(argv: Sequence[str] | None = None) -> None:
    try:
        run_tool(TOOL, evaluate_checkpoint, argv, schema=EvalOptions, doc=__doc__)
    except KeyboardInterrupt:
        print(
            f"{TOOL}: interrupted; finished batches are in eval.json, rerun to resume",
            file=sys.stderr,
        )
        sys.exit(130)


if __name__ == "__main__":
    main()
