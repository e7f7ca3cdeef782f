"""apr.data.dali: the CPU twin of the GPU pipeline (device_id=None) on real JPEGs.

Checks the batch contract, agreement with an independent decoder (torchvision/PIL) on val images,
2-rank sharding (disjoint, covering; val every file exactly once), exact mid-epoch resume, and what
happens with corrupt files (skipped when verified; a named ImageDecodeError when not).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("nvidia.dali")

from apr.config import Config  # noqa: E402
from apr.data import ImageDecodeError, build_image_loader, build_train_loader, build_val_loader, scan_image_folder  # noqa: E402


def _cfg(root: Path, **data) -> Config:
    cfg = Config()
    cfg.data.root, cfg.data.image_size, cfg.data.val_resize, cfg.data.num_workers = str(root), 24, 28, 1
    cfg.train.batch_size, cfg.train.seed = 8, 3
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return cfg


def _ids(loader) -> list[int]:
    return [int(y) for _, labels in loader for y in labels]


def test_train_and_val_batches(imagenet_tree):
    cfg = _cfg(imagenet_tree)
    train = build_train_loader(cfg)
    assert len(train) == 8 and train.num_samples == 64 and train.classes == [f"n{k:08d}" for k in range(4)]
    batches = list(train)
    assert len(batches) == 8
    for images, labels in batches:
        assert images.shape == (8, 3, 24, 24) and images.dtype == torch.float32 and images.device.type == "cpu"
        assert labels.shape == (8,) and labels.dtype == torch.int64
        assert 0.0 <= images.min() and images.max() <= 1.0
    assert sorted(torch.cat([b[1] for b in batches]).tolist()) == sorted([0, 1, 2, 3] * 16)
    assert torch.cat([b[0] for b in batches]).max() > 0.9  # real [0, 1] range, not [0, 1/255]

    val = build_val_loader(cfg, classes=train.classes)
    assert len(val) == 3 and val.num_samples == 24
    vb = list(val)
    assert [len(b[1]) for b in vb] == [8, 8, 8]
    index = scan_image_folder(imagenet_tree / "val")
    assert torch.cat([b[1] for b in vb]).tolist() == index.labels  # val order = sorted files, labels = folders


def test_val_matches_torchvision_backend(imagenet_tree):
    """DALI's decode + resize + center crop against torchvision's (PIL decode): same pixels within
    rounding (measured here: mean |diff| 0.19/255, max 1/255) and the same labels."""
    out = {}
    for backend in ("dali", "torchvision"):
        loader = build_val_loader(_cfg(imagenet_tree, backend=backend, num_workers=0), classes=[f"n{k:08d}" for k in range(4)])
        out[backend] = (torch.cat([b[0] for b in loader]), torch.cat([b[1] for b in loader]))
    (xd, yd), (xt, yt) = out["dali"], out["torchvision"]
    assert torch.equal(yd, yt)
    diff = (xd - xt).abs()
    assert diff.mean() < 0.5 / 255 and diff.max() <= 2.5 / 255
    # and not trivially equal because both are blank: the crops hold the digit strokes
    assert xd.std() > 0.1


def test_two_rank_sharding(imagenet_tree):
    index = scan_image_folder(imagenet_tree / "train")
    ids = list(range(len(index.files)))  # label = file index, so batches tell us which files were read
    common = dict(backend="dali", batch_size=8, image_size=16, num_workers=1, seed=5)
    for n in (64, 63):  # 63: one file left out so both ranks run the same number of steps
        per_rank = []
        for rank in (0, 1):
            loader = build_image_loader(index.files[:n], ids[:n], index.classes, train=True, rank=rank, world_size=2,
                                        **common)
            assert len(loader) == (n // 2) // 8
            per_rank.append(_ids(loader))
        assert len(per_rank[0]) == len(per_rank[1]) == (n // 2) // 8 * 8
        assert not set(per_rank[0]) & set(per_rank[1])
        assert len(set(per_rank[0])) == len(per_rank[0])
        if n == 64:
            assert sorted(per_rank[0] + per_rank[1]) == ids

    vindex = scan_image_folder(imagenet_tree / "val")
    vids = list(range(23))  # odd count: shards of 11 and 12, batch 5 -> partial batches, no padding seen
    seen = []
    for rank in (0, 1):
        loader = build_image_loader(vindex.files[:23], vids, vindex.classes, train=False, rank=rank, world_size=2,
                                    backend="dali", batch_size=5, image_size=16, resize=20, num_workers=1)
        got = _ids(loader)
        assert len(got) == loader.num_samples and len(loader) == 3
        seen += got
        assert _ids(loader) == got  # a second pass over val is the same
        next(iter(loader))  # an abandoned pass (e.g. a time limit) ...
        assert _ids(loader) == got  # ... does not shorten the next one
    assert sorted(seen) == vids


@pytest.mark.parametrize("k", [0, 3, 8])
def test_exact_resume(imagenet_tree, k):
    """1 epoch + k batches, save, rebuild from the state: the next batches equal the uninterrupted run's
    pixel for pixel (k=8 is the end of an epoch: the resumed loader starts the next epoch)."""
    cfg = _cfg(imagenet_tree)
    ref_loader = build_train_loader(cfg)
    reference = []
    for epoch in range(3):
        ref_loader.set_epoch(epoch)
        reference.append([(x.clone(), y.clone()) for x, y in ref_loader])

    loader = build_train_loader(cfg)
    loader.set_epoch(0)
    for _ in loader:
        pass
    loader.set_epoch(1)
    it = iter(loader)
    for _ in range(k):
        next(it)
    state = loader.state_dict()
    buf = __import__("io").BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert state["epoch"] == (1 if k < 8 else 2) and state["batch"] == k % 8

    resumed = build_train_loader(cfg)
    resumed.load_state_dict(state)
    expected = reference[1][k:] + reference[2] if k < 8 else reference[2]
    got = []
    for epoch in ((1, 2) if k < 8 else (2,)):
        resumed.set_epoch(epoch)
        got += [(x, y) for x, y in resumed]
    assert len(got) == len(expected)
    for (x, y), (xr, yr) in zip(got, expected):
        assert torch.equal(y, yr) and torch.equal(x, xr)
    # and the augmentation really is random: two epochs differ
    assert not torch.equal(reference[1][0][0], reference[2][0][0])


def test_resume_state_mismatch_rejected(imagenet_tree):
    cfg = _cfg(imagenet_tree)
    state = build_train_loader(cfg).state_dict()
    other = build_train_loader(cfg, rank=1, world_size=2)
    with pytest.raises(ValueError, match="world_size=1 but this loader has world_size=2"):
        other.load_state_dict(state)


def _tree_with_corrupt_files(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    good = next((dst / "train" / "n00000001").iterdir()).read_bytes()
    (dst / "train" / "n00000001" / "zz_truncated.JPEG").write_bytes(good[:200])
    (dst / "train" / "n00000002" / "zz_text.JPEG").write_text("this is not a JPEG")
    return dst


def test_corrupt_files_skipped_training_loads(tmp_path, imagenet_tree):
    root = _tree_with_corrupt_files(imagenet_tree, tmp_path / "tree")
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable"):
        loader = build_train_loader(_cfg(root))
    assert len(loader.files) == 64
    assert sum(len(y) for _, y in loader) == 64


def test_decode_error_without_verification(tmp_path, imagenet_tree):
    """DALI 2.4 reports 'nvImageCodec failure' without the file name; we re-raise it naming the root."""
    root = _tree_with_corrupt_files(imagenet_tree, tmp_path / "tree")
    with pytest.raises(ImageDecodeError, match=r"could not decode an image from .*tree/train.*--decode"):
        loader = build_train_loader(_cfg(root, verify_images=False))
        for _ in range(2):
            for _ in loader:
                pass


def test_mixed_pipeline_decodes_on_the_training_device(imagenet_tree, monkeypatch):
    """GPU path without a GPU: the pipeline is asked for nvJPEG ("mixed") on the training device's index.
    With one visible GPU per process accelerate's device is cuda:0 while the local rank is e.g. 3."""
    from apr.data import dali

    asked = {}

    class Stop(Exception):
        pass

    def fake_pipeline(*args, **kwargs):
        asked.update(kwargs)
        raise Stop

    monkeypatch.setattr(dali, "image_pipeline", fake_pipeline)
    index = scan_image_folder(imagenet_tree / "train")
    for device, local_rank, expected in (("cuda:0", 3, 0), ("cuda:2", 2, 2), ("cuda", 1, 1), ("cpu", 3, None)):
        asked.clear()
        with pytest.raises(Stop):
            dali.DaliImageLoader(index.files, index.labels, index.classes, batch_size=8, train=True, image_size=24,
                                 rank=local_rank, world_size=4, local_rank=local_rank, device=device)
        assert asked["device_id"] == expected, (device, local_rank)
        assert asked["decoder_device"] == ("cpu" if device == "cpu" else "mixed")


