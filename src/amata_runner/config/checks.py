"""Range and consistency checks of a normalised run config: they read, they never write.

Each raises a one-line :class:`~amata_runner.errors.ConfigError` naming the key, the value and
what is allowed.  They run on the output of ``normalise.py`` (interpolations resolved, fraction
budgets already floats, derived defaults filled), so what they check is what the run will use.
"""

from __future__ import annotations

import importlib.util
import os
import re

from omegaconf import DictConfig, OmegaConf

from amata_runner.checks import (
    at_least,
    at_most,
    finite,
    increasing_epochs,
    one_of,
    positive_budget,
    require,
    whole_number,
)
from amata_runner.config.names import (
    ADAPTIVE_MODES,
    ADAPTIVE_RULES,
    AUGMENTS,
    DATASETS,
    DIGITS_IMAGES,
    FOLDER_DATASETS,
    IN_MEMORY_IMAGES,
    KNOWN_CLASS_COUNTS,
    LOGGERS,
    LR_SCHEDULES,
    MAX_BATCH,
    MAX_DATASET_BYTES,
    MAX_EPOCHS,
    NAME_PATTERN,
    NONFINITE_MODES,
    PRECISIONS,
    SCHEDULES,
    UNITS,
    WANDB_MODES,
)
from amata_runner.config.schema import RunConfig, register_methods
from amata_runner.control.criterion_config import check_criterion
from amata_runner.errors import ConfigError


def validate(cfg: DictConfig) -> None:
    """Range and consistency checks of a normalised config; they read and never write."""
    _check_run(cfg)
    _check_dataset(cfg)
    from amata_runner.models import MODEL_NAMES  # the builders' registry (imports torch)

    one_of(cfg, "model.name", MODEL_NAMES)
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

    register_methods()
    one_of(cfg, "method.name", method_names())
    spec = method_spec(cfg.method.name)
    spec.check(cfg)
    if not spec.scheduled:
        return

    one_of(cfg, "schedule.name", SCHEDULES)
    one_of(cfg, "schedule.unit", UNITS)
    one_of(cfg, "schedule.endpoint", ("paper", "inclusive"))
    adaptive = cfg.schedule.name == "adaptive"
    knob, k_max = spec.method.knob, spec.k_max(cfg)
    k_min = cfg.schedule.k_min
    if not (adaptive and k_min == "auto"):
        whole_number(cfg, "schedule.k_min", "an integer >= 1" + (" or auto" if adaptive else ""))
        at_least(cfg, "schedule.k_min", 1)
    if k_min != "auto":
        towards = f"method.{knob}" if knob else f"{spec.name} anneals no K, which stays 1"
        require(k_min <= k_max, "schedule.k_min", k_min, f"must be <= {k_max} ({towards})")
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
    increasing_epochs(cfg, "optim.milestones")
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
            "a non-empty list of integers >= 1 (null: k_min up to the method's K)",
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
