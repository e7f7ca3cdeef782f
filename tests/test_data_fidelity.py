"""Issue 18, data and weights fidelity: what an evaluation scores is what the user's files and checkpoint hold.

Each test builds the bad input for real (a header-valid JPEG with a scrambled body, a GIF, a 16-bit PNG, a
16000 x 16000 PNG, a symlink, NaN weights, broken .npy files, pickled objects) and checks that every
command and every decoding backend skips, counts and names it the same way, or stops with one line.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from apr.cli import run_main
from apr.errors import UserError
from conftest import has_dali
from test_ood import CLASSES, FAST, bright_images, save_detector, write_nested_pngs

pytestmark = pytest.mark.usefixtures("one_thread")  # cnn_tiny runs ~15x faster on one thread on a busy box


BACKENDS = ["torchvision", "gpu"] + (["dali"] if has_dali() else [])


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    return save_detector(tmp_path_factory.mktemp("ckpt") / "detector.pt", CLASSES)


def write_garbled_jpeg(path: Path, seed: int = 0) -> Path:
    """A JPEG whose header and end marker are intact but whose entropy-coded body is random bytes: it passes
    the header check, PIL and torchvision refuse it, DALI decodes it into garbage."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    data = bytearray(buf.getvalue())
    body = data.find(b"\xff\xda") + 14
    data[body:-2] = rng.integers(0, 256, len(data) - body - 2, dtype=np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(data))
    return path


