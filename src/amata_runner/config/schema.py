"""The config schemas, registered in Hydra's ConfigStore under ``schema/<group>/<name>``.

Each YAML option in ``conf/`` lists its schema first, so a typo'd key or a wrong type fails while
the config is composed.  Budgets may be typed as fractions (``method.eps=8/255``), so those fields
are ``Any`` here; ``normalise.py`` turns them into floats once, and ``checks.py`` checks ranges.
Each method's schema lives in its own module (``methods/``) and reaches the store through the
method registry.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from amata_runner.config.names import PLUGINS_ENV
from amata_runner.control.criterion_config import CriterionConfig
from amata_runner.errors import ConfigError


# --------------------------------------------------------------------------- schemas
@dataclass
class ThreatConfig:
    """The dataset's customary L-inf threat model, used as the default of every attack."""

    eps: Any = 0.3
    step_size: Any = 0.01
    steps: int = 40


@dataclass
class RecipeConfig:
    """The dataset's customary training recipe (the paper's Appendix A where it has one)."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    lr_milestones: list[int] = field(default_factory=list)
    target_robust_errors: list[float] = field(default_factory=list)
    cyclic_lr: float = 0.2  # peak of the cyclic (Fast) LR schedule
    # eval.validation.size's default: training images held out to choose checkpoints on
    validation: Any = 1000


@dataclass
class DatasetConfig:
    name: str = MISSING
    root: str = "${paths.data_dir}"
    download: bool = False
    num_classes: int = 10
    channels: int = 1
    image_size: int = 28
    mean: list[float] | None = None
    std: list[float] | None = None
    augment: str = "none"
    threat: ThreatConfig = field(default_factory=ThreatConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)


@dataclass
class DigitsConfig(DatasetConfig):
    test_fraction: float = 0.2
    split_seed: int = 0


@dataclass
class SyntheticConfig(DatasetConfig):
    num_train: int = 2048
    num_test: int = 512
    seed: int = 0


@dataclass
class FolderDatasetConfig(DatasetConfig):
    """Image folders decoded by DataLoader workers (data/folders.py, data/streaming.py)."""

    resize_size: int = 256
    workers: int = 8
    pin_memory: bool = True
    persistent_workers: bool = True
    prefetch_factor: int = 2
    drop_last: bool = False


@dataclass
class Caltech256Config(FolderDatasetConfig):
    test_fraction: float = 0.2
    split_seed: int = 0


@dataclass
class ModelConfig:
    name: str = MISSING
    normalize: bool = True


@dataclass
class ScheduleConfig:
    """How the inner-loop control (K, alpha = tau / K) moves with training progress."""

    name: str = "constant"
    # K_t runs from k_min up to K_max, the method's own K (``Method.knob``: method.steps for PGD,
    # TRADES, MART, Free's and YOPO's m; method.reset for ATTA).  null: K_max (no annealing);
    # schedule=adaptive also takes "auto".
    k_min: Any = None
    tau: Any = None  # K * alpha; null: method.step_size * K_max (the last control: the baseline's)
    eta: float = 1.0
    unit: str = "epoch"
    endpoint: str = "paper"
    switch: int = 0
    # schedule=adaptive only (adaptive.py, conf/schedule/adaptive.yaml says what each key means).
    rule: str = "adequacy"
    epsilon: float = 0.05
    budget: float = 0.05
    gamma: float = 0.04
    candidates: list[int] | None = None
    every: Any = "auto"  # an integer, or auto (spaced so the probe costs at most `budget`)
    mode: str = "monotone"
    probe_batches: int = 2
    probe_batch_size: int | None = None
    probe_seed: int = 0


@dataclass
class OptimConfig:
    name: str = "sgd"
    lr: float = "${dataset.recipe.lr}"  # type: ignore[assignment]
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    lr_schedule: str = "multistep"
    milestones: list[int] = "${dataset.recipe.lr_milestones}"  # type: ignore[assignment]
    gamma: float = 0.1
    cycle_momentum: bool = False


@dataclass
class EvalAttackConfig:
    """An L-inf PGD evaluation attack (cross-entropy, eval-mode model, fp32)."""

    steps: int = 20
    step_size: Any = "${dataset.threat.step_size}"
    eps: Any = "${dataset.threat.eps}"
    random_start: bool = True


@dataclass
class FinalThreatConfig:
    eps: Any = "${dataset.threat.eps}"
    step_size: Any = "${dataset.threat.step_size}"


@dataclass
class ValidationConfig:
    """Training images held out to choose best.ckpt on (data/validation.py): a count, a fraction
    of the training split, or 0 (none: no best.ckpt); drawn per class by ``seed``."""

    size: Any = "${dataset.recipe.validation}"
    seed: int = 0


@dataclass
class EvalConfig:
    every: int = 1
    unit: str = "epoch"
    subset: int = 1000
    batch_size: int = 500
    seed: int = 0
    attack: EvalAttackConfig = field(default_factory=EvalAttackConfig)
    final: bool = True
    # The final evaluation on the whole test set: attack names (attacks/suite.py's grammar: clean,
    # pgd<K>, pgd<K>x<R>, cw_inf, cw_l2, autoattack) under the threat model final_threat.
    final_attacks: list[str] = field(default_factory=lambda: ["pgd20"])
    final_threat: FinalThreatConfig = field(default_factory=lambda: FinalThreatConfig())
    # The optimal-control criterion C (paper eq. 14) at epoch ends: criterion_config.py.
    criterion: CriterionConfig = field(default_factory=CriterionConfig)
    target_robust_errors: list[float] = "${dataset.recipe.target_robust_errors}"  # type: ignore[assignment]
    target_clean_errors: list[float] = field(default_factory=list)
    validation: ValidationConfig = field(default_factory=ValidationConfig)


@dataclass
class JsonlLoggerConfig:
    """metrics.jsonl is always written; this option adds nothing else."""

    name: str = "jsonl"


@dataclass
class WandbLoggerConfig:
    name: str = "wandb"
    project: str = "amata-runner"
    entity: str | None = None
    mode: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class TensorboardLoggerConfig:
    """TensorBoard event files in <run dir>/tensorboard/, on top of metrics.jsonl."""

    name: str = "tensorboard"


@dataclass
class PathsConfig:
    data_dir: str = "data"
    output_dir: str = "outputs"


@dataclass
class RunConfig:
    """The root: groups are filled by the defaults list; the rest are run-level switches."""

    dataset: Any = MISSING
    model: Any = MISSING
    method: Any = MISSING
    schedule: Any = MISSING
    optim: Any = MISSING
    eval: Any = MISSING
    logger: Any = MISSING
    paths: Any = MISSING
    name: str = "run"
    seed: int = 0
    epochs: int = "${dataset.recipe.epochs}"  # type: ignore[assignment]
    batch_size: int = "${dataset.recipe.batch_size}"  # type: ignore[assignment]
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False  # torch.compile of the training step's forward/backward (precision.py)
    deterministic: bool = False
    # true: continue last.ckpt; auto: continue it when there is one, else start (cluster
    # requeues, which rerun the same command line); false: refuse to touch an existing run.
    resume: Any = False
    progress: bool | None = None
    save_best: bool = True
    # Free-form blocks of experiment configs (conf/experiment): the published numbers a run is
    # compared with, and how amata-report tabulates it. The runner itself does not read them.
    paper: Any = None
    report: Any = None
    nonfinite: str = "stop"  # a NaN/Inf loss: stop (keep the last good checkpoint) or skip the step
    # nonfinite=skip fails the run once more than this fraction of its optimiser steps was refused
    nonfinite_skip_limit: float = 0.25


def register_schemas() -> None:
    """Store the schemas where the YAML defaults lists look for them (``/schema/<group>``)."""
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    groups: dict[str, dict[str, type]] = {
        "dataset": {
            "digits": DigitsConfig,
            "synthetic": SyntheticConfig,
            "caltech256": Caltech256Config,
            "imagenet": FolderDatasetConfig,
            "base": DatasetConfig,
        },
        "model": {"base": ModelConfig},
        "method": _method_schemas(),
        "schedule": {"base": ScheduleConfig},
        "optim": {"sgd": OptimConfig},
        "eval": {"base": EvalConfig},
        "logger": {
            "jsonl": JsonlLoggerConfig,
            "wandb": WandbLoggerConfig,
            "tensorboard": TensorboardLoggerConfig,
        },
        "paths": {"base": PathsConfig},
    }
    for group, options in groups.items():
        for name, node in options.items():
            cs.store(group=f"schema/{group}", name=name, node=node)


def _method_schemas() -> dict[str, type]:
    """Each registered method's typed config (methods/registry.py)."""
    from amata_runner.methods.registry import base_specs

    register_methods()
    return {spec.name: spec.config for spec in base_specs()}


def register_methods() -> None:
    """Import the methods package, whose modules register themselves, and the plugins named in
    ``AMATA_RUNNER_PLUGINS``.  This loads torch, so it happens once a config is composed or
    checked, never when this module is imported."""
    import amata_runner.methods  # noqa: F401

    for name in filter(None, (n.strip() for n in os.environ.get(PLUGINS_ENV, "").split(","))):
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(
                PLUGINS_ENV, name, f"cannot import it ({exc}); is its directory on PYTHONPATH?"
            ) from exc
