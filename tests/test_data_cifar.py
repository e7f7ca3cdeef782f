"""apr.data.cifar: official pickle/npy layouts (fabricated tiny copies) and the on-device batch loader."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from apr.config import Config
from apr.data import DatasetLayoutError, TensorBatchLoader, build_train_loader, build_val_loader, load_cifar, load_cifar_c


def _write_pickle(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def _as_rows(images: np.ndarray) -> np.ndarray:  # official layout: R plane, G plane, B plane per row
    return images.transpose(0, 3, 1, 2).reshape(len(images), 3072)


@pytest.fixture()
def cifar_root(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    parts = {}
    for i in range(1, 6):
        imgs, labels = _images(6, i), [(i + j) % 10 for j in range(6)]
        parts[i] = (imgs, labels)
        _write_pickle(folder / f"data_batch_{i}", {b"data": _as_rows(imgs), b"labels": labels, b"batch_label": b"x"})
    test = _images(7, 9)
    _write_pickle(folder / "test_batch", {b"data": _as_rows(test), b"labels": list(range(7))})
    _write_pickle(folder / "batches.meta", {b"label_names": [f"c{k}".encode() for k in range(10)]})
    c100 = tmp_path / "cifar-100-python"
    c100.mkdir()
    _write_pickle(c100 / "train", {b"data": _as_rows(_images(5, 20)), b"fine_labels": [0, 99, 5, 6, 7],
                                   b"coarse_labels": [0] * 5})
    _write_pickle(c100 / "test", {b"data": _as_rows(_images(3, 21)), b"fine_labels": [1, 2, 3]})
    _write_pickle(c100 / "meta", {b"fine_label_names": [f"f{k}".encode() for k in range(100)]})
    return tmp_path, parts, test


def test_load_cifar10_and_100(cifar_root):
    root, parts, test = cifar_root
    x, y, classes = load_cifar(root, "cifar10", train=True)
    assert x.shape == (30, 32, 32, 3) and x.dtype == np.uint8 and y.dtype == np.int64
    assert np.array_equal(x, np.concatenate([parts[i][0] for i in range(1, 6)]))  # HWC pixels restored exactly
    assert y.tolist() == sum((parts[i][1] for i in range(1, 6)), [])
    assert classes == [f"c{k}" for k in range(10)]
    xt, yt, _ = load_cifar(root / "cifar-10-batches-py", "cifar10", train=False)  # the folder itself works too
    assert np.array_equal(xt, test) and yt.tolist() == list(range(7))
    x100, y100, c100 = load_cifar(root, "cifar100", train=True)
    assert x100.shape == (5, 32, 32, 3) and y100.tolist() == [0, 99, 5, 6, 7] and c100[99] == "f99"


def test_cifar_errors(cifar_root, tmp_path):
    root, _, _ = cifar_root
    with pytest.raises(DatasetLayoutError, match="cifar-100-python not found"):
        load_cifar(tmp_path / "nowhere", "cifar100")
    (root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DatasetLayoutError, match="CIFAR file not found: .*data_batch_3"):
        load_cifar(root, "cifar10", train=True)
    _write_pickle(root / "cifar-10-batches-py" / "test_batch", {b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4})
    with pytest.raises(DatasetLayoutError, match=r"'data' must be uint8 N x 3072, got uint8 \(4, 100\)"):
        load_cifar(root, "cifar10", train=False)
    with pytest.raises(ValueError, match="unknown CIFAR dataset 'cifar5'"):
        load_cifar(root, "cifar5")


def test_load_cifar_c(tmp_path):
    images = _images(25, 3)
    np.save(tmp_path / "fog.npy", images)
    np.save(tmp_path / "labels.npy", np.arange(25) % 10)
    x, y = load_cifar_c(tmp_path, "fog")
    assert np.array_equal(x, images) and y.dtype == np.int64 and y.tolist() == (np.arange(25) % 10).tolist()
    x3, y3 = load_cifar_c(tmp_path, "fog", severity=3)
    assert np.array_equal(x3, images[10:15]) and y3.tolist() == (np.arange(10, 15) % 10).tolist()
    with pytest.raises(DatasetLayoutError, match="CIFAR-C file not found: .*snow.npy"):
        load_cifar_c(tmp_path, "snow")
    np.save(tmp_path / "odd.npy", _images(24, 1))
    with pytest.raises(DatasetLayoutError, match="24 images is not five equal severity blocks"):
        load_cifar_c(tmp_path, "odd")
    np.save(tmp_path / "flat.npy", np.zeros((25, 3072), np.uint8))
    with pytest.raises(DatasetLayoutError, match=r"expected uint8 N x 32 x 32 x 3, got uint8 \(25, 3072\)"):
        load_cifar_c(tmp_path, "flat")
    np.save(tmp_path / "labels.npy", np.zeros(20, np.int64))
    with pytest.raises(DatasetLayoutError, match="20 labels for 25 images"):
        load_cifar_c(tmp_path, "fog")


def _matches_some_crop(out: np.ndarray, src: np.ndarray, pad: int) -> tuple[int, int, bool] | None:
    """Per-image NumPy reference: which (dy, dx, flip) of the zero-padded source gives ``out``."""
    padded = np.pad(src, ((pad, pad), (pad, pad), (0, 0)))
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[dy:dy + 32, dx:dx + 32]
            for flip in (False, True):
                if np.array_equal(out, crop[:, ::-1] if flip else crop):
                    return dy, dx, flip
    return None


def test_train_crop_flip_against_numpy(digits_images):
    images, labels = digits_images[0][:48], digits_images[1][:48]
    loader = TensorBatchLoader(images, labels, 16, train=True, crop_padding=4, seed=7)
    assert len(loader) == 3 and loader.num_samples == 48
    seen, params = [], []
    for x, y in loader:
        assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
        for img, label in zip(x, y):
            out = np.rint(img.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
            # find the source image by label + crop search (labels narrow the search)
            hits = [(i, _matches_some_crop(out, images[i], 4)) for i in np.flatnonzero(labels == int(label))]
            hits = [(i, p) for i, p in hits if p is not None]
            assert hits, "output is not a padded crop (or flip) of any source image"
            seen.append(hits[0][0])
            params.append(hits[0][1])
    assert len(set(params)) > 15 and any(p[2] for p in params) and not all(p[2] for p in params)
    assert len(set(seen)) >= 45  # a permutation: (almost) every image once; blank-equivalent digits may collide


def test_eval_batches_plain_and_sharded(digits_images):
    images, labels = digits_images[0][:23], digits_images[1][:23]
    full = TensorBatchLoader(images, labels, 5)
    x = torch.cat([b[0] for b in full])
    assert [len(b[1]) for b in full] == [5, 5, 5, 5, 3]
    torch.testing.assert_close(x, torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255, rtol=0, atol=1e-7)
    got = []
    for rank in (0, 1):
        shard = TensorBatchLoader(images, np.arange(23), 5, rank=rank, world_size=2)
        got += [int(v) for _, y in shard for v in y]
    assert sorted(got) == list(range(23))


@pytest.mark.parametrize("k", [0, 2, 4])
def test_exact_resume_and_sharding(digits_images, k):
    images = digits_images[0][:70]
    ref = TensorBatchLoader(images, np.arange(70), 8, train=True, seed=2, rank=1, world_size=2)
    assert len(ref) == 4
    reference = [list(ref) for _ in range(3)]
    other = [int(v) for _, y in TensorBatchLoader(images, np.arange(70), 8, train=True, seed=2, rank=0, world_size=2)
             for v in y]
    mine = [int(v) for _, y in reference[0] for v in y]
    assert not set(mine) & set(other) and len(mine) == len(other) == 32
    loader = TensorBatchLoader(images, np.arange(70), 8, train=True, seed=2, rank=1, world_size=2)
    list(loader)
    it = iter(loader)
    for _ in range(k):
        next(it)
    buf = io.BytesIO()
    torch.save(loader.state_dict(), buf)
    buf.seek(0)
    resumed = TensorBatchLoader(images, np.arange(70), 8, train=True, seed=2, rank=1, world_size=2)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    got = list(resumed) + list(resumed)
    expected = (reference[1][k:] + reference[2]) if k < 4 else reference[2] + []
    got = got[:len(expected)]
    for (x, y), (xr, yr) in zip(got, expected):
        assert torch.equal(x, xr) and torch.equal(y, yr)


def test_build_loaders_from_config(cifar_root):
    root, _, test = cifar_root
    cfg = Config()
    cfg.data.dataset, cfg.data.root, cfg.train.batch_size = "cifar10", str(root), 4
    train = build_train_loader(cfg)
    assert len(train) == 7 and train.classes[0] == "c0"
    val = build_val_loader(cfg, classes=train.classes)
    assert val.num_samples == 7 and len(val) == 2
    torch.testing.assert_close(torch.cat([x for x, _ in val]), torch.from_numpy(test).permute(0, 3, 1, 2).float() / 255,
                               rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="images must be uint8 N x H x W x 3"):
        TensorBatchLoader(np.zeros((4, 32, 32), np.uint8), [0] * 4, 2)


def test_cifar10_layout_with_another_class_count_is_accepted_with_a_warning(tmp_path):
    """A CIFAR-format folder of 3 classes (data.dataset: cifar10) used to be refused."""
    from apr.data import cifar_name_for

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i in range(1, 6):
        _write_pickle(folder / f"data_batch_{i}", {b"data": _as_rows(_images(4, i)), b"labels": [0, 1, 2, i % 3]})
    _write_pickle(folder / "test_batch", {b"data": _as_rows(_images(3, 9)), b"labels": [2, 1, 0]})
    _write_pickle(folder / "batches.meta", {b"label_names": [b"cat", b"dog", b"eel"]})
    with pytest.warns(UserWarning, match=r"lists 3 classes, not cifar10's 10"):
        images, labels, classes = load_cifar(tmp_path, "cifar10", train=True)
    assert classes == ["cat", "dog", "eel"] and images.shape == (20, 32, 32, 3)
    assert labels.tolist() == [0, 1, 2, 1, 0, 1, 2, 2, 0, 1, 2, 0, 0, 1, 2, 1, 0, 1, 2, 2]
    _write_pickle(folder / "test_batch", {b"data": _as_rows(_images(3, 9)), b"labels": [2, 1, 3]})
    with pytest.warns(UserWarning), pytest.raises(DatasetLayoutError, match=r"labels outside 0..2"):
        load_cifar(tmp_path, "cifar10", train=False)
    assert cifar_name_for("cifar10", classes) == "cifar10"
    assert cifar_name_for("imagenet", ["x"] * 100) == "cifar100" and cifar_name_for("", ["x"] * 10) == "cifar10"
    with pytest.raises(DatasetLayoutError, match="cannot tell which CIFAR test set"):
        cifar_name_for("imagenet", ["x"] * 7)
