"""apr.data.layout: class index, layout errors (asserted by message), corrupt-file policy."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from apr.data import DatasetLayoutError, build_folder_eval_loader, scan_image_folder, scan_train_roots
from apr.data.layout import check_image_file, main


def _copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_scan_matches_folders(imagenet_tree):
    index = scan_image_folder(imagenet_tree / "train")
    assert index.classes == [f"n{k:08d}" for k in range(4)]
    assert len(index.files) == 64 and index.skipped == []
    assert index.class_counts() == [16, 16, 16, 16]
    for path, label in zip(index.files, index.labels):  # label = position of the parent folder in sorted order
        assert Path(path).parent.name == index.classes[label]


def test_class_index_is_sorted_folder_names(tmp_path, imagenet_tree):
    root = tmp_path / "t"
    for i, name in enumerate(["zebra", "apple", "mango"]):
        (root / name).mkdir(parents=True)
        shutil.copy(next((imagenet_tree / "train" / f"n{i:08d}").iterdir()), root / name / "a.JPEG")
    (root / "apple" / "notes.txt").write_text("not an image extension: ignored")
    index = scan_image_folder(root)
    assert index.classes == ["apple", "mango", "zebra"]
    assert [Path(f).parent.name for f in index.files] == ["apple", "mango", "zebra"]
    assert index.labels == [0, 1, 2]


def test_missing_root_names_path(tmp_path):
    with pytest.raises(DatasetLayoutError, match="not found: .*does_not_exist"):
        scan_image_folder(tmp_path / "does_not_exist")


def test_no_class_folders(tmp_path):
    (tmp_path / "flat.JPEG").write_bytes(b"\xff\xd8\xff\xd9")
    with pytest.raises(DatasetLayoutError, match="no class folders in"):
        scan_image_folder(tmp_path)


def test_empty_class_folder_named(tmp_path, imagenet_tree):
    root = _copy_tree(imagenet_tree / "train", tmp_path / "train")
    (root / "n00000009").mkdir()
    with pytest.raises(DatasetLayoutError, match=r"class folder has no images: .*n00000009"):
        scan_image_folder(root)


def test_val_class_not_in_train(tmp_path, imagenet_tree):
    train = scan_image_folder(imagenet_tree / "train")
    val = _copy_tree(imagenet_tree / "val", tmp_path / "val")
    shutil.copytree(val / "n00000000", val / "n09999999")
    with pytest.raises(DatasetLayoutError, match=r"not in the class list.*n09999999"):
        scan_image_folder(val, classes=train.classes)
    # a val folder lacking a class is fine when allowed (subsets), an error otherwise
    shutil.rmtree(val / "n09999999")
    shutil.rmtree(val / "n00000003")
    assert len(scan_image_folder(val, classes=train.classes, allow_missing_classes=True).files) == 18
    with pytest.raises(DatasetLayoutError, match=r"lacks class folder\(s\): n00000003"):
        scan_image_folder(val, classes=train.classes)


def test_extra_roots_merge_and_differences(tmp_path, imagenet_tree):
    edsr = _copy_tree(imagenet_tree / "val", tmp_path / "EDSR")  # same classes, 6 images each
    merged = scan_train_roots([imagenet_tree / "train", edsr])
    assert merged.classes == [f"n{k:08d}" for k in range(4)]
    assert len(merged.files) == 64 + 24
    assert merged.class_counts() == [22, 22, 22, 22]
    assert all(Path(f).parent.name == merged.classes[y] for f, y in zip(merged.files, merged.labels))

    shutil.rmtree(edsr / "n00000002")
    shutil.copytree(edsr / "n00000000", edsr / "n00000077")
    with pytest.raises(DatasetLayoutError, match=r"different classes.*missing 1: n00000002.*not in .*n00000077"):
        scan_train_roots([imagenet_tree / "train", edsr])
    with pytest.raises(DatasetLayoutError, match="extra training folder not found: .*CAE"):
        scan_train_roots([imagenet_tree / "train", tmp_path / "CAE"])


def test_corrupt_files_skipped_and_counted(tmp_path, imagenet_tree):
    root = _copy_tree(imagenet_tree / "train", tmp_path / "train")
    good = next((root / "n00000001").iterdir()).read_bytes()
    (root / "n00000001" / "truncated.JPEG").write_bytes(good[: len(good) // 2])
    (root / "n00000002" / "error_page.JPEG").write_text("<html>404 not found</html>")
    (root / "n00000003" / "empty.JPEG").write_bytes(b"")
    with pytest.warns(UserWarning, match=r"skipped 3 unreadable image file\(s\)"):
        index = scan_image_folder(root)
    assert len(index.files) == 64 and len(index.skipped) == 3
    reasons = " ".join(index.skipped)
    assert "truncated.JPEG (truncated JPEG" in reasons and "error_page.JPEG (not an image" in reasons
    assert "empty.JPEG (empty file)" in reasons
    # verification off: the files stay in the index (the decoder will complain instead)
    assert len(scan_image_folder(root, verify=False).files) == 67
    assert check_image_file(root / "n00000001" / "truncated.JPEG").startswith("truncated JPEG")


def test_png_signature_accepted(tmp_path):
    from PIL import Image

    (tmp_path / "c").mkdir()
    Image.new("RGB", (9, 7), (10, 20, 30)).save(tmp_path / "c" / "disguised.JPEG", format="PNG")  # ImageNet has one
    assert check_image_file(tmp_path / "c" / "disguised.JPEG") is None
    assert len(scan_image_folder(tmp_path).files) == 1


def test_folder_eval_loader_fixed_classes(tmp_path, imagenet_tree):
    classes = [f"n{k:08d}" for k in range(6)]  # checkpoint knows more classes than this cell has
    cell = _copy_tree(imagenet_tree / "val", tmp_path / "gaussian_noise" / "3")
    loader = build_folder_eval_loader(cell, classes, batch_size=10, image_size=32, backend="torchvision",
                                      num_workers=0)
    labels = [y for _, batch in loader for y in batch.tolist()]
    assert sorted(labels) == sorted([0, 1, 2, 3] * 6) and loader.classes == classes
    shutil.copytree(cell / "n00000000", cell / "n12345678")
    with pytest.raises(DatasetLayoutError, match="n12345678"):
        build_folder_eval_loader(cell, classes, batch_size=10, image_size=32, backend="torchvision")


def test_cli_lists_bad_files(tmp_path, imagenet_tree, capsys):
    root = _copy_tree(imagenet_tree / "val", tmp_path / "val")
    assert main([str(root)]) == 0
    (root / "n00000000" / "bad.JPEG").write_text("nope")
    assert main([str(root)]) == 1
    assert "bad.JPEG (not an image" in capsys.readouterr().out


def test_class_with_only_unreadable_files_is_refused(tmp_path, imagenet_tree):
    root = tmp_path / "val"
    shutil.copytree(imagenet_tree / "val", root)
    dead = sorted(p for p in root.iterdir() if p.is_dir())[1]
    for f in dead.iterdir():
        f.write_bytes(b"<html>moved</html>")
    with pytest.raises(DatasetLayoutError, match=f"every image file is unreadable in class folder\\(s\\) {dead}"):
        scan_image_folder(root)
    # evaluation cells (allow_empty) count such files instead: the suite decides what an empty cell means
    index = scan_image_folder(root, allow_empty=True, warn=False)
    assert len(index.skipped) == len(list(dead.iterdir())) and 1 not in index.labels
