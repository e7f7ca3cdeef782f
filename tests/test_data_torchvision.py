"""apr.data.torchvision_backend: same contract as DALI; checked against PIL/NumPy references."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from apr.config import Config
from apr.data import ImageDecodeError, build_image_loader, build_train_loader, build_val_loader, scan_image_folder


def _cfg(root: Path, **data) -> Config:
    cfg = Config()
    cfg.data.root, cfg.data.backend, cfg.data.image_size, cfg.data.val_resize = str(root), "torchvision", 24, 28
    cfg.data.num_workers = 0
    cfg.train.batch_size, cfg.train.seed = 8, 3
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return cfg


def test_val_equals_pil_reference(imagenet_tree):
    """Val = PIL bilinear resize of the shorter side to 28 + 12..., center 24x24 crop, /255 (independent path)."""
    loader = build_val_loader(_cfg(imagenet_tree), classes=None)
    images = torch.cat([x for x, _ in loader])
    labels = torch.cat([y for _, y in loader])
    index = scan_image_folder(imagenet_tree / "val")
    assert labels.tolist() == index.labels and images.dtype == torch.float32 and labels.dtype == torch.int64
    for i, path in enumerate(index.files):
        img = Image.open(path).convert("RGB").resize((28, 28), Image.BILINEAR)  # square source: shorter = both
        ref = np.asarray(img, dtype=np.float32)[2:26, 2:26].transpose(2, 0, 1) / 255.0
        assert np.abs(images[i].numpy() - ref).max() <= 2.5 / 255


def test_train_batches_seeded_and_random(imagenet_tree):
    cfg = _cfg(imagenet_tree)
    a, b = build_train_loader(cfg), build_train_loader(cfg)
    assert len(a) == 8 and a.num_samples == 64
    ba, bb = list(a), list(b)
    for (xa, ya), (xb, yb) in zip(ba, bb):
        assert xa.shape == (8, 3, 24, 24) and 0 <= xa.min() and xa.max() <= 1
        assert torch.equal(xa, xb) and torch.equal(ya, yb)  # same seed -> same batches
    assert sorted(torch.cat([y for _, y in ba]).tolist()) == sorted([0, 1, 2, 3] * 16)
    second = list(a)  # next epoch: new order and new crops
    assert not torch.equal(torch.cat([y for _, y in second]), torch.cat([y for _, y in ba]))
    # the global RNG of the caller is left alone by the per-sample seeding
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    list(build_train_loader(cfg))
    assert torch.equal(torch.rand(3), expected)


def test_two_rank_sharding(imagenet_tree):
    index = scan_image_folder(imagenet_tree / "train")
    ids = list(range(63))
    per_rank = []
    for rank in (0, 1):
        loader = build_image_loader(index.files[:63], ids, index.classes, backend="torchvision", batch_size=8,
                                    train=True, image_size=16, num_workers=0, rank=rank, world_size=2, seed=1)
        assert len(loader) == 3
        per_rank.append([int(y) for _, lab in loader for y in lab])
    assert len(per_rank[0]) == len(per_rank[1]) == 24 and not set(per_rank[0]) & set(per_rank[1])
    seen = []
    for rank in (0, 1):
        loader = build_image_loader(index.files[:23], ids[:23], index.classes, backend="torchvision", batch_size=5,
                                    train=False, image_size=16, resize=20, num_workers=0, rank=rank, world_size=2)
        got = [int(y) for _, lab in loader for y in lab]
        assert len(got) == loader.num_samples
        next(iter(loader))  # an abandoned eval pass does not shorten the next one
        assert [int(y) for _, lab in loader for y in lab] == got
        seen += got
    assert sorted(seen) == list(range(23))


@pytest.mark.parametrize("k", [0, 5, 8])
def test_exact_resume(imagenet_tree, k):
    cfg = _cfg(imagenet_tree)
    ref = build_train_loader(cfg)
    reference = []
    for epoch in range(3):
        ref.set_epoch(epoch)
        reference.append(list(ref))
    loader = build_train_loader(cfg)
    list(loader)
    loader.set_epoch(1)
    it = iter(loader)
    for _ in range(k):
        next(it)
    buf = io.BytesIO()
    torch.save(loader.state_dict(), buf)
    buf.seek(0)
    resumed = build_train_loader(cfg)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    got = []
    for epoch in ((1, 2) if k < 8 else (2,)):
        resumed.set_epoch(epoch)
        got += list(resumed)
    expected = reference[1][k:] + reference[2] if k < 8 else reference[2]
    assert len(got) == len(expected)
    for (x, y), (xr, yr) in zip(got, expected):
        assert torch.equal(y, yr) and torch.equal(x, xr)


def test_workers_match_main_process(imagenet_tree):
    """Per-sample seeding makes the batches independent of the number of DataLoader workers."""
    a = list(build_train_loader(_cfg(imagenet_tree, num_workers=0)))[:2]
    b = list(build_train_loader(_cfg(imagenet_tree, num_workers=2)))[:2]
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def _scramble(path: Path, seed: int = 0) -> None:
    """Keep the JPEG header (through the start-of-scan marker) and the end marker; random body."""
    data = path.read_bytes()
    body = data.index(b"\xff\xda") + 14
    noise = np.random.default_rng(seed).integers(0, 256, len(data) - body - 2, dtype=np.uint8).tobytes()
    path.write_bytes(data[:body] + noise + b"\xff\xd9")


@pytest.fixture()
def scrambled_tree(tmp_path, imagenet_tree) -> tuple[Path, Path]:
    import shutil

    root = tmp_path / "tree"
    shutil.copytree(imagenet_tree, root)
    bad = root / "train" / "n00000002" / "zz_bad.JPEG"
    shutil.copy(next((root / "train" / "n00000002").iterdir()), bad)
    _scramble(bad)
    return root, bad


def test_text_file_without_verification_is_skipped_by_name(tmp_path, imagenet_tree):
    import shutil

    root = tmp_path / "tree"
    shutil.copytree(imagenet_tree, root)
    (root / "train" / "n00000002" / "zz_bad.JPEG").write_text("not a jpeg")
    loader = build_train_loader(_cfg(root, verify_images=False))
    with pytest.warns(UserWarning, match=r"skipped undecodable image .*zz_bad\.JPEG"):
        batches = list(loader)
    assert len(batches) == len(loader) and all(x.shape == (8, 3, 24, 24) for x, _ in batches)
    assert list(loader.skipped_files) == [str(root / "train" / "n00000002" / "zz_bad.JPEG")]


def test_scrambled_jpeg_is_replaced_in_training_and_dropped_in_eval(scrambled_tree):
    """A valid header on an undecodable body passes the header check; it used to stop training."""
    root, bad = scrambled_tree
    cfg = _cfg(root)
    assert str(bad) in build_train_loader(cfg).files  # the header check lets it through
    loader, again = build_train_loader(cfg), build_train_loader(cfg)
    with pytest.warns(UserWarning, match=r"skipped undecodable image .*zz_bad\.JPEG.*replaced"):
        batches = list(loader)
    assert len(batches) == len(loader) == 8
    assert all(x.shape == (8, 3, 24, 24) and y.dtype == torch.int64 for x, y in batches)
    assert list(loader.skipped_files) == [str(bad)]
    with pytest.warns(UserWarning):
        repeat = list(again)
    for (xa, ya), (xb, yb) in zip(batches, repeat):  # the stand-in is seeded: same path twice, bit-exact
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    files = [str(bad)] + [str(p) for p in sorted((root / "val" / "n00000000").iterdir())[:3]]
    val = build_image_loader(files, [2, 0, 0, 0], ["a", "b", "c"], backend="torchvision", batch_size=2,
                             train=False, image_size=24, num_workers=0)
    with pytest.warns(UserWarning, match="left out of the evaluation"):
        labels = [int(v) for _, y in val for v in y]
    assert labels == [0, 0, 0]


def test_resume_after_the_data_set_changed_restarts_the_epoch(scrambled_tree):
    """Deleting the bad file used to make --resume refuse ("num_files=65 but ..."): a dead end."""
    root, bad = scrambled_tree
    cfg = _cfg(root)
    loader = build_train_loader(cfg)
    loader.set_epoch(2)
    it = iter(loader)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the scrambled file may or may not fall in these batches
        for _ in range(3):
            next(it)
    state = loader.state_dict()
    assert (state["epoch"], state["batch"], state["num_files"]) == (2, 3, 65)
    bad.unlink()
    resumed = build_train_loader(cfg)
    with pytest.warns(UserWarning, match=r"training set changed since the checkpoint \(65 files then, 64 now: "
                                         r"1 file\(s\) removed\).*interrupted epoch restarts from its first batch"):
        resumed.load_state_dict(state)
    resumed.set_epoch(2)
    fresh = build_train_loader(cfg)
    fresh.set_epoch(2)
    got, want = list(resumed), list(fresh)
    assert len(got) == len(want) == 8 and resumed.epoch == 2
    for (xa, ya), (xb, yb) in zip(got, want):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    other_seed = _cfg(root)
    other_seed.train.seed = 4
    with pytest.raises(ValueError, match="seed=3 but this loader has seed=4"):
        build_train_loader(other_seed).load_state_dict(state)


def test_misspelled_argument_is_refused(imagenet_tree):
    from apr.data.torchvision_backend import TorchvisionImageLoader

    index = scan_image_folder(imagenet_tree / "val")
    with pytest.raises(TypeError, match="num_thread"):
        TorchvisionImageLoader(index.files, index.labels, index.classes, batch_size=4, train=False, image_size=24,
                               num_thread=2)


def test_val_set_missing_training_classes_warns_with_the_list(tmp_path, imagenet_tree):
    import shutil

    root = tmp_path / "tree"
    shutil.copytree(imagenet_tree, root)
    shutil.rmtree(root / "val" / "n00000001")
    shutil.rmtree(root / "val" / "n00000003")
    classes = [f"n{k:08d}" for k in range(4)]
    with pytest.warns(UserWarning, match=r"no images of 2 training class\(es\): n00000001, n00000003"):
        loader = build_val_loader(_cfg(root), classes=classes)
    assert sorted(set(int(v) for _, y in loader for v in y)) == [0, 2] and loader.classes == classes
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a complete val set: no warning
        build_val_loader(_cfg(imagenet_tree), classes=classes)
