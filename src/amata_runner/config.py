"""Config schemas (registered in Hydra's ConfigStore) and the range checks Hydra cannot express.

Each YAML option in ``conf/`` lists its schema first, so a typo'd key or a wrong type fails while
the config is composed.  Ranges and cross-field rules (K_min <= K_max, eps > 0, ...) are checked by
:func:`validate`, which raises :class:`~amata_runner.errors.ConfigError` naming the key, the value
and what is allowed.  Budgets may be typed as fractions (``method.eps=8/255``), so those fields are
``Any`` in the schema and turned into floats by :func:`resolve_config`.
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf, open_dict

from amata_runner import method_configs
from amata_runner.checks import (
    at_least,
    at_most,
    finite,
    one_of,
    positive_budget,
    require,
    whole_number,
)
from amata_runner.control.criterion_config import CriterionConfig, check_criterion
from amata_runner.errors import ConfigError

FOLDER_DATASETS = ("caltech256", "imagenet")  # image folders decoded by DataLoader workers
DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10", "synthetic", *FOLDER_DATASETS)
MODELS = ("lenet", "smallcnn", "preactresnet18", "resnet18", "resnet50", "wrn28_10", "wrn34_10")
SCHEDULES = ("constant", "linear", "exponential", "step", "adaptive")
ADAPTIVE_MODES = ("monotone", "free")
ADAPTIVE_RULES = ("adequacy", "hamiltonian")
LR_SCHEDULES = ("constant", "multistep", "cosine", "cyclic")
LOGGERS = ("jsonl", "wandb", "tensorboard")
PRECISIONS = ("auto", "fp32", "bf16", "bf16_update")  # what each means: precision.py
NONFINITE_MODES = ("stop", "skip")
AUGMENTS = ("none", "crop_flip", "random_resized_crop")
UNITS = ("epoch", "iteration")


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
    k_min: Any = "${oc.select:method.steps,1}"  # an integer; schedule=adaptive also takes "auto"
    k_max: int = "${oc.select:method.steps,1}"  # type: ignore[assignment]
    tau: Any = None
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

    _register_methods()
    schemas = {spec.name: spec.config for spec in base_specs()}
    return {**method_configs.SCHEMAS, **schemas}  # TRANSITION


def _register_methods() -> None:
    """Import the methods package, whose modules register themselves (this loads torch, so it
    happens only once a config is composed or checked, never when this module is imported)."""
    import amata_runner.methods  # noqa: F401


def resolve_config(cfg: DictConfig) -> DictConfig:
    """Resolve interpolations, turn fractions into floats and check every range; return the copy.

    Working on a resolved copy means every later reader sees plain numbers, and the run's saved
    config records exactly the values that were used.
    """
    try:
        resolved = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    except Exception as exc:  # an interpolation to a key that does not exist
        raise ConfigError(getattr(exc, "full_key", "config"), "", str(exc).splitlines()[0]) from exc
    with open_dict(resolved):
        validate(resolved)
    return resolved


def validate(cfg: DictConfig) -> None:
    """Range and consistency checks; fraction budgets are replaced by floats in place."""
    _check_run(cfg)
    _check_dataset(cfg)
    require(cfg.model.name in MODELS, "model.name", cfg.model.name, "allowed: " + ", ".join(MODELS))
    _check_method_and_schedule(cfg)
    _check_optim(cfg)
    _check_eval(cfg)
    one_of(cfg, "logger.name", LOGGERS)
    if cfg.logger.name == "wandb":
        mode = cfg.logger.mode
        require(
            mode is None or mode in WANDB_MODES,
            "logger.mode",
            mode,
            "allowed: null (W&B decides), " + ", ".join(WANDB_MODES),
        )
        require(
            importlib.util.find_spec("wandb") is not None,
            "logger",
            "wandb",
            "wandb is not installed; pip install 'amata-runner[wandb]' or use logger=jsonl",
        )
    if cfg.logger.name == "tensorboard":
        require(
            importlib.util.find_spec("tensorboard") is not None,
            "logger",
            "tensorboard",
            "tensorboard is not installed; pip install 'amata-runner[tensorboard]' or use "
            "logger=jsonl",
        )


# Facts about the built-in datasets, for checks made before any data is loaded.
KNOWN_CLASS_COUNTS = {"digits": 10, "mnist": 10, "fashion_mnist": 10, "cifar10": 10}
DIGITS_IMAGES = 1797
IN_MEMORY_IMAGES = {
    "digits": DIGITS_IMAGES,
    "mnist": 70_000,
    "fashion_mnist": 70_000,
    "cifar10": 60_000,
}

# Upper bounds that only catch typos (an extra zero or two): no real run comes near them.
MAX_EPOCHS = 100_000
MAX_BATCH = 1 << 20
MAX_DATASET_BYTES = 1 << 36  # 64 GiB of uint8 images for a generated (synthetic) dataset
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.,+=@-]{0,99}"
WANDB_MODES = ("online", "offline", "disabled", "shared")


def _check_run(cfg: DictConfig) -> None:
    unknown = sorted(set(cfg.keys()) - set(RunConfig.__dataclass_fields__))
    require(
        not unknown,
        unknown[0] if unknown else "",
        cfg.get(unknown[0]) if unknown else None,
        "unknown top-level key; allowed: " + ", ".join(RunConfig.__dataclass_fields__),
    )
    at_least(cfg, "epochs", 1)
    at_most(cfg, "epochs", MAX_EPOCHS, "a typo?")
    at_least(cfg, "batch_size", 1)
    at_most(cfg, "batch_size", MAX_BATCH, "a typo?")
    at_least(cfg, "seed", 0)
    require(
        re.fullmatch(NAME_PATTERN, str(cfg.name)) is not None,
        "name",
        cfg.name,
        "1-100 characters from A-Z a-z 0-9 _ . , + = @ -, not starting with a dot "
        "(it becomes part of the run directory's name)",
    )
    one_of(cfg, "precision", PRECISIONS)
    one_of(cfg, "nonfinite", NONFINITE_MODES)
    limit = cfg.nonfinite_skip_limit
    require(
        isinstance(limit, (int, float)) and 0 <= limit <= 1,
        "nonfinite_skip_limit",
        limit,
        "must be a fraction in [0, 1]",
    )
    require(
        cfg.resume in (True, False, "auto"),
        "resume",
        cfg.resume,
        "allowed: true, false, auto (continue when a checkpoint exists)",
    )
    device = str(cfg.device)
    require(
        re.fullmatch(r"auto|cpu|cuda(:\d+)?", device) is not None,
        "device",
        device,
        "allowed: auto, cpu, cuda, cuda:N",
    )
    if device.startswith("cuda"):
        import torch

        require(
            torch.cuda.is_available(),
            "device",
            device,
            "no CUDA device is available here; use device=auto or device=cpu",
        )


def _check_dataset(cfg: DictConfig) -> None:
    one_of(cfg, "dataset.name", DATASETS)
    at_least(cfg, "dataset.num_classes", 2)
    at_least(cfg, "dataset.channels", 1)
    at_least(cfg, "dataset.image_size", 8)
    one_of(cfg, "dataset.augment", AUGMENTS)
    for stat in ("mean", "std"):
        values = cfg.dataset[stat]
        if values is not None:
            finite(cfg, f"dataset.{stat}")
            require(
                len(values) == cfg.dataset.channels,
                f"dataset.{stat}",
                list(values),
                f"needs one entry per channel ({cfg.dataset.channels})",
            )
    if cfg.dataset.std is not None:
        require(all(s > 0 for s in cfg.dataset.std), "dataset.std", list(cfg.dataset.std), "> 0")
    _check_folder_dataset(cfg)
    positive_budget(cfg, "dataset.threat.eps", upper=1.0)
    positive_budget(cfg, "dataset.threat.step_size")
    at_least(cfg, "dataset.threat.steps", 1)
    known_classes = KNOWN_CLASS_COUNTS.get(cfg.dataset.name)
    require(
        known_classes is None or cfg.dataset.num_classes == known_classes,
        "dataset.num_classes",
        cfg.dataset.num_classes,
        f"{cfg.dataset.name} has {known_classes} classes",
    )
    if cfg.dataset.name == "digits":
        fraction = cfg.dataset.test_fraction
        test = round(DIGITS_IMAGES * fraction) if 0 < fraction < 1 else 0
        require(
            0 < fraction < 1 and 1 <= test < DIGITS_IMAGES,
            "dataset.test_fraction",
            fraction,
            f"must be in (0, 1) and leave at least one of the {DIGITS_IMAGES} digits on each side",
        )
    _check_memory(cfg)
    if cfg.dataset.name == "synthetic":
        at_least(cfg, "dataset.num_train", 1)
        at_least(cfg, "dataset.num_test", 1)
        ds = cfg.dataset
        size = (ds.num_train + ds.num_test) * ds.channels * ds.image_size**2
        require(
            size <= MAX_DATASET_BYTES,
            "dataset.image_size",
            ds.image_size,
            f"{ds.num_train + ds.num_test} images of {ds.channels}x{ds.image_size}x"
            f"{ds.image_size} need {size / 2**30:.0f} GiB; at most 64 GiB",
        )


def _check_memory(cfg: DictConfig) -> None:
    """Refuse image sizes whose data or single batch cannot fit in this machine's memory.

    The small sets are decoded into host memory as uint8 at ``dataset.image_size`` before they
    move to the device, and every set makes float32 batches of that size. The sum is compared
    with the host's RAM: a lower bound on what the run needs, enough to catch a typo such as
    image_size=20000 in a line instead of an allocation traceback."""
    ds = cfg.dataset
    pixels = ds.channels * ds.image_size**2
    held = IN_MEMORY_IMAGES.get(ds.name)
    if ds.name == "synthetic":
        held = ds.num_train + ds.num_test
    batch_bytes = max(cfg.batch_size, 1) * pixels * 4
    need = (held or 0) * pixels + batch_bytes
    available = _physical_memory()
    if available is not None and need > available:
        what = f"{held} images of" if held else "one batch of"
        raise ConfigError(
            "dataset.image_size",
            ds.image_size,
            f"{what} {ds.channels}x{ds.image_size}x{ds.image_size} need about "
            f"{need / 2**30:.1f} GiB, more than this machine's {available / 2**30:.1f} GiB",
        )


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _check_method_and_schedule(cfg: DictConfig) -> None:
    from amata_runner.methods.registry import method_names, method_spec

    _register_methods()
    one_of(cfg, "method.name", method_names())
    spec = method_spec(cfg.method.name)
    spec.check(cfg)
    check = method_configs.CHECKS.get(spec.name)  # TRANSITION
    if check is not None and not hasattr(spec.config, "check"):
        check(cfg)
    if not spec.scheduled:
        return

    one_of(cfg, "schedule.name", SCHEDULES)
    one_of(cfg, "schedule.unit", UNITS)
    one_of(cfg, "schedule.endpoint", ("paper", "inclusive"))
    adaptive = cfg.schedule.name == "adaptive"
    k_min, k_max = cfg.schedule.k_min, cfg.schedule.k_max
    if not (adaptive and k_min == "auto"):
        whole_number(cfg, "schedule.k_min", "an integer >= 1" + (" or auto" if adaptive else ""))
        at_least(cfg, "schedule.k_min", 1)
    at_least(cfg, "schedule.k_max", 1)
    if k_min != "auto":
        require(k_min <= k_max, "schedule.k_min", k_min, f"must be <= schedule.k_max ({k_max})")
    if cfg.schedule.tau is not None:
        positive_budget(cfg, "schedule.tau")
    if cfg.schedule.name == "exponential":
        require(cfg.schedule.eta > 0, "schedule.eta", cfg.schedule.eta, "must be > 0")
    if cfg.schedule.name == "adaptive":
        _check_adaptive(cfg)
    if cfg.schedule.name == "step":
        switch = cfg.schedule.switch
        require(0 <= switch <= cfg.epochs, "schedule.switch", switch, "must be in [0, epochs]")


def _check_optim(cfg: DictConfig) -> None:
    finite(cfg, "optim.lr")
    finite(cfg, "optim.weight_decay")
    require(cfg.optim.lr > 0, "optim.lr", cfg.optim.lr, "must be > 0")
    require(0 <= cfg.optim.momentum < 1, "optim.momentum", cfg.optim.momentum, "must be in [0, 1)")
    at_least(cfg, "optim.weight_decay", 0)
    one_of(cfg, "optim.lr_schedule", LR_SCHEDULES)
    milestones = list(cfg.optim.milestones)
    require(
        all(m > 0 for m in milestones) and milestones == sorted(set(milestones)),
        "optim.milestones",
        milestones,
        "must be strictly increasing positive epochs",
    )
    require(0 < cfg.optim.gamma <= 1, "optim.gamma", cfg.optim.gamma, "must be in (0, 1]")


def _check_folder_dataset(cfg: DictConfig) -> None:
    ds = cfg.dataset
    if ds.name not in FOLDER_DATASETS:
        require(
            ds.augment != "random_resized_crop",
            "dataset.augment",
            ds.augment,
            "random_resized_crop is for caltech256/imagenet; allowed: none, crop_flip",
        )
        return
    require(ds.channels == 3, "dataset.channels", ds.channels, f"{ds.name} images are RGB: use 3")
    require(
        ds.resize_size >= ds.image_size,
        "dataset.resize_size",
        ds.resize_size,
        f"must be >= dataset.image_size ({ds.image_size})",
    )
    at_least(cfg, "dataset.workers", 0)
    at_least(cfg, "dataset.prefetch_factor", 1)
    if ds.name == "caltech256":
        fraction = ds.test_fraction
        require(0 < fraction < 1, "dataset.test_fraction", fraction, "must be in (0, 1)")
    require(
        cfg.method.name not in ("atta", "amata_atta"),
        "method.name",
        cfg.method.name,
        "ATTA keeps a perturbation per training image in the un-augmented frame: not available "
        "for caltech256/imagenet",
    )
    for key, enabled in (
        ("eval.criterion.enabled", cfg.eval.criterion.enabled),
        ("schedule.name", cfg.schedule.name == "adaptive"),
    ):
        require(
            not enabled,
            key,
            OmegaConf.select(cfg, key),
            "its probe batches need an in-memory training set: not available for "
            "caltech256/imagenet",
        )


def _check_adaptive(cfg: DictConfig) -> None:
    s = cfg.schedule
    one_of(cfg, "schedule.rule", ADAPTIVE_RULES)
    require(s.gamma >= 0, "schedule.gamma", s.gamma, "must be >= 0")
    require(0 <= s.epsilon < 1, "schedule.epsilon", s.epsilon, "must be in [0, 1)")
    require(0 < s.budget <= 1, "schedule.budget", s.budget, "must be in (0, 1]")
    if s.every != "auto":
        whole_number(cfg, "schedule.every", "an integer >= 1 or auto")
        at_least(cfg, "schedule.every", 1)
    one_of(cfg, "schedule.mode", ADAPTIVE_MODES)
    at_least(cfg, "schedule.probe_batches", 1)
    if s.probe_batch_size is not None:
        at_least(cfg, "schedule.probe_batch_size", 1)
    if s.candidates is not None:
        candidates = list(s.candidates)
        require(
            len(candidates) > 0 and all(isinstance(k, int) and k >= 1 for k in candidates),
            "schedule.candidates",
            candidates,
            "a non-empty list of integers >= 1 (null: k_min..k_max)",
        )


def _check_eval(cfg: DictConfig) -> None:
    at_least(cfg, "eval.every", 1)
    one_of(cfg, "eval.unit", UNITS)
    at_least(cfg, "eval.subset", 1)
    at_least(cfg, "eval.batch_size", 1)
    at_least(cfg, "eval.attack.steps", 1)
    for attack in ("eval.attack", "eval.final_threat"):
        positive_budget(cfg, f"{attack}.eps", upper=1.0)
        positive_budget(cfg, f"{attack}.step_size")
    from amata_runner.attacks.suite import parse_attacks  # torch: only once a run is checked

    require(
        len(cfg.eval.final_attacks) > 0 or not cfg.eval.final,
        "eval.final_attacks",
        list(cfg.eval.final_attacks),
        "at least one attack when eval.final=true",
    )
    parse_attacks(list(cfg.eval.final_attacks), key="eval.final_attacks")
    check_criterion(cfg)
    size = cfg.eval.validation.size
    require(
        not isinstance(size, bool)
        and (
            (isinstance(size, int) and size >= 0)
            or (isinstance(size, float) and (0.0 < size < 1.0 or size == 0.0))
        ),
        "eval.validation.size",
        size,
        "a number of training images (an integer >= 1), a fraction of the training split (a float "
        "strictly between 0 and 1), or 0 for no validation split",
    )
    train = _known_train_images(cfg)
    if isinstance(size, int) and train is not None:
        require(
            size < train,
            "eval.validation.size",
            size,
            f"holds out {size} of the {train} training images, leaving none to train on; use a "
            "smaller count or a fraction",
        )
    for key in ("eval.target_robust_errors", "eval.target_clean_errors"):
        targets = list(OmegaConf.select(cfg, key))
        require(all(0 <= t <= 1 for t in targets), key, targets, "errors must be in [0, 1]")


def _known_train_images(cfg: DictConfig) -> int | None:
    """The training split's size where it is known before loading (None for folder sets)."""
    ds = cfg.dataset
    if ds.name == "digits":
        return DIGITS_IMAGES - round(DIGITS_IMAGES * float(ds.test_fraction))
    if ds.name == "synthetic":
        return int(ds.num_train)
    known = {"mnist": 60_000, "fashion_mnist": 60_000, "cifar10": 50_000}
    return known.get(ds.name)