@pytest.fixture(scope="module")
def numbered_files(tmp_path_factory):
    """2,560 tiny JPEGs (more than DALI's 1,024 shuffle buffer); label = file number = reading order."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("numbered")
    rng = np.random.default_rng(0)
    files = []
    for i in range(2560):
        path = root / f"{i:04d}.JPEG"
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)
        files.append(str(path))
    return files


def _order(loader, epochs: int) -> list[list[int]]:
    return [[int(y) for _, labels in loader for y in labels] for _ in range(epochs)]


def _spearman(a: list[int], b: list[int]) -> float:
    """Rank correlation of each file's position in two epochs (positions are already ranks)."""
    import numpy as np

    pa, pb = np.argsort(a), np.argsort(b)  # pa[f] = position of file f in epoch a
    common = np.intersect1d(a, b)
    x, y = pa[np.searchsorted(np.sort(a), common)], pb[np.searchsorted(np.sort(b), common)]
    return float(np.corrcoef(x, y)[0, 1])


def _numbered_loader(files, seed: int):
    return build_image_loader(files, list(range(len(files))), ["x"], backend="dali", batch_size=16, train=True,
                              image_size=8, num_workers=1, seed=seed)


def test_every_epoch_is_a_new_global_shuffle_that_follows_the_seed(numbered_files):
    """DALI's random_shuffle shuffled once and then rotated a buffer: consecutive epochs correlated."""
    first, second, third = _order(_numbered_loader(numbered_files, seed=0), 3)
    assert sorted(first) == sorted(second) == list(range(2560))
    assert abs(_spearman(first, second)) < 0.1 and abs(_spearman(second, third)) < 0.1
    assert first != second != third
    other = _order(_numbered_loader(numbered_files, seed=1), 2)
    assert other[0] != first and other[1] != second
    assert abs(_spearman(other[1], second)) < 0.1


