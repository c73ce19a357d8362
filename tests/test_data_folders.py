"""Caltech256 and ImageNet folder trees: real JPEG files in a temp dir, loaded by the real loaders.

Every class is painted one colour, so a decoded crop shows which class it came from and the tests
can check that labels travel with the right pixels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from amata_runner.data import (
    DeviceLoader,
    EvalImages,
    ImageFiles,
    ImageSet,
    StreamingLoader,
    check_available,
    eval_batches,
    eval_subset,
    load_splits,
    make_train_loader,
)
from amata_runner.data.folders import CALTECH_DIR, caltech256_files, split_per_class
from amata_runner.data.streaming import BatchPlan
from amata_runner.errors import ConfigError
from conftest import compose_resolved

COLOURS = [(220, 30, 30), (30, 200, 40), (40, 50, 210), (200, 200, 30)]  # the 4th: one test
CALTECH = ["001.ak47", "002.american-flag", "003.backpack"]
WNIDS = ["n01440764", "n01443537", "n01484850"]
SIZES = [(40, 30), (30, 44), (36, 36), (50, 28), (28, 33), (45, 41), (31, 29)]


def _jpeg(path: Path, colour: tuple[int, int, int], size: tuple[int, int], grey: bool) -> None:
    """The class colour plus a ramp, so crops and flips differ while the mean colour stays."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    ramp = np.linspace(-25, 25, w)[None, :, None] + np.linspace(0, 10, h)[:, None, None]
    pixels = np.clip(np.array(colour, dtype=np.float64) + ramp, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    (image.convert("L") if grey else image).save(path, "JPEG", quality=95)


def write_caltech(root: Path, classes: list[str] = CALTECH, per_class: int = 5) -> Path:
    """torchvision's layout, file names as in the release; one greyscale JPEG per class."""
    for c, name in enumerate(classes):
        for i in range(per_class):
            path = root / CALTECH_DIR / name / f"{c + 1:03d}_{i + 1:04d}.jpg"
            _jpeg(path, COLOURS[c], SIZES[(c + i) % len(SIZES)], grey=i == per_class - 1)
    return root


def write_imagenet(root: Path, train: int = 4, val: int = 2, val_classes: int = 3) -> Path:
    for c, wnid in enumerate(WNIDS):
        for i in range(train):
            _jpeg(root / "train" / wnid / f"{wnid}_{i}.JPEG", COLOURS[c], SIZES[i], grey=False)
        if c < val_classes:
            for i in range(val):
                name = f"ILSVRC2012_val_{c:04d}{i}.JPEG"
                _jpeg(root / "val" / wnid / name, COLOURS[c], SIZES[-1 - i], grey=False)
    return root


def dataset_cfg(name: str, root: Path, **extra: Any) -> DictConfig:
    """What cfg.dataset holds, with crop sizes scaled down for the test."""
    base: dict[str, Any] = {
        "name": name,
        "root": str(root),
        "download": False,
        "num_classes": 3,
        "channels": 3,
        "image_size": 16,
        "resize_size": 20,
        "augment": "crop_flip" if name == "caltech256" else "random_resized_crop",
        "workers": 0,
        "pin_memory": False,
        "persistent_workers": True,
        "prefetch_factor": 2,
        "drop_last": False,
    }
    if name == "caltech256":
        base.update(test_fraction=0.4, split_seed=0)
    return OmegaConf.create({**base, **extra})


def class_of(pixels: torch.Tensor) -> int:
    """The class whose colour is nearest to the image's mean colour (works for uint8 and [0,1])."""
    scale = 255.0 if pixels.dtype == torch.uint8 else 1.0
    mean = pixels.float().mean(dim=(-2, -1)) / scale
    colours = COLOURS[:3]
    grey = bool((mean.max() - mean.min()) < 0.05)
    if grey:  # a greyscale JPEG: compare luminance instead (0.34, 0.51, 0.26)
        luma = [(0.299 * r + 0.587 * g + 0.114 * b) / 255 for r, g, b in colours]
        return min(range(3), key=lambda c: abs(luma[c] - float(mean[0])))
    distances = [float(((mean - torch.tensor(c) / 255) ** 2).sum()) for c in colours]
    return min(range(3), key=distances.__getitem__)


def streaming(data: ImageFiles, **kwargs: Any) -> StreamingLoader:
    options: dict[str, Any] = {"seed": 3, "workers": 0, "pin_memory": False}
    return StreamingLoader(data, 4, "cpu", **{**options, **kwargs})


@pytest.fixture
def caltech(tmp_path: Path) -> DictConfig:
    return dataset_cfg("caltech256", write_caltech(tmp_path / "data"))


@pytest.fixture
def imagenet(tmp_path: Path) -> DictConfig:
    return dataset_cfg("imagenet", write_imagenet(tmp_path / "imagenet"))


# --------------------------------------------------------------------------------------------------
# Loading the trees
# --------------------------------------------------------------------------------------------------


def test_caltech256_classes_labels_shapes_and_pixels(caltech: DictConfig) -> None:
    train, test = load_splits(caltech)
    assert isinstance(train, ImageFiles) and isinstance(test, EvalImages)
    assert train.classes == tuple(CALTECH)
    # floor(5 * 0.4) = 2 test images per class, the other 3 for training
    assert len(train) == 9 and len(test) == 6
    assert torch.bincount(train.labels).tolist() == [3, 3, 3]
    assert torch.bincount(test.labels).tolist() == [2, 2, 2]
    for i in range(len(train)):
        x, y, index = train[i]
        assert (x.dtype, tuple(x.shape), index) == (torch.uint8, (3, 16, 16), i)
        assert CALTECH[y] in train.path(i) and class_of(x) == y  # label, folder and pixels agree
    images, labels = test.subset(range(len(test)))
    assert (images.dtype, tuple(images.shape)) == (torch.uint8, (6, 3, 16, 16))
    assert [class_of(img) for img in images] == labels.tolist()


def test_imagenet_train_and_val_share_the_class_order(tmp_path: Path) -> None:
    # val/ lacks the last class: its images are still labelled by train/'s order
    cfg = dataset_cfg("imagenet", write_imagenet(tmp_path / "in", val_classes=2))
    train, test = load_splits(cfg)
    assert isinstance(train, ImageFiles) and isinstance(test, EvalImages)
    assert train.classes == tuple(WNIDS)
    assert torch.bincount(train.labels).tolist() == [4, 4, 4]
    assert test.labels.tolist() == [0, 0, 1, 1]
    images, labels = test.subset([3, 0])
    assert tuple(images.shape) == (2, 3, 16, 16) and labels.tolist() == [1, 0]
    assert [class_of(img) for img in images] == [1, 0]
    for i in range(len(train)):
        x, y, _ = train[(i, 12345)]  # random-resized crop with a fixed seed
        assert tuple(x.shape) == (3, 16, 16) and class_of(x) == y


def test_training_view_is_random_and_the_evaluation_view_is_not(imagenet: DictConfig) -> None:
    train, test = load_splits(imagenet)
    assert isinstance(train, ImageFiles) and isinstance(test, EvalImages)
    # the same example with the same seed gives the same crop; other seeds give other crops
    assert torch.equal(train[(2, 7)][0], train[(2, 7)][0])
    assert len({train[(2, s)][0].numpy().tobytes() for s in range(8)}) > 1
    first, _ = test.subset(range(len(test)))
    again, _ = test.subset(range(len(test)))
    assert torch.equal(first, again)
    # the seeded transform leaves the process's own random stream where it was
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    train[(0, 99)]
    assert torch.equal(torch.rand(3), expected)


def test_caltech_split_is_stable_a_partition_and_per_class(tmp_path: Path) -> None:
    root = str(write_caltech(tmp_path / "data", per_class=7))
    first = caltech256_files(root, test_fraction=0.3, split_seed=0)
    again = caltech256_files(root, test_fraction=0.3, split_seed=0)
    for a, b in zip(first, again, strict=True):
        assert a.paths.tolist() == b.paths.tolist() and torch.equal(a.labels, b.labels)
    train, test = first
    assert set(train.paths.tolist()).isdisjoint(test.paths.tolist())
    assert len(train) + len(test) == 21
    assert torch.bincount(test.labels).tolist() == [2, 2, 2]  # floor(7 * 0.3)
    other = caltech256_files(root, test_fraction=0.3, split_seed=1)[1]
    assert set(other.paths.tolist()) != set(test.paths.tolist())
    # a class's split ignores the other classes and the listing order
    names = [f"{i:03d}.jpg" for i in range(10)]
    alone = split_per_class(names, "002.american-flag", 0.2, 0)
    assert split_per_class(names[::-1], "002.american-flag", 0.2, 0) == alone
    write_caltech(tmp_path / "data", classes=[*CALTECH, "004.baseball-bat"], per_class=7)
    grown = caltech256_files(root, test_fraction=0.3, split_seed=0)[1]
    assert set(test.paths.tolist()) < set(grown.paths.tolist())


# --------------------------------------------------------------------------------------------------
# The streaming training loader
# --------------------------------------------------------------------------------------------------


def test_streaming_batches_cover_the_epoch_in_range_on_the_device(caltech: DictConfig) -> None:
    train, _ = load_splits(caltech)
    assert isinstance(train, ImageFiles)
    loader = streaming(train)
    assert (len(loader), loader.num_examples) == (3, 9)  # 4 + 4 + 1
    epochs = []
    for _ in range(2):
        seen = []
        for batch in loader:
            assert batch.x.dtype == torch.float32 and tuple(batch.x.shape[1:]) == (3, 16, 16)
            assert float(batch.x.min()) >= 0.0 and float(batch.x.max()) <= 1.0
            assert batch.index.dtype == torch.int64 and batch.y.dtype == torch.int64
            assert torch.equal(batch.y, train.labels[batch.index]) and batch.crop is None
            assert [class_of(x) for x in batch.x] == batch.y.tolist()
            seen += batch.index.tolist()
        assert sorted(seen) == list(range(9))
        epochs.append(seen)
    assert epochs[0] != epochs[1]  # a new order every epoch
    dropping = streaming(train, drop_last=True)
    assert len(dropping) == 2 and [b.x.shape[0] for b in dropping] == [4, 4]


def test_same_seed_same_batches_whatever_the_worker_count(caltech: DictConfig) -> None:
    train, _ = load_splits(caltech)
    assert isinstance(train, ImageFiles)
    inline = [(b.index, b.x) for b in streaming(train)]
    pooled = [(b.index, b.x) for b in streaming(train, workers=1)]
    for (i0, x0), (i1, x1) in zip(inline, pooled, strict=True):
        assert torch.equal(i0, i1) and torch.equal(x0, x1)
    other = [b.index for b in streaming(train, seed=4)]
    assert any(not torch.equal(a, b) for (a, _), b in zip(inline, other, strict=True))


def test_mid_epoch_state_resumes_with_the_uninterrupted_batches(imagenet: DictConfig) -> None:
    train, _ = load_splits(imagenet)
    assert isinstance(train, ImageFiles)
    reference = streaming(train)
    uninterrupted = [[(b.index, b.x) for b in reference] for _ in range(2)]

    stopped = streaming(train)
    list(stopped)  # epoch 0
    iterator = iter(stopped)
    next(iterator)  # one batch of epoch 1, then the run stops
    state = stopped.state_dict()
    assert (state["epoch"], state["position"]) == (1, 1)

    decoded: list[int] = []

    class Counting(ImageFiles):
        def decode(self, index: int, seed: int | None = None) -> torch.Tensor:
            decoded.append(index)
            return super().decode(index, seed)

    resumed = streaming(Counting(train.files, train.transform))
    resumed.load_state_dict(state)
    rest = [(b.index, b.x) for b in resumed]
    assert len(rest) == len(uninterrupted[1]) - 1
    for (i0, x0), (i1, x1) in zip(uninterrupted[1][1:], rest, strict=True):
        assert torch.equal(i0, i1) and torch.equal(x0, x1)
    # the skipped batch was never decoded
    assert sorted(decoded) == sorted(torch.cat([i for i, _ in rest]).tolist())
    assert resumed.state_dict()["epoch"] == 2 and resumed.state_dict()["position"] == 0


def test_loading_leaves_the_global_random_stream_alone(caltech: DictConfig) -> None:
    """A resumed run restores the global RNG mid-epoch: drawing data must not consume it."""
    train, test = load_splits(caltech)
    assert isinstance(train, ImageFiles) and isinstance(test, EvalImages)
    for workers in (0, 1):
        torch.manual_seed(0)
        expected = torch.rand(3)
        torch.manual_seed(0)
        loader = streaming(train, workers=workers)
        for _ in range(2):
            list(loader)
        test.subset([0, 1])
        assert torch.equal(torch.rand(3), expected)


def test_state_between_epochs_and_at_the_last_batch_points_to_the_next_epoch(
    caltech: DictConfig,
) -> None:
    train, _ = load_splits(caltech)
    assert isinstance(train, ImageFiles)
    loader = streaming(train)
    assert loader.state_dict()["epoch"] == 0
    for _ in loader:
        pass
    assert (loader.state_dict()["epoch"], loader.state_dict()["position"]) == (1, 0)
    iterator = iter(loader)
    for _ in range(len(loader)):
        next(iterator)  # the last batch handed out, the loop body still running
    assert (loader.state_dict()["epoch"], loader.state_dict()["position"]) == (2, 0)
    other = streaming(train)
    other.load_state_dict(loader.state_dict())
    assert [b.index.tolist() for b in other] == [b.index.tolist() for b in loader]


def test_resume_refuses_a_tree_that_changed(caltech: DictConfig, tmp_path: Path) -> None:
    train, _ = load_splits(caltech)
    assert isinstance(train, ImageFiles)
    state = streaming(train).state_dict()
    smaller = load_splits(dataset_cfg("caltech256", caltech.root, test_fraction=0.6))[0]
    assert isinstance(smaller, ImageFiles)
    with pytest.raises(ConfigError, match="9 training images"):
        streaming(smaller).load_state_dict(state)


def test_ranks_share_one_permutation_and_split_it() -> None:
    plans = [
        BatchPlan(10, 2, shuffle=True, drop_last=False, seed=5, rank=r, world_size=3)
        for r in range(3)
    ]
    orders = [plan.order(1)[0].tolist() for plan in plans]
    assert all(len(o) == 4 for o in orders) and all(len(p) == 2 for p in plans)
    assert {i for order in orders for i in order} == set(range(10))
    single = BatchPlan(10, 2, shuffle=True, drop_last=False, seed=5).order(1)[0].tolist()
    assert orders[0][:3] == single[0:9:3]


# --------------------------------------------------------------------------------------------------
# The engine's view: one interface for both kinds of data
# --------------------------------------------------------------------------------------------------


def test_eval_images_subset_and_batches_agree(caltech: DictConfig) -> None:
    _, test = load_splits(caltech)
    assert isinstance(test, EvalImages)
    chunks = list(test.batches(4))
    assert [x.shape[0] for x, _ in chunks] == [4, 2]
    images = torch.cat([x for x, _ in chunks])
    subset, labels = test.subset([5, 1, 2])
    assert (
        torch.equal(subset, images[[5, 1, 2]])
        and labels.tolist() == test.labels[[5, 1, 2]].tolist()
    )
    with pytest.raises(TypeError, match="subset"):
        _ = test.images


def test_registry_helpers_take_either_kind(caltech: DictConfig) -> None:
    train, test = load_splits(caltech)
    assert isinstance(make_train_loader(train, caltech, 4, "cpu", seed=0), StreamingLoader)
    small = ImageSet(torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8), torch.arange(5))
    cfg = OmegaConf.create({"augment": "none"})
    assert isinstance(make_train_loader(small, cfg, 2, "cpu", seed=0), DeviceLoader)
    x, y = eval_subset(small, torch.tensor([4, 0]), "cpu")
    assert torch.equal(x, small.images[[4, 0]]) and y.tolist() == [4, 0]
    assert torch.equal(torch.cat([x for x, _ in eval_batches(small, 2, "cpu")]), small.images)
    x, y = eval_subset(test, [1, 3], "cpu")
    assert x.shape == (2, 3, 16, 16) and y.tolist() == test.labels[[1, 3]].tolist()
    folder_all = torch.cat([x for x, _ in eval_batches(test, 4, "cpu")])
    assert torch.equal(folder_all[[1, 3]], x)


