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
