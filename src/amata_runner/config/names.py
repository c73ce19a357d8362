"""Every name list and fixed fact the config checks use, in one place and free of torch.

The torch-side modules take their lists from here (``runtime/precision.py``, ``data/``,
``control/adaptive.py``, ``control/schedules.py``); the methods and models keep their own
registries (``methods/registry.py``, ``models.MODEL_NAMES``).
"""

from __future__ import annotations

FOLDER_DATASETS = ("caltech256", "imagenet")  # image folders decoded by DataLoader workers
DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10", "synthetic", *FOLDER_DATASETS)
SCHEDULES = ("constant", "linear", "exponential", "step", "adaptive")
ADAPTIVE_MODES = ("monotone", "free")
ADAPTIVE_RULES = ("adequacy", "hamiltonian")
LR_SCHEDULES = ("constant", "multistep", "cosine", "cyclic")
LOGGERS = ("jsonl", "wandb", "tensorboard")
PRECISIONS = ("auto", "fp32", "bf16", "bf16_update")  # what each means: precision.py
NONFINITE_MODES = ("stop", "skip")
AUGMENTS = ("none", "crop_flip", "random_resized_crop")
UNITS = ("epoch", "iteration")

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
# Keys that no longer exist, and where their value lives now (the unknown-key error says so).
MOVED_KEYS = {
    "schedule.k_max": "the schedule anneals from schedule.k_min up to the method's own K: set "
    "method.steps (ATTA's reset period: method.reset)",
}

# Modules to import before any config is composed, comma-separated: a method (or anything else
# that registers itself) that lives outside the package, e.g. AMATA_RUNNER_PLUGINS=my_lab.methods
# with its YAML in a directory on hydra.searchpath.
PLUGINS_ENV = "AMATA_RUNNER_PLUGINS"