# --------------------------------------------------------------------------------------------------
# Missing and malformed trees: one line naming dataset.root
# --------------------------------------------------------------------------------------------------


def _remove_images(folder: Path) -> None:
    for path in folder.iterdir():
        path.unlink()


def _flatten_val(root: Path) -> None:
    for path in list((root / "val").rglob("*.JPEG")):
        path.rename(root / "val" / path.name)
    for folder in (root / "val").iterdir():
        if folder.is_dir():
            folder.rmdir()


MALFORMED = {
    "caltech_missing": ("caltech256", lambda root: None, "no Caltech256 images"),
    "caltech_empty_class": (
        "caltech256",
        lambda root: _remove_images(root / CALTECH_DIR / CALTECH[1]),
        "holds no images",
    ),
    "caltech_extra_class": (
        "caltech256",
        lambda root: (root / CALTECH_DIR / "004.baseball-bat").mkdir(),
        "4 class folders but dataset.num_classes=3",
    ),
    "imagenet_missing": ("imagenet", lambda root: None, "no ImageNet folder"),
    "imagenet_no_val": ("imagenet", lambda root: _remove_tree(root / "val"), "no val/ folder"),
    "imagenet_flat_val": ("imagenet", _flatten_val, "has no class folders"),
    "imagenet_stranger_in_val": (
        "imagenet",
        lambda root: _jpeg(root / "val" / "n99999999" / "x.JPEG", COLOURS[0], (9, 9), False),
        "is not a class of",
    ),
    "imagenet_empty_class": (
        "imagenet",
        lambda root: _remove_images(root / "train" / WNIDS[2]),
        "holds no images",
    ),
}


