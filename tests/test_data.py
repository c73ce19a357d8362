"""Datasets and the device loader: real on-disk formats, exact round trips, reproducible batches."""

from __future__ import annotations

import pickle
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from amata_runner.data import (
    DeviceLoader,
    ImageSet,
    load_cifar10,
    load_digits,
    load_mnist,
    make_synthetic,
)
from amata_runner.errors import ConfigError

# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _rows(data: ImageSet) -> Counter[tuple[bytes, int]]:
    """The split as a multiset of (image bytes, label), for order-free comparisons."""
    return Counter(
        (img.numpy().tobytes(), int(lab)) for img, lab in zip(data.images, data.labels, strict=True)
    )


def _write_idx_images(path: Path, images: np.ndarray) -> None:
    n, h, w = images.shape
    path.write_bytes(struct.pack(">iiii", 2051, n, h, w) + images.astype(np.uint8).tobytes())


def _write_idx_labels(path: Path, labels: np.ndarray) -> None:
    path.write_bytes(struct.pack(">ii", 2049, len(labels)) + labels.astype(np.uint8).tobytes())


def _write_mnist(root: Path, folder: str, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    arrays = {
        "train_x": rng.integers(0, 256, (20, 28, 28), dtype=np.uint8),
        "train_y": rng.integers(0, 10, 20, dtype=np.uint8),
        "test_x": rng.integers(0, 256, (10, 28, 28), dtype=np.uint8),
        "test_y": rng.integers(0, 10, 10, dtype=np.uint8),
    }
    _write_idx_images(raw / "train-images-idx3-ubyte", arrays["train_x"])
    _write_idx_labels(raw / "train-labels-idx1-ubyte", arrays["train_y"])
    _write_idx_images(raw / "t10k-images-idx3-ubyte", arrays["test_x"])
    _write_idx_labels(raw / "t10k-labels-idx1-ubyte", arrays["test_y"])
    return arrays


def _write_cifar(root: Path, per_batch: int = 4) -> tuple[np.ndarray, list[int], np.ndarray]:
    """Pickles laid out as the real release: rows of 3072 bytes = R plane, G plane, B plane.

    Keys are ``str``: the real files are Python 2 pickles whose byte-string keys torchvision decodes
    with latin1, so after loading they are ``"data"``/``"labels"``, which is what it indexes.
    """
    rng = np.random.default_rng(7)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_rows, train_labels = [], []
    for i in range(1, 6):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        entry = {"batch_label": f"batch {i}", "data": data, "labels": labels}
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(entry, protocol=2))
        train_rows.append(data)
        train_labels += labels
    test = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
    entry = {"batch_label": "test", "data": test, "labels": [1, 2, 3]}
    (folder / "test_batch").write_bytes(pickle.dumps(entry, protocol=2))
    meta = {"label_names": [f"c{i}" for i in range(10)], "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return np.concatenate(train_rows), train_labels, test


def _noise_set(n: int, channels: int = 3, size: int = 12, seed: int = 0) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(1, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)
    return ImageSet(images, torch.arange(n, dtype=torch.int64) % 10)


def _epoch(loader: DeviceLoader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(b.x.clone(), b.y.clone()) for b in loader]


def _same_epochs(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b, strict=True)
    )


# --------------------------------------------------------------------------------------------------
# scikit-learn digits
# --------------------------------------------------------------------------------------------------


def test_digits_shapes_and_classes() -> None:
    train, test = load_digits()
    assert len(train) + len(test) == 1797
    assert len(test) == round(1797 * 0.2)
    for split in (train, test):
        assert split.images.dtype == torch.uint8 and split.labels.dtype == torch.int64
        assert split.images.shape[1:] == (1, 28, 28)
        assert split.images.is_contiguous()
        assert set(split.labels.tolist()) == set(range(10))
    assert train.images.min() == 0 and train.images.max() == 255


def test_digits_split_is_deterministic_and_a_partition() -> None:
    a_train, a_test = load_digits(split_seed=3)
    b_train, b_test = load_digits(split_seed=3)
    assert torch.equal(a_train.images, b_train.images) and torch.equal(a_test.labels, b_test.labels)
    assert torch.equal(a_test.images, b_test.images) and torch.equal(a_train.labels, b_train.labels)
    assert not (_rows(a_train) & _rows(a_test)), "train and test overlap"
    other_train, other_test = load_digits(split_seed=4)
    assert not torch.equal(other_test.labels, a_test.labels)
    assert _rows(a_train) + _rows(a_test) == _rows(other_train) + _rows(other_test)


def test_digits_native_size_matches_sklearn_pixels() -> None:
    from sklearn.datasets import load_digits as sk_load_digits

    raw = sk_load_digits()
    expected = np.round(raw.images / 16.0 * 255).astype(np.uint8)
    want = Counter((img.tobytes(), int(lab)) for img, lab in zip(expected, raw.target, strict=True))
    train, test = load_digits(image_size=8)
    assert _rows(train) + _rows(test) == want


