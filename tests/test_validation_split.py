"""The validation split (eval.validation): held-out training images that choose best.ckpt.

Validation images never reach a training batch (in-memory and folder sets, one process or a rank
of several); best.ckpt follows the validation images and ignores the test images; a resumption
keeps the split and refuses a different one; Fast's early-stop check reads validation images;
amata-eval takes last.ckpt unless best.ckpt is named, and says which it evaluates.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from amata_runner import build
from amata_runner.data import (
    EvalImages,
    ImageFiles,
    ImageSet,
    RunData,
    ValidationSplit,
    load_run_data,
    load_splits,
    make_train_loader,
    split_validation,
)
from amata_runner.data.validation import stratified_indices, validation_count
from amata_runner.engine import Trainer
from amata_runner.errors import ConfigError
from amata_runner.methods.fast import Fast, FastConfig
from amata_runner.runtime.run_files import load_trained
from conftest import compose_resolved, cpu_context
from test_data_folders import dataset_cfg, write_caltech

# A tiny learnable run: 640 synthetic 16x16 images (64 of them held out), ERM, three epochs, a
# one-step attack of small eps so robust accuracy follows learning; no final evaluation.
TINY = [
    "dataset=synthetic",
    "dataset.num_train=640",
    "dataset.num_test=64",
    "dataset.image_size=16",
    "model=lenet",
    "method=erm",
    "epochs=3",
    "batch_size=32",
    "optim.lr=0.05",
    "eval.subset=64",
    "eval.validation.size=64",
    "eval.attack.steps=1",
    "dataset.threat.eps=0.02",
    "dataset.threat.step_size=0.02",
    "eval.final=false",
    "progress=false",
]


def coded_set(n: int, num_classes: int = 5) -> ImageSet:
    """Images whose first two pixels spell their own index, so a batch says where it came from."""
    images = torch.zeros(n, 1, 4, 4, dtype=torch.uint8)
    index = torch.arange(n)
    images[:, 0, 0, 0] = (index // 256).to(torch.uint8)
    images[:, 0, 0, 1] = (index % 256).to(torch.uint8)
    labels = (index * 7 % num_classes).to(torch.int64)  # uneven class sizes at small n
    return ImageSet(images, labels)


def decode(x: torch.Tensor) -> list[int]:
    pixels = (x * 255).round().to(torch.int64)
    return (pixels[:, 0, 0, 0] * 256 + pixels[:, 0, 0, 1]).tolist()


# --------------------------------------------------------------------------------------------------
# The split itself
# --------------------------------------------------------------------------------------------------


def test_stratified_counts_are_each_class_share_and_the_seed_fixes_the_choice() -> None:
    labels = torch.tensor([0] * 600 + [1] * 300 + [2] * 100)
    held = stratified_indices(labels, 100, seed=0)
    assert torch.bincount(labels[held]).tolist() == [60, 30, 10]
    assert torch.equal(held, held.sort().values) and held.unique().numel() == 100
    assert torch.equal(held, stratified_indices(labels, 100, seed=0))
    assert not torch.equal(held, stratified_indices(labels, 100, seed=1))
    # exact shares 3.6, 1.8, 0.6 -> 3, 1, 0; the 2 left go to the largest remainders: class 1
    # (0.8), then class 0 (0.6, tied with class 2: the lower label first)
    six = stratified_indices(labels, 6, 0)
    assert torch.bincount(labels[six], minlength=3).tolist() == [4, 2, 0]
    assert validation_count(0.02, 50_000) == 1000 and validation_count(0, 10) == 0


@pytest.mark.parametrize(
    ("size", "needle"),
    [(1.5, "strictly between 0 and 1"), (-3, "an integer >= 1"), ("x", "or 0 for no validation")],
)
def test_bad_sizes_are_one_line_naming_the_key(size: Any, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        compose_resolved([f"eval.validation.size={size}"])
    text = str(err.value)
    assert text.startswith("eval.validation.size=") and needle in text and "\n" not in text
    with pytest.raises(ConfigError, match=r"holds out 1438 of the 1438 training images"):
        compose_resolved(["eval.validation.size=1438"])  # the digits: nothing left to train on


def test_every_dataset_holds_out_a_validation_split_by_default() -> None:
    for name, size in (("digits", 200), ("mnist", 1000), ("cifar10", 1000), ("synthetic", 0.1)):
        assert compose_resolved([f"dataset={name}"]).eval.validation.size == size
    data = load_run_data(compose_resolved([]))  # the digits: 200 of 1438, about 20 per class
    assert (len(data.train), len(data.validation or []), len(data.test)) == (1238, 200, 359)
    assert isinstance(data.validation, ImageSet) and isinstance(data.train, ImageSet)
    held = torch.bincount(data.validation.labels)
    share = 200 * torch.bincount(torch.cat([data.train.labels, data.validation.labels])) / 1438
    assert ((held - share).abs() < 1).all()  # each class's share, rounded
    assert data.split.record()["hash"] == load_run_data(compose_resolved([])).split.hash


def test_paper_experiments_train_on_the_whole_set_and_report_the_final_model() -> None:
    cfg = compose_resolved(["experiment=paper_table2_cifar10_amata"])
    assert cfg.eval.validation.size == 0
    train, _ = load_splits(compose_resolved([]).dataset)
    kept, held, split = split_validation(train, train, 0, 0)  # type: ignore[arg-type]
    assert kept is train and held is None and split.count == 0


@pytest.mark.parametrize(("world", "ranks"), [(1, [0]), (2, [0, 1])])
def test_validation_images_never_reach_a_training_batch(world: int, ranks: list[int]) -> None:
    full = coded_set(203)
    train, validation, split = split_validation(full, full, 0.1, seed=4)
    assert isinstance(validation, ImageSet) and split.count == 20
    assert decode(validation.images.float() / 255) == split.indices.tolist()
    cfg = compose_resolved(["dataset=synthetic"]).dataset
    seen: list[int] = []
    for rank in ranks:
        loader = make_train_loader(train, cfg, 16, "cpu", seed=0, rank=rank, world=world)
        for _ in range(2):  # two epochs
            for batch in loader:
                seen += decode(batch.x)
                assert torch.equal(split.train_indices[batch.index], torch.tensor(decode(batch.x)))
    assert not set(seen) & set(split.indices.tolist())
    assert set(seen) <= set(split.train_indices.tolist())


def test_folder_validation_is_held_out_of_training_and_decoded_for_evaluation(
    tmp_path: Path,
) -> None:
    cfg = dataset_cfg("caltech256", write_caltech(tmp_path / "data", per_class=10))
    train, test = load_splits(cfg)
    assert isinstance(train, ImageFiles) and isinstance(test, EvalImages)
    kept, validation, split = split_validation(train, test, 3, seed=0)
    assert isinstance(kept, ImageFiles) and isinstance(validation, EvalImages)
    assert torch.bincount(validation.labels).tolist() == [1, 1, 1]  # one per class
    held = {validation.data.path(i) for i in range(len(validation))}
    assert held == {train.path(i) for i in split.indices.tolist()}
    assert validation.data.transform is test.data.transform  # resize + center crop, no augment
    loader = make_train_loader(kept, cfg, 4, "cpu", seed=0)
    paths = {kept.path(i) for batch in loader for i in batch.index.tolist()}
    assert len(paths) == len(train) - 3 and not paths & held
    images, labels = validation.subset(range(3))
    assert images.shape == (3, 3, 16, 16) and labels.tolist() == validation.labels.tolist()


# --------------------------------------------------------------------------------------------------
# best.ckpt follows the validation images only
# --------------------------------------------------------------------------------------------------


def other_class_images(data: ImageSet) -> ImageSet:
    """The same labels, each image replaced by one of another class (sorted by class, rolled by
    more than any class's count): accuracy on it falls as the model learns."""
    order = data.labels.argsort(stable=True)
    shift = int(torch.bincount(data.labels).max())
    images = data.images.clone()
    images[order] = data.images[order.roll(shift)]
    return ImageSet(images, data.labels.clone())


def run_tiny(run_dir: Path, change: Callable[[RunData], RunData] | None = None) -> dict[str, Any]:
    run_dir.mkdir(parents=True, exist_ok=True)
    real = build.load_run_data
    with pytest.MonkeyPatch.context() as patch:
        if change is not None:
            patch.setattr(build, "load_run_data", lambda cfg: change(real(cfg)))
        summary = Trainer(compose_resolved(TINY), run_dir).run()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    best = torch.load(run_dir / "best.ckpt", weights_only=True)
    return {"summary": summary, "rows": rows, "best": best}


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("tiny")

    def new_validation(data: RunData) -> RunData:
        assert isinstance(data.validation, ImageSet)
        return dataclasses.replace(data, validation=other_class_images(data.validation))

    def new_test(data: RunData) -> RunData:
        assert isinstance(data.test, ImageSet)
        return dataclasses.replace(data, test=other_class_images(data.test))

    return {
        "dir": root / "base",
        "base": run_tiny(root / "base"),
        "validation": run_tiny(root / "validation", new_validation),
        "test": run_tiny(root / "test", new_test),
    }


def same_weights(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_best_checkpoint_is_chosen_on_validation_images_only(tiny_runs: dict[str, Any]) -> None:
    base, val, test = tiny_runs["base"], tiny_runs["validation"], tiny_runs["test"]
    # the rows measure both: the test subset as clean_error/robust_error, the split as val_*
    for row in base["rows"]:
        assert row["eval_split"] == "test" and row["eval_examples"] == 64
        assert row["val_examples"] == 64 and 0 <= row["val_robust_error"] <= 1
    errors = [r["val_robust_error"] for r in base["rows"]]
    assert base["summary"]["best"]["selected_on"] == "validation"
    assert base["summary"]["best"]["epoch"] == 1 + errors.index(min(errors))
    assert base["best"]["progress"]["best_epoch"] == base["summary"]["best"]["epoch"]
    # other validation images: another epoch wins, so best.ckpt holds other weights
    assert val["best"]["progress"]["best_epoch"] != base["best"]["progress"]["best_epoch"]
    assert not same_weights(val["best"], base["best"])
    # other test images: the test curve moves, best.ckpt does not
    assert [r["robust_error"] for r in test["rows"]] != [r["robust_error"] for r in base["rows"]]
    assert test["best"]["progress"]["best_epoch"] == base["best"]["progress"]["best_epoch"]
    assert same_weights(test["best"], base["best"])


def test_amata_eval_takes_last_unless_best_is_named(
    tiny_runs: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tiny_runs["dir"]
    last = load_trained(run_dir, torch.device("cpu"))
    assert last.path.name == "last.ckpt" and last.selection.startswith("last: the model after")
    best = load_trained(run_dir / "best.ckpt", torch.device("cpu"))
    epoch = tiny_runs["base"]["summary"]["best"]["epoch"]
    assert best.selection.startswith("best: highest validation robust accuracy")
    assert best.selection.endswith(f"at epoch {epoch}")

    from amata_runner.cli.evaluate import evaluate_checkpoint

    out = run_dir / "eval_test.json"
    payload = evaluate_checkpoint([f"ckpt={run_dir}", "attacks=[clean]", f"output={out}"])
    assert payload["checkpoint"].endswith("last.ckpt")
    assert payload["checkpoint_selection"] == last.selection
    assert f"evaluating {run_dir / 'last.ckpt'} (last: the model after epoch 3" in (
        capsys.readouterr().err
    )


# --------------------------------------------------------------------------------------------------
# Resumption
# --------------------------------------------------------------------------------------------------


def test_resume_keeps_the_split_and_refuses_another(tmp_path: Path) -> None:
    cfg = compose_resolved(TINY)
    first = Trainer(cfg, tmp_path)
    original = first.parts.method.train_batch
    calls = {"n": 0}

    def train_batch(batch: Any, control: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 12:  # inside epoch 2 (8 batches an epoch)
            first.stop.signum = 15
        return original(batch, control)

    first.parts.method.train_batch = train_batch  # type: ignore[method-assign]
    from amata_runner.runtime.interrupts import Preempted

    with pytest.raises(Preempted):
        first.run()
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)["validation"]
    assert saved == first.parts.validation.record() and saved["examples"] == 64

    resume = compose_resolved([*TINY, "resume=true"])
    resumed = Trainer(resume, tmp_path)
    assert resumed.parts.validation.hash == saved["hash"]
    assert torch.equal(resumed.parts.validation.indices, first.parts.validation.indices)

    # the same settings over changed data (one training image fewer): another split, refused
    real = build.load_run_data

    def fewer(cfg: Any) -> RunData:
        train, _ = load_splits(cfg.dataset)
        return dataclasses.replace(real(cfg), split=ValidationSplit.draw(train.labels[1:], 64, 0))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(build, "load_run_data", fewer)
        with pytest.raises(ConfigError, match="validation split differs from the checkpoint's"):
            Trainer(resume, tmp_path)
    summary = resumed.run()
    assert summary["validation"] == saved


# --------------------------------------------------------------------------------------------------
# Fast's early-stop check
# --------------------------------------------------------------------------------------------------


def test_fast_checks_on_the_validation_batch_never_a_training_batch() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    held = (torch.full((6, 1, 4, 4), 51, dtype=torch.uint8), torch.zeros(6, dtype=torch.int64))
    ctx = dataclasses.replace(cpu_context(model), validation_batch=held)
    fast = Fast(
        ctx, FastConfig(eps=0.1, step_size=0.125, early_stop=True, early_stop_step_size=2 / 255)
    )
    checked: list[torch.Tensor] = []

    def record(x: torch.Tensor, y: torch.Tensor) -> float:
        checked.append(x)
        return 0.5

    fast.batch_robust_accuracy = record  # type: ignore[method-assign]
    assert not fast.stop_requested()  # no batch trained yet: nothing to check
    from amata_runner.data.loader import Batch

    x = torch.rand(4, 1, 4, 4)
    fast.train_batch(Batch(x, torch.ones(4, dtype=torch.int64), torch.arange(4)), None)
    assert not fast.stop_requested()
    assert len(checked) == 1 and torch.allclose(checked[0], torch.full((6, 1, 4, 4), 0.2))
    assert fast._first_batch is None  # the training batch was not kept for the check
    state = fast.state_dict()
    assert state == {"prev_robust_acc": 0.5}  # an epoch end: no batch, no kept weights saved


def test_a_run_gives_fast_a_fixed_validation_batch(tmp_path: Path) -> None:
    cfg = compose_resolved([*TINY, "method=fast", "method.early_stop=true", "epochs=1"])
    trainer = Trainer(cfg, tmp_path)
    batch = trainer.parts.method.ctx.validation_batch
    assert batch is not None and batch[0].shape[0] == 32  # batch_size of the 64 held out
    images = trainer.parts.val_images
    assert images is not None
    matches = [(images == x).flatten(1).all(1).nonzero().numel() for x in batch[0]]
    assert all(m >= 1 for m in matches)  # every check image is a validation image
