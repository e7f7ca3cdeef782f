"""apr.data.torchvision_backend: same contract as DALI; checked against PIL/NumPy references."""

from __future__ import annotations

import io
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


def test_decode_error_names_file(tmp_path, imagenet_tree):
    import shutil

    root = tmp_path / "tree"
    shutil.copytree(imagenet_tree, root)
    bad = root / "train" / "n00000002" / "zz_bad.JPEG"
    bad.write_text("not a jpeg")
    with pytest.raises(ImageDecodeError, match=r"cannot decode image .*zz_bad\.JPEG"):
        for _ in build_train_loader(_cfg(root, verify_images=False)):
            pass