def test_digits_bad_fraction() -> None:
    with pytest.raises(ConfigError):
        load_digits(test_fraction=1.0)


# --------------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fashion", "folder"), [(False, "MNIST"), (True, "FashionMNIST")])
def test_mnist_idx_round_trip(tmp_path: Path, fashion: bool, folder: str) -> None:
    arrays = _write_mnist(tmp_path, folder, seed=int(fashion))
    train, test = load_mnist(str(tmp_path), download=False, fashion=fashion)
    assert train.images.shape == (20, 1, 28, 28) and test.images.shape == (10, 1, 28, 28)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert np.array_equal(train.images[:, 0].numpy(), arrays["train_x"])
    assert np.array_equal(test.images[:, 0].numpy(), arrays["test_x"])
    assert train.labels.tolist() == arrays["train_y"].tolist()
    assert test.labels.tolist() == arrays["test_y"].tolist()


@pytest.mark.parametrize("fashion", [False, True])
def test_mnist_missing_without_download(tmp_path: Path, fashion: bool) -> None:
    with pytest.raises(ConfigError) as info:
        load_mnist(str(tmp_path), download=False, fashion=fashion)
    message = str(info.value)
    assert str(tmp_path / ("FashionMNIST" if fashion else "MNIST") / "raw") in message
    assert "dataset.download=true" in message


