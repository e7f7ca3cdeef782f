"""apr.data.demo: the digits in ImageNet layout, cached by parameters, built atomically."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from apr.data import scan_image_folder
from apr.data.demo import MARKER, build_demo_dataset


def test_build_layout_split_and_pixels(tmp_path):
    from sklearn.datasets import load_digits

    root = build_demo_dataset(tmp_path / "demo", image_size=16, seed=0)
    train, val = scan_image_folder(root / "train"), scan_image_folder(root / "val")
    assert train.classes == val.classes == [f"digit_{k}" for k in range(10)]
    assert len(train.files) + len(val.files) == 1797 and not train.skipped
    assert abs(len(val.files) - 0.25 * 1797) <= 1
    counts_val, counts_all = np.array(val.class_counts()), np.bincount(load_digits().target)
    assert np.all(np.abs(counts_val - 0.25 * counts_all) <= 1)  # stratified
    names = {p.split("/")[-1] for p in train.files} & {p.split("/")[-1] for p in val.files}
    assert not names  # no image in both splits
    # pixels: shrink a written image back to 8x8 and compare with the sklearn digit (independent path)
    digits = load_digits()
    for path, label in list(zip(val.files, val.labels))[::97]:
        i = int(path.split("/")[-1].split(".")[0])
        assert digits.target[i] == label
        img = Image.open(path)
        assert img.size == (16, 16) and img.mode == "RGB"
        small = np.asarray(img.convert("L").resize((8, 8), Image.BOX), np.float32)
        assert np.abs(small - digits.images[i] / 16 * 255).mean() < 20


def test_cached_and_rebuilt_when_parameters_change(tmp_path):
    root = build_demo_dataset(tmp_path / "demo", image_size=8, seed=0)
    stamp = (root / MARKER).stat().st_mtime_ns
    build_demo_dataset(root, image_size=8, seed=0)
    assert (root / MARKER).stat().st_mtime_ns == stamp  # cached: nothing rewritten
    build_demo_dataset(root, image_size=12, seed=0)
    assert json.loads((root / MARKER).read_text())["image_size"] == 12
    assert Image.open(next((root / "train" / "digit_3").iterdir())).size == (12, 12)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp/old folders left


def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    calls = {"n": 0}
    original = Image.Image.save

    def failing_save(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 50:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(KeyboardInterrupt):
        build_demo_dataset(tmp_path / "demo", image_size=8)
    assert not (tmp_path / "demo").exists() and not list(tmp_path.iterdir())
    monkeypatch.setattr(Image.Image, "save", original)
    assert (build_demo_dataset(tmp_path / "demo", image_size=8) / MARKER).is_file()


def test_refuses_foreign_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an apr demo dataset"):
        build_demo_dataset(tmp_path / "mine")
    with pytest.raises(ValueError, match="val_fraction"):
        build_demo_dataset(tmp_path / "x", val_fraction=1.5)


# ----------------------------------------------------------------------------- OOD sets (apr.data.demo_ood)


def test_ood_sets_are_crops_of_the_shipped_pictures(tmp_path):
    from skimage import data as skdata

    from apr.data.demo_ood import MARKER as OOD_MARKER
    from apr.data.demo_ood import OOD_SOURCES, build_demo_ood_sets

    folders = build_demo_ood_sets(tmp_path / "ood", image_size=16, per_set=6, seed=3)
    assert set(folders) == set(OOD_SOURCES) == {"photos", "textures"}
    for folder in folders.values():
        files = sorted(folder.iterdir())
        assert [p.name for p in files] == [f"{k:04d}.JPEG" for k in range(6)]
        assert all(Image.open(p).size == (16, 16) and Image.open(p).mode == "RGB" for p in files)
    # re-derive the draws from the documented rule: one generator, photos first, then textures, sources in
    # turn; side in [short/8, short/2], top-left uniform; crop resized bicubically (PIL) to 16 x 16
    rng = np.random.default_rng(3)

    def draw(h, w):
        side = int(rng.integers(min(h, w) // 8, min(h, w) // 2 + 1))
        return side, int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))

    photo_shapes = [(427, 640), (427, 640), (512, 512), (400, 600), (300, 451), (427, 640)]  # china, flower, ...
    for k in range(6):  # the photos' draws come first
        draw(*photo_shapes[k % 6])
    textures = [getattr(skdata, name)() for name in ("brick", "grass", "gravel")]
    for k in range(6):
        source = textures[k % 3]
        side, top, left = draw(*source.shape)
        expected = np.asarray(Image.fromarray(source[top:top + side, left:left + side]).resize((16, 16), Image.BICUBIC),
                              np.float32)
        written = np.asarray(Image.open(folders["textures"] / f"{k:04d}.JPEG").convert("L"), np.float32)
        assert np.abs(written - expected).mean() < 6, k  # JPEG (quality 95) and RGB->L rounding only
    stamp = (tmp_path / "ood" / OOD_MARKER).stat().st_mtime_ns
    assert build_demo_ood_sets(tmp_path / "ood", image_size=16, per_set=6, seed=3) == folders
    assert (tmp_path / "ood" / OOD_MARKER).stat().st_mtime_ns == stamp  # cached


def test_ood_sets_are_deterministic_and_seeded(tmp_path):
    from apr.data.demo_ood import build_demo_ood_sets

    a = build_demo_ood_sets(tmp_path / "a", image_size=8, per_set=4, seed=0)
    b = build_demo_ood_sets(tmp_path / "b", image_size=8, per_set=4, seed=0)
    c = build_demo_ood_sets(tmp_path / "c", image_size=8, per_set=4, seed=1)
    for name in a:
        for k in range(4):
            file = f"{k:04d}.JPEG"
            assert (a[name] / file).read_bytes() == (b[name] / file).read_bytes()  # same code path twice
        assert any((a[name] / f"{k:04d}.JPEG").read_bytes() != (c[name] / f"{k:04d}.JPEG").read_bytes()
                   for k in range(4))
    with pytest.raises(ValueError, match="per_set"):
        build_demo_ood_sets(tmp_path / "d", per_set=0)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an apr demo OOD folder"):
        build_demo_ood_sets(tmp_path / "mine", image_size=8, per_set=2)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
