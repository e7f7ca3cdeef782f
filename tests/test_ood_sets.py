"""apr.data.ood_sets: OOD set discovery (image folders, CIFAR pickles, SVHN .mat), caps, fingerprints."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from apr.data.ood_sets import (OODSetError, detect_kind, load_svhn_mat, open_in_distribution, open_ood_set,
                               parse_set_spec, stratified_subset)
from conftest import write_cifar10_folder


def write_pngs(root: Path, n: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        folder = root / ("a" if i % 2 else "b/c")
        folder.mkdir(parents=True, exist_ok=True)
        paths.append(folder / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (8 + i, 10, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def test_parse_set_spec():
    assert parse_set_spec("textures=/data/dtd/images") == ("textures", "/data/dtd/images")
    assert parse_set_spec("a=b=c") == ("a", "b=c")
    for bad in ("textures", "=/data", "x=", "bad name=/x"):
        with pytest.raises(OODSetError):
            parse_set_spec(bad)


def test_stratified_subset_keeps_class_shares():
    labels = np.array([0] * 60 + [1] * 30 + [2] * 10)
    picked = stratified_subset(labels, 20)
    assert len(picked) == 20 and len(set(picked.tolist())) == 20 and np.all(np.diff(picked) > 0)
    assert np.bincount(labels[picked]).tolist() == [12, 6, 2]
    np.testing.assert_array_equal(picked, stratified_subset(labels, 20))  # same path twice: deterministic
    assert stratified_subset(labels, None).tolist() == list(range(100))
    assert stratified_subset(labels, 500).tolist() == list(range(100))
    with pytest.raises(OODSetError, match=">= 1"):
        stratified_subset(labels, 0)


def test_image_folder_is_searched_recursively(tmp_path):
    paths = write_pngs(tmp_path / "set", 5)
    (tmp_path / "set" / ".hidden").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "set" / ".hidden" / "x.png")
    (tmp_path / "set" / "notes.txt").write_text("not an image")
    (tmp_path / "set" / "a" / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
    got = open_ood_set("s", tmp_path / "set")
    assert got.kind == "folder" and sorted(got.files) == sorted(str(p) for p in paths)
    assert got.skipped_count == 1 and "truncated JPEG" in got.skipped[0]
    assert got.fingerprint["files"] == 6  # the 5 images and the skipped one
    assert got.fingerprint["bytes"] == sum(p.stat().st_size for p in paths) + len(b"\xff\xd8 truncated")
    assert len(open_ood_set("s", tmp_path / "set", max_images=3)) == 3


def test_fingerprint_changes_with_the_files(tmp_path):
    paths = write_pngs(tmp_path / "set", 3)
    before = open_ood_set("s", tmp_path / "set").fingerprint
    assert open_ood_set("s", tmp_path / "set").fingerprint == before
    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(paths[0])  # same count, other size
    assert open_ood_set("s", tmp_path / "set").fingerprint != before
    assert open_ood_set("s", tmp_path / "set", max_images=2).fingerprint["max_images"] == 2


def test_svhn_mat_layout(tmp_path):
    import scipy.io

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
    labels = np.array([10, 1, 2, 3, 4, 5, 10])
    scipy.io.savemat(str(tmp_path / "t.mat"), {"X": images.transpose(1, 2, 3, 0), "y": labels.reshape(-1, 1)})
    x, y = load_svhn_mat(tmp_path / "t.mat")
    np.testing.assert_array_equal(x, images)  # the same bytes back, N x H x W x C
    assert y.tolist() == [0, 1, 2, 3, 4, 5, 0]
    s = open_ood_set("svhn", tmp_path / "t.mat")
    assert s.kind == "svhn" and len(s) == 7 and s.fingerprint["files"] == 1
    scipy.io.savemat(str(tmp_path / "wrong.mat"), {"X": images.transpose(1, 2, 3, 0), "y": labels[:3]})
    with pytest.raises(OODSetError, match="7 images in 'X' but 3 labels"):
        load_svhn_mat(tmp_path / "wrong.mat")
    (tmp_path / "junk.mat").write_bytes(b"junk")
    with pytest.raises(OODSetError, match="cannot read"):
        load_svhn_mat(tmp_path / "junk.mat")
    (tmp_path / "x.npy").write_bytes(b"")
    with pytest.raises(OODSetError, match="not a .mat"):
        detect_kind(tmp_path / "x.npy")


def test_cifar_folders_are_recognised(digits_images, tmp_path):
    images, labels = digits_images
    folder = write_cifar10_folder(tmp_path / "cifar-10-batches-py", images[:10], labels[:10], images[20:32],
                                  labels[20:32])
    assert detect_kind(folder) == detect_kind(tmp_path) == "cifar10"
    got = open_ood_set("c10", tmp_path)
    assert got.kind == "cifar10" and len(got) == 12 and got.path == str(folder.resolve())
    np.testing.assert_array_equal(got.images, images[20:32])
    assert got.fingerprint["files"] == 2  # test_batch + batches.meta
    ind = open_in_distribution(classes=[f"digit_{k}" for k in range(10)], cifar=folder, cifar_name="cifar10")
    assert ind.labels.tolist() == labels[20:32].tolist()
    with pytest.raises(OODSetError, match="not cifar10's"):
        open_in_distribution(classes=[f"c{k}" for k in range(10)], cifar=folder)
    c100 = tmp_path / "x" / "cifar-100-python"
    c100.mkdir(parents=True)
    with open(c100 / "test", "wb") as f:
        pickle.dump({b"data": np.zeros((3, 3072), np.uint8), b"fine_labels": [0, 1, 2]}, f)
    with open(c100 / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [b"n"] * 100}, f)
    assert open_ood_set("c100", tmp_path / "x").kind == "cifar100"
    (tmp_path / "x" / "cifar-10-batches-py").mkdir()
    with pytest.raises(OODSetError, match="holds both"):
        detect_kind(tmp_path / "x")
    assert detect_kind(c100) == "cifar100"


def test_in_distribution_folder_uses_the_checkpoint_classes(imagenet_tree):
    classes = [f"n{k:08d}" for k in range(4)]
    got = open_in_distribution(classes=classes, folder=imagenet_tree / "val", max_images=8)
    assert np.bincount(got.labels).tolist() == [2, 2, 2, 2]
    with pytest.raises(OODSetError, match="give the in-distribution set once"):
        open_in_distribution(classes=classes)
    with pytest.raises(Exception, match="not in the class list"):
        open_in_distribution(classes=classes[:2], folder=imagenet_tree / "val")


def test_arrays_of_another_size_are_resized_like_evaluation():
    """32 px arrays against a 24 px model: resize the shorter side to 28, centre crop 24 (PIL reference)."""
    from apr.data.ood_sets import ImageSet

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    s = ImageSet("a", "svhn", "/x", {}, labels=np.zeros(3, np.int64), images=images)
    batch, _ = next(iter(s.loader(batch_size=8, image_size=24, resize=28)))
    assert batch.shape == (3, 3, 24, 24)
    ref = np.stack([np.asarray(Image.fromarray(im).resize((28, 28), Image.BILINEAR))[2:26, 2:26] for im in images])
    torch.testing.assert_close(batch, torch.from_numpy(ref).permute(0, 3, 1, 2).float() / 255.0, atol=0.06, rtol=0)
    same, _ = next(iter(s.loader(batch_size=8, image_size=32, resize=36)))
    torch.testing.assert_close(same, torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0)