def test_resume_in_a_later_epoch_is_exact(numbered_files):
    loader = _numbered_loader(numbered_files, seed=4)
    _order(loader, 1)
    it = iter(loader)
    head = [next(it) for _ in range(5)]
    state = loader.state_dict()
    rest = [(x.clone(), y.clone()) for x, y in it]
    resumed = _numbered_loader(numbered_files, seed=4)
    resumed.load_state_dict(state)
    again = list(resumed)
    assert len(head) + len(rest) == len(loader) and len(again) == len(rest)
    for (xa, ya), (xb, yb) in zip(rest, again):  # the same path run twice: bit-exact
        assert torch.equal(ya, yb) and torch.equal(xa, xb)


def test_resume_after_the_data_set_changed_restarts_the_epoch(numbered_files):
    loader = _numbered_loader(numbered_files, seed=4)
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = loader.state_dict()
    smaller = _numbered_loader(numbered_files[:-16], seed=4)
    with pytest.warns(UserWarning, match=r"\(2560 files then, 2544 now: 16 file\(s\) removed\).*interrupted epoch "
                                         r"restarts from its first batch"):
        smaller.load_state_dict(state)
    assert smaller.state_dict()["batch"] == 0 and smaller.epoch == 0
    ids = [int(v) for _, y in smaller for v in y]
    assert len(ids) == len(smaller) * 16 == 2544 and sorted(ids) == list(range(2544))
    with pytest.raises(ValueError, match="world_size=1 but this loader has world_size=2"):
        build_image_loader(numbered_files, list(range(2560)), ["x"], backend="dali", batch_size=16, train=True,
                           image_size=8, num_workers=1, seed=4, rank=1, world_size=2).load_state_dict(state)


def test_state_of_the_older_reader_or_another_seed(numbered_files):
    loader = _numbered_loader(numbered_files, seed=4)
    next(iter(loader))
    state = loader.state_dict()
    assert state["seed"] == 4 and state["batch"] == 1
    with pytest.raises(ValueError, match="seed=4 but this loader has seed=5"):
        _numbered_loader(numbered_files, seed=5).load_state_dict(state)
    old = {k: v for k, v in state.items() if k != "seed"}  # written before the seeded per-epoch order
    again = _numbered_loader(numbered_files, seed=4)
    with pytest.warns(UserWarning, match="older DALI reader"):
        again.load_state_dict(old)
    assert again.state_dict()["batch"] == 0 and len(list(again)) == len(again)