def _remove_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    folder.rmdir()


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_missing_or_malformed_tree_is_one_line_naming_dataset_root(
    case: str, tmp_path: Path
) -> None:
    name, damage, expected = MALFORMED[case]
    root = tmp_path / "tree"
    if not case.endswith("_missing"):
        (write_caltech if name == "caltech256" else write_imagenet)(root)
    damage(root)
    cfg = dataset_cfg(name, root)
    for check in (check_available, load_splits):
        with pytest.raises(ConfigError) as raised:
            check(cfg)
        message = str(raised.value)
        assert message.startswith(f"dataset.root='{root}'") and "\n" not in message
        assert expected in message


def test_good_trees_pass_and_download_defers_the_check(tmp_path: Path) -> None:
    check_available(dataset_cfg("caltech256", write_caltech(tmp_path / "c")))
    check_available(dataset_cfg("imagenet", write_imagenet(tmp_path / "i")))
    check_available(dataset_cfg("caltech256", tmp_path / "nowhere", download=True))
    with pytest.raises(ConfigError, match=r"dataset\.download=True: ImageNet has no automatic"):
        check_available(dataset_cfg("imagenet", tmp_path / "i", download=True))


def test_bad_sizes_and_augment_name_their_key(caltech: DictConfig) -> None:
    for key, value, name in (
        ("resize_size", 12, "dataset.resize_size"),
        ("augment", "cutmix", "dataset.augment"),
        ("channels", 1, "dataset.channels"),
    ):
        with pytest.raises(ConfigError, match=name):
            load_splits(OmegaConf.merge(caltech, {key: value}))