def write_huge_png(path: Path, side: int = 16000) -> Path:
    """A valid greyscale PNG of side x side zero pixels (a few hundred KB): PIL refuses to open it
    (decompression-bomb limit), other decoders would allocate side**2 bytes."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    packer, row = zlib.compressobj(1), b"\x00" * (side + 1)
    body = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


def corrupted_tree(val: Path, dst: Path, broken_class: str | None = None, n_broken: int = 1,
                   only_broken: bool = False) -> Path:
    """``dst/gaussian_noise/1/<class>/`` holding the val images (none of ``broken_class`` when
    ``only_broken``) plus ``n_broken`` garbled JPEGs in ``broken_class``."""
    cell = dst / "gaussian_noise" / "1"
    shutil.copytree(val, cell)
    if broken_class is not None:
        if only_broken:
            for f in (cell / broken_class).iterdir():
                f.unlink()
        for i in range(n_broken):
            write_garbled_jpeg(cell / broken_class / f"garbled_{i}.JPEG", seed=i)
    return dst


def eval_options(backend: str):
    from apr.evaluation import EvalOptions

    return EvalOptions(corruptions=["gaussian_noise"], severities=[1], backend=backend, num_workers=0, batch_size=16,
                       precision="fp32", device="cpu", progress=False)


# ----------------------------------------------------------------------------- undecodable files (items 3, 7)


def test_garbled_jpeg_passes_the_header_check_but_not_the_decode_check(tmp_path):
    from apr.data.layout import check_image_file

    path = write_garbled_jpeg(tmp_path / "x.JPEG")
    assert check_image_file(path) is None  # the cheap check cannot see it
    assert "undecodable" in check_image_file(path, decode=True)


def test_decode_check_is_cached_per_folder_until_its_files_change(tmp_path, monkeypatch):
    from apr.data import layout

    folder = write_nested_pngs(tmp_path / "imgs", bright_images(6, seed=1))
    write_garbled_jpeg(folder / "part0" / "bad.jpg")
    files = sorted(str(p) for p in folder.rglob("*") if p.is_file())
    first = layout.check_files(files, decode=True)
    assert sum(r is not None for r in first) == 1
    calls = []
    monkeypatch.setattr(layout, "decode_problem", lambda path: calls.append(str(path)))
    assert layout.check_files(files, decode=True) == first and calls == []  # nothing decoded again
    Image.fromarray(bright_images(1, seed=7, size=40)[0]).save(folder / "part1" / "im004.png")  # one file changes
    layout.check_files(files, decode=True)
    assert sorted(calls) == sorted(f for f in files if Path(f).parent == folder / "part1")  # its folder only


@pytest.mark.parametrize("backend", BACKENDS)
def test_garbled_jpeg_in_a_cell_is_skipped_counted_and_named_on_every_backend(backend, detector, imagenet_tree,
                                                                               tmp_path):
    from apr.data.suites import FolderCSuite
    from apr.evaluation import evaluate_checkpoint

    c_root = corrupted_tree(imagenet_tree / "val", tmp_path / "c", broken_class=CLASSES[1])
    result = evaluate_checkpoint(detector, FolderCSuite(c_root, imagenet_tree / "val"), tmp_path / "out",
                                 eval_options(backend))
    cell = result["corruptions"]["gaussian_noise"]["1"]
    assert (cell["count"], cell["unreadable"]) == (24, 1)
    assert "garbled_0.JPEG" in cell["unreadable_files"][0] and "undecodable" in cell["unreadable_files"][0]
    assert cell["error"] == pytest.approx(result["clean"]["error"], abs=1 / 24)  # the same images as clean


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_cell_whose_files_are_all_broken_is_named_before_any_work(backend, detector, imagenet_tree, tmp_path):
    from apr.data.suites import EvalError, FolderCSuite
    from apr.evaluation import evaluate_checkpoint

    c_root = tmp_path / "c"
    for name in CLASSES[:2]:
        for i in range(3):
            write_garbled_jpeg(c_root / "gaussian_noise" / "1" / name / f"g{i}.JPEG", seed=i)
    with pytest.raises(EvalError, match=r"gaussian_noise/1 \(all 6 image files are unreadable\)"):
        evaluate_checkpoint(detector, FolderCSuite(c_root, imagenet_tree / "val"), tmp_path / "out",
                            eval_options(backend))
    assert not (tmp_path / "out" / "detector.json").exists()  # not even the clean cell was scored


@pytest.mark.parametrize("backend", BACKENDS)
def test_gif_and_garbled_files_in_an_ood_folder_are_skipped_the_same_on_every_backend(backend, detector,
                                                                                      imagenet_tree, tmp_path):
    from apr.ood import evaluate_ood

    folder = write_nested_pngs(tmp_path / "ood", bright_images(6, seed=3))
    Image.fromarray(bright_images(1, seed=4)[0]).save(folder / "anim.gif")
    write_garbled_jpeg(folder / "garbled.jpg")
    result = evaluate_ood(detector, in_folder=imagenet_tree / "val", ood={"x": str(folder)}, out_dir=tmp_path,
                          **{**FAST, "backend": backend})
    record = result["ood_sets"]["x"]
    assert (record["count"], record["skipped_count"]) == (6, 2)
    assert sorted(Path(s.split(" (")[0]).name for s in record["skipped"]) == ["anim.gif", "garbled.jpg"]
    assert record["metrics"]["max_logit"]["auroc"] == pytest.approx(1.0)


def test_an_image_too_large_to_decode_is_counted_as_skipped(detector, imagenet_tree, tmp_path):
    from apr.ood import evaluate_ood

    folder = write_nested_pngs(tmp_path / "ood", bright_images(4, seed=5))
    write_huge_png(folder / "huge.png")
    result = evaluate_ood(detector, in_folder=imagenet_tree / "val", ood={"x": str(folder)}, out_dir=tmp_path, **FAST)
    record = result["ood_sets"]["x"]
    assert (record["count"], record["skipped_count"]) == (4, 1)
    assert "huge.png" in record["skipped"][0] and "DecompressionBomb" in record["skipped"][0]
    assert sum(record["histograms"]["msp"]["out"]) == record["count"]


@pytest.mark.skipif(not has_dali(), reason="needs NVIDIA DALI")
def test_dali_training_leaves_out_and_lists_a_garbled_file(imagenet_tree, tmp_path):
    from apr.config import Config
    from apr.data import build_train_loader

    shutil.copytree(imagenet_tree / "train", tmp_path / "data" / "train")
    bad = write_garbled_jpeg(tmp_path / "data" / "train" / CLASSES[0] / "garbled.JPEG")
    cfg = Config()
    cfg.data.root, cfg.data.backend, cfg.data.image_size, cfg.data.num_workers = str(tmp_path / "data"), "dali", 32, 1
    cfg.train.batch_size = 8
    loader = build_train_loader(cfg.validate())
    assert str(bad) not in loader.files and len(loader.files) == 64
    assert loader.scan_skipped[0].startswith(str(bad))


def test_a_training_run_folder_lists_the_files_it_trained_without(tmp_path):
    from types import SimpleNamespace

    from apr.train import _record_skipped

    run = SimpleNamespace(run_dir=tmp_path, train_loader=SimpleNamespace(scan_skipped=["/d/a.JPEG (undecodable: x)"]))
    _record_skipped(run)
    assert (tmp_path / "skipped_files.txt").read_text() == "/d/a.JPEG (undecodable: x)\n"
    run.train_loader.scan_skipped = []  # the files were replaced: the list goes
    _record_skipped(run)
    assert not (tmp_path / "skipped_files.txt").exists()


# ----------------------------------------------------------------------------- 16-bit PNG (item 6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_16_bit_greyscale_png_reads_the_same_on_every_backend(backend, tmp_path):
    from apr.data import build_image_loader

    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    loader = build_image_loader([str(tmp_path / "g16.png")], [0], ["a"], backend=backend, batch_size=1, train=False,
                                image_size=64, num_workers=0, device="cpu")
    (images, _), = list(loader)
    want = torch.from_numpy(ramp.astype(np.float32) / 65535.0).expand(3, 64, 64)
    assert (images[0] - want).abs().max() <= 1.5 / 255


# ----------------------------------------------------------------------------- preprocessing follows the checkpoint (4)


@pytest.mark.parametrize("dataset, size, resize, override, want", [
    ("cifar10", 32, 256, {}, (32, 32)),  # a CIFAR checkpoint sees the whole photo at 32 px
    ("imagefolder", 224, 256, {}, (224, 256)),  # an ImageNet checkpoint what its own val saw
    ("imagefolder", 224, 256, {"image_size": 288}, (288, 329)),  # a new size scales the resize
    ("cifar10", 32, 256, {"resize": 40}, (32, 40)),
])
def test_one_preprocessing_rule_per_checkpoint(dataset, size, resize, override, want):
    from types import SimpleNamespace

    from apr.data import eval_preprocessing

    pre = eval_preprocessing(SimpleNamespace(dataset=dataset, image_size=size, val_resize=resize), **override)
    assert (pre.image_size, pre.resize) == want


def photos_with_a_dark_centre(root: Path, n: int = 6) -> Path:
    """128 px bright photos whose central 16 px are black: a 32 px crop of a 256 px resize sees only black."""
    images = bright_images(n, seed=9, size=128)
    images[:, 56:72, 56:72] = 0
    root.mkdir(parents=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(root / f"p{i}.png")
    return root


def test_cifar_checkpoint_scores_a_photo_folder_on_the_whole_image(cifar10_folder, tmp_path):
    from apr.data.cifar import load_cifar
    from apr.ood import evaluate_ood

    classes = load_cifar(cifar10_folder, "cifar10", train=False)[2]
    ckpt = save_detector(tmp_path / "cifar.pt", classes, dataset="cifar10")  # data.val_resize stays 32 here
    state = torch.load(ckpt, weights_only=True)
    state["config"]["data"]["val_resize"] = 256  # what the CIFAR recipes keep
    torch.save(state, ckpt)
    photos = photos_with_a_dark_centre(tmp_path / "photos")
    run = dict(in_cifar=cifar10_folder, ood={"photos": str(photos)}, **FAST)
    whole = evaluate_ood(ckpt, out_dir=tmp_path / "whole", **run)
    assert (whole["settings"]["image_size"], whole["settings"]["val_resize"]) == (32, 32)
    assert whole["settings"]["preprocessing"] == "resize shorter side to 32, centre crop 32"
    assert whole["ood_sets"]["photos"]["metrics"]["max_logit"]["auroc"] > 0.95  # bright photos: clearly OOD
    patch = evaluate_ood(ckpt, out_dir=tmp_path / "patch", resize=256, **run)  # the override, the old view
    assert patch["ood_sets"]["photos"]["metrics"]["max_logit"]["auroc"] < 0.5


# ----------------------------------------------------------------------------- symlinks, classes, V2 (items 8, 10, 11)


def test_ood_folder_with_a_link_to_an_in_distribution_image_is_refused(detector, imagenet_tree, tmp_path):
    from apr.data.ood_sets import OODSetError
    from apr.ood import evaluate_ood

    folder = write_nested_pngs(tmp_path / "ood", bright_images(4, seed=2))
    target = sorted((imagenet_tree / "val" / CLASSES[0]).iterdir())[0]
    os.symlink(target, folder / "linked.JPEG")
    with pytest.raises(OODSetError, match=r"linked.JPEG is a link to .*an image of the in-distribution set"):
        evaluate_ood(detector, in_folder=imagenet_tree / "val", ood={"x": str(folder)}, out_dir=tmp_path, **FAST)


def test_sets_without_some_classes_are_warned_about_and_recorded(detector, imagenet_tree, tmp_path):
    from apr.data.suites import FolderCSuite
    from apr.evaluation import evaluate_checkpoint
    from apr.ood import evaluate_ood

    val = tmp_path / "val"
    shutil.copytree(imagenet_tree / "val", val, ignore=lambda d, names: [n for n in names if n == CLASSES[3]])
    c_root = corrupted_tree(val, tmp_path / "c")
    with pytest.warns(UserWarning, match=r"no readable image of 1 of the model's classes \(n00000003\)"):
        result = evaluate_checkpoint(detector, FolderCSuite(c_root, val), tmp_path / "out", eval_options("torchvision"))
    assert result["clean"]["missing_classes"] == [CLASSES[3]]
    folder = write_nested_pngs(tmp_path / "ood", bright_images(3, seed=2))
    with pytest.warns(UserWarning, match="no readable image of 1 of the model's classes"):
        ood = evaluate_ood(detector, in_folder=val, ood={"x": str(folder)}, out_dir=tmp_path / "ood_out", **FAST)
    assert ood["in_distribution"]["missing_classes"] == [CLASSES[3]]


def test_imagenet_r_scored_on_fewer_classes_is_marked_in_the_report():
    from apr.report.shift import _suite_summary

    block = {"cells": {"imagenet-r": {"count": 10, "correct": 6, "scored_classes": 199}}}
    assert _suite_summary("imagenet-r", block)["partial"]
    assert not _suite_summary("imagenet-r", {"cells": {"imagenet-r": {**block["cells"]["imagenet-r"],
                                                                      "scored_classes": 200}}})["partial"]


def test_imagenet_v2_with_class_names_that_are_not_wnids_follows_the_class_list(tmp_path):
    from apr.data.suites import FolderShiftSuite

    names = [f"class {999 - i}" for i in range(1000)]  # a --classes file of words, in the model's output order
    for folder in ("0", "3", "998"):
        (tmp_path / "v2" / folder).mkdir(parents=True)
    suite = FolderShiftSuite("imagenet-v2", tmp_path / "v2").bind(names)
    assert suite.label_of == {"0": 0, "3": 3, "998": 998}
    assert suite.source()["label_order"] == "class list"
    wnids = [f"n{i:08d}" for i in range(1000)][::-1]  # wnids in any order: folder i = the i-th sorted wnid
    assert FolderShiftSuite("imagenet-v2", tmp_path / "v2").bind(wnids).label_of["3"] == 996


# ----------------------------------------------------------------------------- CIFAR-10.1 files (item 12)


def _write_cifar101(root: Path, data, labels) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for part, value in (("data", data), ("labels", labels)):
        path = root / f"cifar10.1_v6_{part}.npy"
        if isinstance(value, bytes):
            path.write_bytes(value)
        else:
            np.save(path, value, allow_pickle=True)


GOOD = np.zeros((4, 32, 32, 3), dtype=np.uint8)


@pytest.mark.parametrize("data, labels, match", [
    (GOOD, np.array([0.0, 2.5, 3.0, 9.0]), r"labels.npy: labels must be whole class indices"),
    (GOOD, np.array([0, 1, 2, 10]), r"labels.npy: labels run from 0 to 10"),
    (np.zeros((0, 32, 32, 3), dtype=np.uint8), np.zeros(0, dtype=np.int64), r"data.npy holds no images"),
    (np.array([GOOD[0]] * 4 + [None], dtype=object)[:4], np.arange(4), r"data.npy as a NumPy array file"),
    (np.random.default_rng(0).bytes(5000), np.arange(4), r"data.npy as a NumPy array file"),
    (GOOD, b"\x93NUMPY garbage", r"labels.npy as a NumPy array file"),
], ids=["float_labels", "label_out_of_range", "zero_images", "object_array", "random_bytes", "garbled_labels"])
def test_broken_cifar10_1_files_are_named_before_any_work(data, labels, match, tmp_path):
    from apr.data.suites import CIFAR10_CLASSES, Cifar101Suite, EvalError

    _write_cifar101(tmp_path / "c101", data, labels)
    suite = Cifar101Suite(tmp_path / "c101").bind(list(CIFAR10_CLASSES))
    with pytest.raises(EvalError, match=match):
        suite.cells()


# ----------------------------------------------------------------------------- weights (item 9 and the tracebacks)


def nan_checkpoint(detector: Path, dst: Path) -> Path:
    state = torch.load(detector, weights_only=True)
    state["model"]["fc.weight"][0, 0] = float("nan")
    torch.save(state, dst)
    return dst


def _commands(ckpt: Path, imagenet_tree: Path, tmp_path: Path) -> dict:
    from apr.adversarial.__main__ import main as adv_main
    from apr.commands.evaluate import _evaluate_all
    from apr.ood import main as ood_main

    val = str(imagenet_tree / "val")
    fast = ["--workers", "0", "--device", "cpu", "--backend", "torchvision"]
    c_root = corrupted_tree(imagenet_tree / "val", tmp_path / "c")
    return {
        "eval": (_evaluate_all, ["--checkpoint", str(ckpt), "--imagenet-c", str(c_root), "--val", val, "--corruptions",
                                 "gaussian_noise", "--severities", "1", "--out", str(tmp_path / "e"), "--quiet",
                                 "--precision", "fp32", "--no-report"] + fast),
        "ood": (ood_main, ["--checkpoint", str(ckpt), "--in", val, "--ood", f"x={imagenet_tree / 'train'}", "--out",
                           str(tmp_path / "o"), "--quiet"] + fast),
        "adversarial": (adv_main, ["--checkpoint", str(ckpt), "--val", val, "--attack", "fgsm", "--n", "8", "--out",
                                   str(tmp_path / "a")] + fast),
    }


@pytest.mark.parametrize("command", ["eval", "ood", "adversarial"])
def test_non_finite_weights_are_refused_by_every_command_naming_the_tensor(command, detector, imagenet_tree,
                                                                           tmp_path, capsys):
    ckpt = nan_checkpoint(detector, tmp_path / "nan.pt")
    main, argv = _commands(ckpt, imagenet_tree, tmp_path)[command]
    assert run_main(main, argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err
    assert "non-finite weights: tensor fc.weight has 1 NaN" in lines[0]
    assert not any(p.suffix == ".json" for p in tmp_path.rglob("*.json"))


def test_non_finite_third_party_weights_are_refused(detector, tmp_path):
    from apr.models import WeightsError, create_model_from_weights

    state = torch.load(nan_checkpoint(detector, tmp_path / "nan.pt"), weights_only=True)["model"]
    state["fc.bias"][1] = float("inf")
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(WeightsError, match=r"tensor fc.weight has 1 NaN .* \(2 tensors are not finite\)"):
        create_model_from_weights("cnn_tiny", tmp_path / "w.pth", 4)


def test_autoattack_on_a_model_with_fewer_than_10_classes_is_refused_up_front(detector, imagenet_tree, tmp_path,
                                                                              capsys):
    from apr.adversarial.__main__ import main as adv_main

    argv = ["--checkpoint", str(detector), "--val", str(imagenet_tree / "val"), "--attack", "fgsm", "autoattack",
            "--n", "8", "--out", str(tmp_path), "--workers", "0", "--device", "cpu", "--backend", "torchvision"]
    assert run_main(adv_main, argv) == 2
    err = capsys.readouterr().err
    assert "has 4 classes; the standard AutoAttack ensemble needs at least 10" in err and "Traceback" not in err
    assert not (tmp_path / "detector.adv.json").exists()  # no clean pass was run


class Foo:
    """A class a weights file must not make us import and run."""


def _pickled_object(path: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump({"model": Foo()}, f)


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_bytes(b""), "the file is empty (0 bytes)"),
    (_pickled_object, "it is not a weights file, and it is not loaded, for safety"),
    (lambda p: torch.save({"model": Foo()}, p), "Python object (test_data_fidelity.Foo) that safe loading refuses"),
], ids=["empty", "raw_pickle", "torch_saved_object"])
@pytest.mark.parametrize("loader", ["checkpoint", "weights"])
def test_empty_or_pickled_weights_files_are_one_clear_line(make, message, loader, tmp_path):
    from apr.checkpoint import load_checkpoint
    from apr.models import read_state_dict

    path = tmp_path / "w.pth"
    make(path)
    with pytest.raises(UserError) as exc:
        (load_checkpoint if loader == "checkpoint" else read_state_dict)(path)
    assert message in str(exc.value) and "\n" not in str(exc.value) and "weights_only=False" not in str(exc.value)