def test_mnist_malformed_header(tmp_path: Path) -> None:
    _write_mnist(tmp_path, "MNIST", seed=0)
    (tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x0d\x09junk")
    with pytest.raises(ConfigError, match="malformed"):
        load_mnist(str(tmp_path), download=False)


# --------------------------------------------------------------------------------------------------
# CIFAR-10
# --------------------------------------------------------------------------------------------------


def test_cifar10_round_trip_chw(tmp_path: Path) -> None:
    train_rows, train_labels, test_rows = _write_cifar(tmp_path)
    train, test = load_cifar10(str(tmp_path), download=False)
    assert train.images.shape == (20, 3, 32, 32) and test.images.shape == (3, 3, 32, 32)
    assert train.images.dtype == torch.uint8 and train.images.is_contiguous()
    assert train.labels.tolist() == train_labels and test.labels.tolist() == [1, 2, 3]
    # Row layout: channel c, row r, column k sits at byte c*1024 + r*32 + k.
    for c, r, k in [(0, 0, 0), (1, 5, 17), (2, 31, 30)]:
        assert int(train.images[6, c, r, k]) == int(train_rows[6, c * 1024 + r * 32 + k])
    assert np.array_equal(train.images.reshape(20, -1).numpy(), train_rows)
    assert np.array_equal(test.images.reshape(3, -1).numpy(), test_rows)


def test_cifar10_missing_without_download(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_cifar10(str(tmp_path), download=False)
    message = str(info.value)
    assert str(tmp_path / "cifar-10-batches-py") in message
    assert "dataset.download=true" in message


def test_cifar10_malformed_pickle_names_file(tmp_path: Path) -> None:
    _write_cifar(tmp_path)
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(b"this is not a pickle")
    with pytest.raises(ConfigError, match="data_batch_3"):
        load_cifar10(str(tmp_path), download=False)


# --------------------------------------------------------------------------------------------------
# synthetic
# --------------------------------------------------------------------------------------------------


def test_synthetic_deterministic_and_learnable() -> None:
    train, test = make_synthetic(300, 200, channels=3, image_size=16, num_classes=10, seed=5)
    again_train, again_test = make_synthetic(300, 200, 3, 16, 10, seed=5)
    assert torch.equal(train.images, again_train.images)
    assert torch.equal(test.labels, again_test.labels)
    assert train.images.shape == (300, 3, 16, 16) and train.images.dtype == torch.uint8
    assert not torch.equal(make_synthetic(300, 200, 3, 16, 10, seed=6)[0].images, train.images)
    # Nearest class mean from the training split must classify the test split far above 10%.
    x_train = train.images.flatten(1).float()
    means = torch.stack([x_train[train.labels == c].mean(0) for c in range(10)])
    pred = torch.cdist(test.images.flatten(1).float(), means).argmin(1)
    assert (pred == test.labels).float().mean() > 0.9


# --------------------------------------------------------------------------------------------------
# DeviceLoader
# --------------------------------------------------------------------------------------------------


def test_loader_len_and_last_batch() -> None:
    data = _noise_set(10)
    keep = DeviceLoader(data, 4, "cpu", shuffle=False, drop_last=False)
    drop = DeviceLoader(data, 4, "cpu", shuffle=False, drop_last=True)
    assert len(keep) == 3 and len(drop) == 2 and keep.num_examples == 10
    assert [len(b.y) for b in keep] == [4, 4, 2]
    assert [len(b.y) for b in drop] == [4, 4]


def test_loader_keeps_uint8_on_device() -> None:
    loader = DeviceLoader(_noise_set(10), 4, "cpu", shuffle=True, drop_last=False)
    assert loader._images.dtype == torch.uint8


def test_loader_epoch_covers_every_example_once() -> None:
    data = _noise_set(23)
    data.labels = torch.arange(23, dtype=torch.int64)  # labels double as example ids
    loader = DeviceLoader(data, 5, "cpu", shuffle=True, drop_last=False, seed=1)
    xs, ys = zip(*((b.x, b.y) for b in loader), strict=True)
    seen = torch.cat(ys)
    assert sorted(seen.tolist()) == list(range(23))
    assert seen.tolist() != list(range(23)), "shuffle=True should reorder"
    x = torch.cat(xs)
    assert x.dtype == torch.float32 and x.min() >= 0 and x.max() <= 1
    assert torch.equal((x * 255).round().to(torch.uint8), data.images[seen])


def test_loader_same_seed_same_batches_and_epochs_differ() -> None:
    data = _noise_set(40)
    a = DeviceLoader(data, 8, "cpu", shuffle=True, drop_last=True, augment="crop_flip", seed=2)
    b = DeviceLoader(data, 8, "cpu", shuffle=True, drop_last=True, augment="crop_flip", seed=2)
    first = _epoch(a)
    assert _same_epochs(first, _epoch(b))
    assert not _same_epochs(first, _epoch(a))


def test_loader_state_dict_resumes_next_epoch() -> None:
    data = _noise_set(30)
    kwargs = {"shuffle": True, "drop_last": False, "augment": "crop_flip"}
    a = DeviceLoader(data, 7, "cpu", seed=11, **kwargs)
    _epoch(a)
    state = a.state_dict()
    epoch2 = _epoch(a)
    b = DeviceLoader(data, 7, "cpu", seed=999, **kwargs)
    b.load_state_dict(state)
    assert _same_epochs(_epoch(b), epoch2)


def _find_window(out: torch.Tensor, padded: torch.Tensor, pad: int) -> set[tuple[int, int, bool]]:
    """All (top, left, flipped) placements of ``out`` inside the padded original."""
    h, w = out.shape[-2:]
    hits = set()
    for top in range(2 * pad + 1):
        for left in range(2 * pad + 1):
            window = padded[:, top : top + h, left : left + w]
            for flipped in (False, True):
                if torch.equal(window.flip(-1) if flipped else window, out):
                    hits.add((top, left, flipped))
    return hits


def test_crop_flip_is_a_shifted_window_with_per_example_offsets() -> None:
    pad = 4
    data = _noise_set(64, channels=3, size=10, seed=3)
    loader = DeviceLoader(data, 64, "cpu", shuffle=False, drop_last=False, augment="crop_flip")
    [batch] = list(loader)
    x = batch.x
    assert x.shape == (64, 3, 10, 10)
    placements = []
    for i in range(64):
        original = data.images[i].float() / 255
        padded = torch.nn.functional.pad(original, (pad, pad, pad, pad))
        hits = _find_window(x[i], padded, pad)
        assert len(hits) == 1, f"example {i}: output is not a unique window of the padded input"
        placements.append(hits.pop())
    assert len({(t, left) for t, left, _ in placements}) > 10
    assert {f for *_, f in placements} == {False, True}


def test_no_augment_returns_original_pixels() -> None:
    data = _noise_set(6)
    [batch] = list(DeviceLoader(data, 6, "cpu", shuffle=False, drop_last=False))
    assert torch.equal(batch.x, data.images.float() / 255)
    assert batch.crop is None and torch.equal(batch.index, torch.arange(6))


def test_bad_augment_name() -> None:
    with pytest.raises(ConfigError, match="crop_flip"):
        DeviceLoader(_noise_set(4), 2, "cpu", shuffle=False, drop_last=False, augment="mixup")


def test_crop_flip_params_move_state_between_frames() -> None:
    """What ATTA needs: the batch's crop applied to per-example state, and undone exactly."""
    data = _noise_set(32, channels=3, size=10, seed=5)
    loader = DeviceLoader(data, 32, "cpu", shuffle=True, drop_last=False, augment="crop_flip")
    [batch] = list(loader)
    assert batch.crop is not None
    originals = data.images[batch.index].float() / 255
    assert torch.equal(batch.crop.apply(originals), batch.x)  # the same crop, replayed
    state = torch.rand(32, 3, 10, 10)
    moved = batch.crop.apply(state)
    back = batch.crop.invert(moved, state)
    assert torch.equal(back, state)  # round trip: visible pixels return, cut-off ones are kept
    edited = batch.crop.invert(moved + 1.0, state)
    changed = edited != state
    # exactly the pixels the crop kept from the image (not from the padding) were written back
    inside = batch.crop.apply(torch.ones_like(state)).sum(dim=(1, 2, 3))
    assert torch.equal(changed.sum(dim=(1, 2, 3)).float(), inside)