# --------------------------------------------------------------------------------------------------
# Through the composed config (needs the schemas in config/schema.py)
# --------------------------------------------------------------------------------------------------

SMALL = ["dataset.num_classes=3", "dataset.image_size=16", "dataset.resize_size=20"]


def test_caltech256_composes_with_the_reference_setting(tmp_path: Path) -> None:

    paper = compose_resolved(["dataset=caltech256", "model=resnet18", "method=pgd"]).dataset
    assert (paper.num_classes, paper.image_size, paper.resize_size) == (257, 224, 256)
    assert paper.threat.eps == pytest.approx(8 / 255) and paper.threat.steps == 20
    assert (paper.recipe.epochs, paper.recipe.batch_size, paper.recipe.lr) == (21, 64, 0.01)
    root = write_caltech(tmp_path / "data")
    cfg = compose_resolved(
        ["dataset=caltech256", f"dataset.root={root}", "dataset.test_fraction=0.4", *SMALL]
    )
    check_available(cfg.dataset)
    train, test = load_splits(cfg.dataset)
    assert (len(train), len(test)) == (9, 6)


def test_imagenet_composes_with_the_free_threat_model(tmp_path: Path) -> None:

    paper = compose_resolved(["dataset=imagenet", "model=resnet50", "method=free"]).dataset
    assert (paper.num_classes, paper.augment) == (1000, "random_resized_crop")
    assert paper.threat.eps == pytest.approx(4 / 255)
    root = write_imagenet(tmp_path / "imagenet")
    cfg = compose_resolved(["dataset=imagenet", f"dataset.root={root}", *SMALL])
    check_available(cfg.dataset)
    train, test = load_splits(cfg.dataset)
    assert (len(train), len(test)) == (12, 6)


def test_a_caltech256_run_trains_evaluates_and_resumes_mid_epoch(tmp_path: Path) -> None:
    """The engine on a folder dataset: streaming loader, chunked final evaluation, exact resume."""
    from amata_runner.engine import Trainer
    from amata_runner.runtime.interrupts import Preempted

    root = write_caltech(tmp_path / "data", per_class=10)
    overrides = [
        "dataset=caltech256",
        f"dataset.root={root}",
        *SMALL,
        "dataset.workers=1",
        "model=lenet",
        "method=pgd",
        "dataset.threat.steps=2",
        "epochs=2",
        "batch_size=4",
        "eval.subset=4",
        "eval.validation.size=3",  # one per class held out of the 18 training images
        "eval.final_attacks=[pgd2]",
        "progress=false",
        "deterministic=true",
    ]

    def trainer(run_dir: Path, *extra: str) -> Trainer:
        run_dir.mkdir(parents=True, exist_ok=True)
        return Trainer(compose_resolved([*overrides, *extra]), run_dir)

    reference = trainer(tmp_path / "ref")
    summary = reference.run()
    assert summary["final"]["examples"] == len(reference.parts.test_set)
    assert summary["iterations"] == 2 * len(reference.parts.loader)

    stopped = trainer(tmp_path / "cut")
    original = stopped.parts.method.train_batch
    calls = {"n": 0}

    def train_batch(batch: Any, control: Any) -> Any:
        out = original(batch, control)
        calls["n"] += 1
        if calls["n"] == len(reference.parts.loader) + 2:  # inside epoch 2
            stopped.stop.signum = 15
        return out

    stopped.parts.method.train_batch = train_batch  # type: ignore[method-assign]
    with pytest.raises(Preempted):
        stopped.run()
    resumed = trainer(tmp_path / "cut", "resume=true")
    again = resumed.run()
    assert again["final"] == summary["final"]
    ours, theirs = resumed.parts.model.state_dict(), reference.parts.model.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
