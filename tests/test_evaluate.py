"""apr.evaluation and eval_imagenet_c.py on a real (tiny) ImageNet-C tree and a tiny trained model.

The corrupted tree is generated from the shared digit photos with apr.corrupt (all 15
corruptions x 5 severities), the checkpoint is a cnn_tiny trained here for a few steps. The
numbers are checked against an independent per-image computation (PIL decode, NumPy
preprocessing, NumPy ECE), not against the code under test.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from apr.checkpoint import CheckpointError, save_checkpoint
from apr.config import Config, config_to_dict
from apr.data import DatasetLayoutError
from apr.data.suites import make_suite
from apr.evaluation import EvalError, EvalOptions, evaluate_checkpoint, file_sha256, load_result
from apr.metrics import ALEXNET_ERRORS, CORRUPTIONS
from apr.models import create_model
from apr.report import metrics_for
from conftest import has_dali, single_thread

pytestmark = pytest.mark.usefixtures("one_thread")  # cnn_tiny runs ~15x faster on one thread on a busy box

REPO = Path(__file__).resolve().parents[1]
CLASSES = [f"n{k:08d}" for k in range(4)]
FAST = dict(backend="torchvision", num_workers=0, batch_size=10, precision="fp32", device="cpu", progress=False)


def run_eval(checkpoint_path, *, out_dir, imagenet_c_root=None, val_root=None, cifar_c_root=None, cifar_root=None,
             dataset=None, run_name=None, on_cell_done=None, **options):
    """evaluate_checkpoint with the suite built from paths, as eval_imagenet_c.py does."""
    suite = make_suite(imagenet_c=imagenet_c_root, val=val_root, cifar_c=cifar_c_root, cifar=cifar_root,
                       dataset=dataset)
    return evaluate_checkpoint(checkpoint_path, suite, out_dir, EvalOptions(**options), run_name=run_name,
                               on_cell_done=on_cell_done)


# ----------------------------------------------------------------------------- references


def load_folder(folder: Path, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """PIL decode of <folder>/<class>/*, uint8 N x H x W x 3 (all images here are 32x32)."""
    images, labels = [], []
    for k, name in enumerate(classes):
        for path in sorted((folder / name).iterdir()):
            with Image.open(path) as img:
                images.append(np.asarray(img.convert("RGB")))
            labels.append(k)
    return np.stack(images), np.asarray(labels)


def reference_predictions(model, images_uint8: np.ndarray, mean, std) -> np.ndarray:
    """Softmax probabilities: NumPy preprocessing, plain float32 NCHW forward."""
    x = images_uint8.astype(np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    with torch.no_grad():
        logits = model.eval()(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
    return torch.softmax(logits.double(), dim=1).numpy()


def reference_ece(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """Per-sample ECE: bins (b/n, (b+1)/n], 0 goes into the first bin."""
    conf = probs.max(1)
    correct = probs.argmax(1) == labels
    ece = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        mask = (conf > lo) & (conf <= hi) if b else (conf <= hi)
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - conf[mask].mean())
    return float(ece)


def reference_rms(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """sqrt(sum_b (n_b/N) (acc_b - conf_b)^2), the same bins as reference_ece, per sample."""
    conf = probs.max(1)
    correct = probs.argmax(1) == labels
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        mask = (conf > lo) & (conf <= hi) if b else (conf <= hi)
        if mask.any():
            total += mask.mean() * (correct[mask].mean() - conf[mask].mean()) ** 2
    return float(np.sqrt(total))


def reference_cell(model, images, labels, cfg) -> dict:
    probs = reference_predictions(model, images, cfg.data.mean, cfg.data.std)
    return {"error": float((probs.argmax(1) != labels).mean()), "ece": reference_ece(probs, labels),
            "rms": reference_rms(probs, labels), "count": len(labels)}


# ----------------------------------------------------------------------------- fixtures


def train_tiny(images: np.ndarray, labels: np.ndarray, num_classes: int, cfg: Config, steps: int = 40):
    """A few full-batch Adam steps: good enough to be far better than chance on digits."""
    torch.manual_seed(0)
    model = create_model("cnn_tiny", num_classes)
    x = (images.astype(np.float32) / 255.0 - np.asarray(cfg.data.mean, np.float32)) / np.asarray(cfg.data.std, np.float32)
    x = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    y = torch.from_numpy(labels.astype(np.int64))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    with single_thread():
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()


def save_tiny(path: Path, model, classes: list[str], cfg: Config) -> Path:
    return save_checkpoint({"model": model.state_dict(), "model_name": "cnn_tiny", "num_classes": len(classes),
                            "classes": list(classes), "config": config_to_dict(cfg), "epoch": 1, "step": 40}, path)


@pytest.fixture(scope="session")
def tiny_config() -> Config:
    cfg = Config()
    cfg.data.image_size = 32
    cfg.data.val_resize = 32
    cfg.model.name = "cnn_tiny"
    cfg.aug.name = "apr_p"
    cfg.data.extra_roots = ["/data/EDSR"]
    cfg.train.run_name = "tiny"
    return cfg.validate()


@pytest.fixture(scope="session")
def tiny_checkpoint(imagenet_tree, tiny_config, tmp_path_factory):
    images, labels = load_folder(imagenet_tree / "train", CLASSES)
    model = train_tiny(images, labels, 4, tiny_config)
    path = save_tiny(tmp_path_factory.mktemp("ckpt") / "tiny.pt", model, CLASSES, tiny_config)
    return path, model


@pytest.fixture(scope="session")
def c_tree(imagenet_tree, tmp_path_factory) -> Path:
    """All 15 corruptions x 5 severities of the 24 val digits, 32x32 as they are."""
    from apr.corrupt import make_corrupted_tree

    dst = tmp_path_factory.mktemp("imagenet_c") / "c"
    make_corrupted_tree(imagenet_tree / "val", dst, corruptions=CORRUPTIONS, severities=(1, 2, 3, 4, 5),
                        resize=None, crop=None, workers=0, progress=False)
    return dst


@pytest.fixture(scope="session")
def full_eval(tiny_checkpoint, c_tree, imagenet_tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_full")
    with single_thread():
        result = run_eval(tiny_checkpoint[0], imagenet_c_root=c_tree, val_root=imagenet_tree / "val",
                                     out_dir=out, **FAST)
    return result, out


def tree_without(c_tree: Path, dst: Path, cells: list[str]) -> Path:
    """A copy of the tree lacking some corruption/severity folders."""
    shutil.copytree(c_tree, dst)
    for cell in cells:
        shutil.rmtree(dst / cell)
    return dst


# ----------------------------------------------------------------------------- tests


def test_full_tree_gives_all_cells(full_eval, tiny_checkpoint, tiny_config, c_tree, imagenet_tree):
    result, out = full_eval
    assert load_result(out / "tiny.json") == json.loads(json.dumps(result))
    assert result["schema"] == "apr.eval/1" and result["run_name"] == "tiny"
    assert result["dataset"] == "folder-c"  # 4 classes: not ImageNet, so no AlexNet normalisation
    assert result["checkpoint_sha256"] == file_sha256(tiny_checkpoint[0])
    assert result["aug"] == "apr_p" and result["extra_roots"] == ["/data/EDSR"]
    assert result["config"]["data"]["image_size"] == 32
    assert set(result["versions"]) == {"apr", "torch", "torchvision", "timm", "dali", "python"}
    assert result["versions"]["torch"] == torch.__version__
    assert result["throughput_images_per_s"] > 0
    assert list(result["corruptions"]) == list(CORRUPTIONS)
    for corruption, cells in result["corruptions"].items():
        assert list(cells) == ["1", "2", "3", "4", "5"], corruption
        for cell in cells.values():
            assert cell["count"] == 24
            assert 0.0 <= cell["error"] <= 1.0 and 0.0 <= cell["ece"] <= 1.0
            assert cell["error"] * 24 == pytest.approx(round(cell["error"] * 24))
    clean = result["clean"]
    assert clean["count"] == 24 and clean["top5_error"] == 0.0  # 4 classes: the label is always in the top 5
    assert clean["error"] < 0.5  # trained: far better than chance (0.75)
    # raw results only: no normalisation in the evaluator's JSON; apr.report derives the metrics
    assert "metrics" not in result and result["finished"] is True and result["skipped"] == {}
    assert result["source"] == {"suite": "folder-c", "corrupted": str(c_tree.resolve()),
                                "clean": str((imagenet_tree / "val").resolve())}
    for cell in [clean] + [c for cells in result["corruptions"].values() for c in cells.values()]:
        assert cell["unreadable"] == 0 and cell["fingerprint"]["files"] == 24 and cell["fingerprint"]["bytes"] > 0
        assert cell["correct"] == round((1 - cell["error"]) * 24) and sum(cell["calibration"]["count"]) == 24
    metrics = metrics_for(result)  # folder-c: raw errors, as --help says (AlexNet's are ImageNet-C's)
    assert metrics["normalisation"] == "none" and metrics["mce"] is None and metrics["partial"] is False
    expected_mean = 100 * np.mean([np.mean([c["error"] for c in cells.values()])
                                   for cells in result["corruptions"].values()])
    assert metrics["mean_corruption_error"] == pytest.approx(expected_mean)


def test_errors_match_independent_computation(full_eval, tiny_checkpoint, tiny_config, imagenet_tree, c_tree):
    result, _ = full_eval
    _, model = tiny_checkpoint
    images, labels = load_folder(imagenet_tree / "val", CLASSES)
    ref = reference_cell(model, images, labels, tiny_config)
    assert result["clean"]["error"] == pytest.approx(ref["error"], abs=1e-9)
    assert result["clean"]["ece"] == pytest.approx(ref["ece"], abs=1e-5)
    assert result["clean"]["rms_calibration_error"] == pytest.approx(ref["rms"], abs=1e-5)
    assert ref["rms"] >= ref["ece"] - 1e-12  # RMS over bins >= mean absolute gap (Jensen)
    for cell in ("gaussian_noise/5", "fog/3", "jpeg_compression/1", "glass_blur/4"):
        corruption, severity = cell.split("/")
        images, labels = load_folder(c_tree / corruption / severity, CLASSES)
        ref = reference_cell(model, images, labels, tiny_config)
        got = result["corruptions"][corruption][severity]
        assert got["error"] == pytest.approx(ref["error"], abs=1e-9), cell
        assert got["ece"] == pytest.approx(ref["ece"], abs=1e-5), cell
        assert got["rms_calibration_error"] == pytest.approx(ref["rms"], abs=1e-5), cell


def test_report_renders(full_eval, tmp_path):
    from apr.report import write_report

    result, out = full_eval
    report = write_report([out / "tiny.json"], tmp_path / "report")
    assert report.is_file() and "tiny" in report.read_text()
    assert list((tmp_path / "report").glob("*.png")), "the report draws its plots"


def test_missing_cells_are_listed_before_any_work(tiny_checkpoint, c_tree, imagenet_tree, tmp_path):
    tree = tree_without(c_tree, tmp_path / "c", ["fog/3", "snow/5"])
    done = []
    with pytest.raises(EvalError, match=r"2 of 75 .*: snow/5, fog/3\. .*--allow-partial"):
        run_eval(tiny_checkpoint[0], imagenet_c_root=tree, val_root=imagenet_tree / "val",
                            out_dir=tmp_path / "out", on_cell_done=lambda *a: done.append(a), **FAST)
    assert done == [] and not (tmp_path / "out" / "tiny.json").exists()
    # --extra asks for the 4 held-out corruptions too; this tree has none of them
    with pytest.raises(EvalError, match=r"22 of 95 .*snow/5, fog/3, speckle_noise/1, .*saturate/5\. "):
        run_eval(tiny_checkpoint[0], imagenet_c_root=tree, val_root=imagenet_tree / "val",
                            out_dir=tmp_path / "out", extra=True, **FAST)


def test_allow_partial_gives_partial_mce(full_eval, tiny_checkpoint, c_tree, imagenet_tree, tmp_path):
    tree = tree_without(c_tree, tmp_path / "c", ["fog/3"])
    result = run_eval(tiny_checkpoint[0], imagenet_c_root=tree, val_root=imagenet_tree / "val",
                                 out_dir=tmp_path / "out", allow_partial=True, dataset="imagenet-c", **FAST)
    metrics = metrics_for(result)
    assert result["skipped"] == {"fog/3": "missing"}
    assert metrics["partial"] is True and metrics["missing"] == ["fog/3"]
    assert "3" not in result["corruptions"]["fog"] and len(result["corruptions"]["fog"]) == 4
    # AlexNet-normalised CE over the cells that are there: sum_s E_s / (n_s * AlexNet mean)
    ces = {c: 100 * sum(v["error"] for v in cells.values()) / (len(cells) * ALEXNET_ERRORS[c])
           for c, cells in result["corruptions"].items()}
    assert metrics["normalisation"] == "alexnet"
    assert metrics["mce"] == pytest.approx(np.mean(list(ces.values())))
    # the cells that exist are the same numbers as in the full run
    full = full_eval[0]["corruptions"]
    assert result["corruptions"]["fog"]["5"] == full["fog"]["5"]
    # a baseline run normalises cell by cell instead: a run against itself has CE 100
    again = metrics_for(result, baseline=full_eval[0])
    assert again["normalisation"] == "baseline:tiny"
    assert again["ce"]["snow"] == pytest.approx(100.0)


def test_class_mismatch_is_refused(tiny_checkpoint, c_tree, imagenet_tree, tmp_path):
    val = tmp_path / "val"
    shutil.copytree(imagenet_tree / "val", val)
    shutil.copytree(val / CLASSES[0], val / "n00000009")
    with pytest.raises(DatasetLayoutError, match=r"clean val .*1 class folder\(s\) the checkpoint does not know: n00000009"):
        run_eval(tiny_checkpoint[0], imagenet_c_root=c_tree, val_root=val, out_dir=tmp_path / "o", **FAST)
    # a checkpoint whose class list does not fit its classifier head
    state = torch.load(tiny_checkpoint[0], weights_only=True)
    state["classes"] = CLASSES + ["n00000009"]
    state["num_classes"] = 5
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    with pytest.raises(CheckpointError, match=r"does not fit the model.*5 classes"):
        run_eval(bad, imagenet_c_root=c_tree, val_root=imagenet_tree / "val", out_dir=tmp_path / "o", **FAST)


def test_interrupted_evaluation_resumes_to_the_same_numbers(full_eval, tiny_checkpoint, c_tree, imagenet_tree,
                                                           tmp_path):
    out = tmp_path / "out"
    seen = []

    def stop_after_five(corruption, severity, cell):
        seen.append(f"{corruption}/{severity}")
        if len(seen) == 6:  # clean + 5 corruption cells
            raise KeyboardInterrupt("preempted")

    kwargs = dict(imagenet_c_root=c_tree, val_root=imagenet_tree / "val", out_dir=out, **FAST)
    with pytest.raises(KeyboardInterrupt):
        run_eval(tiny_checkpoint[0], on_cell_done=stop_after_five, **kwargs)
    partial = load_result(out / "tiny.json")
    assert partial["finished"] is False  # unfinished
    assert [f"{c}/{s}" for c, cells in partial["corruptions"].items() for s in cells] == seen[1:]

    rerun = []
    result = run_eval(tiny_checkpoint[0], on_cell_done=lambda c, s, cell: rerun.append(f"{c}/{s}"),
                                 **kwargs)
    assert len(rerun) == 70 and not set(rerun) & set(seen)
    full = full_eval[0]
    for key in ("clean", "corruptions", "skipped", "finished", "checkpoint_sha256"):
        assert result[key] == full[key], key
    assert metrics_for(result) == metrics_for(full)
    # a finished evaluation rerun evaluates nothing and rewrites the same file
    before = (out / "tiny.json").read_bytes()
    rerun.clear()
    run_eval(tiny_checkpoint[0], on_cell_done=lambda *a: rerun.append(a), **kwargs)
    assert rerun == [] and (out / "tiny.json").read_bytes() == before


def test_another_checkpoint_at_the_same_path_starts_over(tiny_checkpoint, tiny_config, c_tree, imagenet_tree,
                                                         tmp_path):
    path = tmp_path / "tiny.pt"
    shutil.copy(tiny_checkpoint[0], path)
    kwargs = dict(imagenet_c_root=c_tree, val_root=imagenet_tree / "val", out_dir=tmp_path / "out",
                  corruptions=["fog"], severities=(1, 2), **FAST)
    first = run_eval(path, **kwargs)
    assert metrics_for(first)["partial"] is True  # a subset asked for on purpose is scored, marked partial
    _, model = tiny_checkpoint
    other = create_model("cnn_tiny", 4)
    other.load_state_dict({k: (v + 0.5 if v.is_floating_point() else v) for k, v in model.state_dict().items()})
    save_tiny(path, other, CLASSES, tiny_config)
    cells = []
    with pytest.warns(UserWarning, match="another checkpoint"):
        second = run_eval(path, on_cell_done=lambda c, s, cell: cells.append(f"{c}/{s}"), **kwargs)
    assert cells == ["clean/0", "fog/1", "fog/2"]
    assert second["checkpoint_sha256"] == file_sha256(path) != first["checkpoint_sha256"]


@pytest.fixture(scope="module")
def haze_tree(imagenet_tree, tmp_path_factory) -> Path:
    """One cell, fog/1, written without imagecorruptions (absent on the GPU machine): the val digits under a
    grey haze. The evaluator reads the layout; how a cell was made does not matter to it."""
    root = tmp_path_factory.mktemp("imagenet_c_haze") / "c"
    for path in sorted((imagenet_tree / "val").rglob("*.JPEG")):
        with Image.open(path) as img:
            hazy = (0.6 * np.asarray(img.convert("RGB"), np.float32) + 0.4 * 160).astype(np.uint8)
        out = root / "fog" / "1" / path.parent.name / path.name
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(hazy).save(out, quality=90)
    return root


# bf16 autocast rounds the input and the output of each of cnn_tiny's 3 conv + BN layers and its linear layer
# to 8 significant bits (2**-9 relative each): 8 roundings, 1.6 %, taken as 2 % of the image's largest logit
BF16_REL = 0.02


def borderline(model, folder: Path, cfg: Config) -> int:
    """Images whose top-2 logit margin (float64 on the CPU) bf16 rounding could close: the most it can flip."""
    images, _ = load_folder(folder, CLASSES)
    x = (images.astype(np.float64) / 255.0 - np.asarray(cfg.data.mean)) / np.asarray(cfg.data.std)
    with torch.no_grad():
        logits = model.double()(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
    model.float()
    top2 = logits.topk(2, dim=1).values
    return int(((top2[:, 0] - top2[:, 1]) <= 2 * BF16_REL * logits.abs().max(1).values).sum())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_bf16_flips_only_borderline_images(device, tiny_checkpoint, tiny_config, haze_tree, imagenet_tree, tmp_path):
    """bf16 (on the CPU, on the GPU) against fp32 on the CPU: a cell's error moves by at most the images whose
    margin bf16 could close, counted from float64 logits, not a fixed 1 in 24."""
    kwargs = dict(imagenet_c_root=haze_tree, val_root=imagenet_tree / "val", corruptions=["fog"], severities=(1,))
    fp32 = run_eval(tiny_checkpoint[0], out_dir=tmp_path / "fp32", **kwargs, **FAST)
    bf16 = run_eval(tiny_checkpoint[0], out_dir=tmp_path / "bf16", **kwargs,
                    **{**FAST, "device": device, "precision": "bf16"})
    assert bf16["eval"]["precision"] == "bf16"
    cells = {"clean": (bf16["clean"], fp32["clean"], imagenet_tree / "val"),
             "fog/1": (bf16["corruptions"]["fog"]["1"], fp32["corruptions"]["fog"]["1"], haze_tree / "fog" / "1")}
    for name, (got, want, folder) in cells.items():
        assert got["count"] == want["count"] == 24, name
        flips = round(abs(got["error"] - want["error"]) * 24)
        assert flips <= borderline(tiny_checkpoint[1], folder, tiny_config), name
    assert 0 < fp32["clean"]["error"] < fp32["corruptions"]["fog"]["1"]["error"] < 0.75  # a model, and a shift


@pytest.mark.skipif(not has_dali(), reason="needs NVIDIA DALI")
def test_dali_backend_agrees_with_torchvision(full_eval, tiny_checkpoint, c_tree, imagenet_tree, tmp_path):
    result = run_eval(tiny_checkpoint[0], imagenet_c_root=c_tree, val_root=imagenet_tree / "val",
                                 out_dir=tmp_path, corruptions=["fog"], severities=(1, 5),
                                 **{**FAST, "backend": "dali", "num_workers": 1})
    assert result["eval"]["backend"] == "dali"
    full = full_eval[0]
    # libjpeg-turbo (PIL) and nvImageCodec may round a few pixels differently: allow one image per cell
    assert abs(result["clean"]["error"] - full["clean"]["error"]) <= 1 / 24 + 1e-9
    for s in ("1", "5"):
        assert result["corruptions"]["fog"][s]["count"] == 24
        assert abs(result["corruptions"]["fog"][s]["error"] - full["corruptions"]["fog"][s]["error"]) <= 1 / 24 + 1e-9


def assert_same_cell(got: dict, want: dict) -> None:
    """Counts and errors exactly; ECE, RMS error and confidence sums to float32 precision (other batch
    sizes per rank change the conv kernels' rounding of the confidences in the 7th digit)."""
    assert set(got) == set(want)
    for key in want:
        if key in ("ece", "rms_calibration_error"):
            assert got[key] == pytest.approx(want[key], abs=1e-6), key
        elif key == "calibration":
            assert {k: v for k, v in got[key].items() if k != "confidence_sum"} == \
                {k: v for k, v in want[key].items() if k != "confidence_sum"}
            np.testing.assert_allclose(got[key]["confidence_sum"], want[key]["confidence_sum"], atol=1e-5)
        else:
            assert got[key] == want[key], key


def _distributed_worker(rank, world_size, port, args, queue):
    os.environ.update(WORLD_SIZE=str(world_size), RANK=str(rank), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        result = run_eval(**args)
        queue.put((rank, result["clean"], result["corruptions"]))
    finally:
        torch.distributed.destroy_process_group()


def test_two_ranks_give_the_numbers_of_one(full_eval, tiny_checkpoint, c_tree, imagenet_tree, tmp_path):
    """gloo on CPU: each rank sees half of every cell; the all-reduced numbers equal one process's."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = dict(checkpoint_path=str(tiny_checkpoint[0]), imagenet_c_root=str(c_tree),
                val_root=str(imagenet_tree / "val"), out_dir=str(tmp_path / "out"),
                corruptions=["motion_blur"], severities=(2, 4), **FAST)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(_distributed_worker, args=(2, port, args, queue), nprocs=2, join=True, start_method="spawn")
    got = {rank: (clean, cells) for rank, clean, cells in (queue.get(timeout=30) for _ in range(2))}
    full = full_eval[0]
    for rank in (0, 1):
        clean, corruptions = got[rank]
        assert_same_cell(clean, full["clean"])  # counts are summed over ranks: 24 images, not 12 or 48
        assert list(corruptions["motion_blur"]) == ["2", "4"]
        for s in ("2", "4"):
            assert_same_cell(corruptions["motion_blur"][s], full["corruptions"]["motion_blur"][s])
    written = load_result(tmp_path / "out" / "tiny.json")  # written once, by rank 0
    assert written["clean"]["count"] == 24


# ----------------------------------------------------------------------------- CIFAR-C


def write_cifar10_test_batch(root: Path, images: np.ndarray, labels: np.ndarray, names: list[str]) -> Path:
    """The python-pickle layout of the CIFAR-10 download: cifar-10-batches-py/{test_batch,batches.meta}."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    data = images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # CIFAR stores R plane, G plane, B plane
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": data, b"labels": [int(v) for v in labels], b"batch_label": b"testing batch 1 of 1"}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [n.encode() for n in names], b"num_cases_per_batch": len(images)}, f)
    return root


def test_cifar_c(digits_images, tmp_path):
    images, labels = digits_images
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    cfg = Config()
    cfg.data.dataset, cfg.data.image_size = "cifar10", 32
    cfg.data.mean, cfg.data.std = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]
    cfg.model.name, cfg.train.run_name = "cnn_tiny", "cifar_tiny"
    model = train_tiny(images[:300], labels[:300], 10, cfg, steps=30)
    ckpt = save_tiny(tmp_path / "c.pt", model, names, cfg)

    test_x, test_y = images[400:440], labels[400:440]
    cifar_root = write_cifar10_test_batch(tmp_path / "cifar", test_x, test_y, names)
    # fabricated CIFAR-10-C: 5 severity blocks of 20 images, stronger noise per severity
    cc = tmp_path / "cifar10c"
    cc.mkdir()
    rng = np.random.default_rng(0)
    block_x, block_y = images[500:520], labels[500:520]
    np.save(cc / "labels.npy", np.tile(block_y, 5).astype(np.uint8))
    for i, corruption in enumerate(CORRUPTIONS):
        blocks = [np.clip(block_x + rng.normal(0, 12 * s + 3 * i, block_x.shape), 0, 255).astype(np.uint8)
                  for s in range(1, 6)]
        np.save(cc / f"{corruption}.npy", np.concatenate(blocks))

    result = run_eval(ckpt, cifar_c_root=cc, cifar_root=cifar_root, out_dir=tmp_path / "out", **FAST)
    assert result["dataset"] == "cifar10-c"
    ref = reference_cell(model, test_x, test_y, cfg)
    assert result["clean"]["count"] == 40
    assert result["clean"]["error"] == pytest.approx(ref["error"], abs=1e-9)
    assert result["clean"]["ece"] == pytest.approx(ref["ece"], abs=1e-5)
    for corruption in ("gaussian_noise", "zoom_blur", "jpeg_compression"):
        data = np.load(cc / f"{corruption}.npy")
        for s in (1, 3, 5):
            ref = reference_cell(model, data[(s - 1) * 20:s * 20], block_y, cfg)
            got = result["corruptions"][corruption][str(s)]
            assert got["count"] == 20
            assert got["error"] == pytest.approx(ref["error"], abs=1e-9), (corruption, s)
            assert got["ece"] == pytest.approx(ref["ece"], abs=1e-5), (corruption, s)
    assert "metrics" not in result and result["source"]["suite"] == "cifar-c"
    assert metrics_for(result)["mean_corruption_error"] == pytest.approx(
        100 * np.mean([np.mean([c["error"] for c in cells.values()]) for cells in result["corruptions"].values()]))

    os.remove(cc / "fog.npy")
    with pytest.raises(EvalError, match=r"5 of 75 .*fog/1, fog/2, fog/3, fog/4, fog/5"):
        run_eval(ckpt, cifar_c_root=cc, cifar_root=cifar_root, out_dir=tmp_path / "out2", **FAST)


# ----------------------------------------------------------------------------- the script


def test_script_help():
    proc = subprocess.run([sys.executable, "eval_imagenet_c.py", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for option in ("--checkpoint", "--imagenet-c", "--val", "--cifar-c", "--baseline", "--allow-partial",
                   "--extra", "--backend", "--precision", "--no-report"):
        assert option in proc.stdout


def test_script_end_to_end(full_eval, tiny_checkpoint, c_tree, imagenet_tree, tmp_path, capsys):
    sys.path.insert(0, str(REPO))
    try:
        from eval_imagenet_c import main
    finally:
        sys.path.remove(str(REPO))
    common = ["--imagenet-c", str(c_tree), "--val", str(imagenet_tree / "val"), "--backend", "torchvision",
              "--workers", "0", "--precision", "fp32", "--device", "cpu", "--quiet", "--batch-size", "16"]
    # two checkpoints of the same run: names get the file stem so their JSON files do not clash
    second = tmp_path / "other.pt"
    shutil.copy(tiny_checkpoint[0], second)
    rc = main(["--checkpoint", str(tiny_checkpoint[0]), str(second), "--out", str(tmp_path / "out"),
               "--corruptions", "snow", "contrast", "--baseline", "tiny-tiny", *common])
    assert rc == 0, capsys.readouterr().err
    a, b = load_result(tmp_path / "out" / "tiny-tiny.json"), load_result(tmp_path / "out" / "tiny-other.json")
    for s, cell in full_eval[0]["corruptions"]["snow"].items():  # batch 16 vs 10: other conv rounding
        assert_same_cell(a["corruptions"]["snow"][s], cell)
    assert b["metrics"]["normalisation"] == "baseline:tiny-tiny" and b["metrics"]["ce"]["snow"] == pytest.approx(100)
    assert (tmp_path / "out" / "report.md").is_file()
    log = capsys.readouterr().out
    assert "tiny-tiny: this is the baseline run, evaluated once; its CE is 100 by definition" in log
    assert "tiny-other: CE/mCE normalised by the baseline run 'tiny-tiny'" in log
    assert log.count("tiny-tiny: evaluated") == 1  # the baseline is evaluated once, not again against itself
    # missing cells: exit status 2 and the list, no traceback
    rc = main(["--checkpoint", str(tiny_checkpoint[0]), "--out", str(tmp_path / "o2"), *common[:2],
               "--val", str(tmp_path / "nowhere"), *common[4:]])
    err = capsys.readouterr().err
    assert rc == 2 and "error: clean val folder not found" in err and "Traceback" not in err
    with pytest.raises(EvalError, match="clean val folder not found"):  # --debug keeps the exception
        main(["--checkpoint", str(tiny_checkpoint[0]), "--out", str(tmp_path / "o2"), *common[:2],
              "--val", str(tmp_path / "nowhere"), *common[4:], "--debug"])


# ----------------------------------------------------------------------------- what a result was computed from


SMALL = dict(corruptions=["fog"], severities=(1, 2), **FAST)


def test_another_tree_reevaluates_the_changed_cells(tiny_checkpoint, c_tree, imagenet_tree, tmp_path, capsys):
    out = tmp_path / "out"
    first = run_eval(tiny_checkpoint[0], imagenet_c_root=c_tree, val_root=imagenet_tree / "val", out_dir=out, **SMALL)
    # another tree: a copy in which one image of fog/2 was replaced by a different one
    other = tmp_path / "c2"
    shutil.copytree(c_tree, other)
    victim = sorted((other / "fog" / "2" / CLASSES[0]).iterdir())[0]
    shutil.copy(other / "fog" / "5" / CLASSES[1] / sorted(os.listdir(other / "fog" / "5" / CLASSES[1]))[0], victim)
    capsys.readouterr()
    cells = []
    second = run_eval(tiny_checkpoint[0], imagenet_c_root=other, val_root=imagenet_tree / "val", out_dir=out,
                      on_cell_done=lambda c, s, cell: cells.append(f"{c}/{s}"), **SMALL)
    log = capsys.readouterr().out
    assert cells == ["fog/2"]  # fog/1 and the clean set are the same files: kept
    assert "re-evaluating 1 cell(s)" in log and "fog/2" in log and "data source changed" in log
    assert "nothing evaluated" not in log
    assert second["source"]["corrupted"] == str(other.resolve())
    assert second["corruptions"]["fog"]["1"] == first["corruptions"]["fog"]["1"]
    assert second["corruptions"]["fog"]["2"]["fingerprint"] != first["corruptions"]["fog"]["2"]["fingerprint"]
    assert load_result(out / "tiny.json")["corruptions"]["fog"]["2"] == second["corruptions"]["fog"]["2"]


def _break(path: Path) -> None:
    path.write_bytes(b"<html>not found</html>")


def test_empty_or_unreadable_cells_are_caught_before_any_work(tiny_checkpoint, c_tree, imagenet_tree, tmp_path):
    tree = tmp_path / "c"
    shutil.copytree(c_tree, tree)
    for class_dir in (tree / "fog" / "1").iterdir():  # class folders with no files
        for f in class_dir.iterdir():
            f.unlink()
    for f in (tree / "fog" / "2").rglob("*.*"):  # every file unreadable
        _break(f)
    done = []
    with pytest.raises(EvalError, match=r"2 of 2 corruption cells have no readable image: fog/1 \(its class folders "
                                        r"hold no image files\); fog/2 \(all 24 image files are unreadable\)"):
        run_eval(tiny_checkpoint[0], imagenet_c_root=tree, val_root=imagenet_tree / "val", out_dir=tmp_path / "out",
                 on_cell_done=lambda *a: done.append(a), **SMALL)
    assert done == [] and not (tmp_path / "out" / "tiny.json").exists()
    kwargs = {**SMALL, "corruptions": ["fog", "snow"], "severities": (1, 2)}
    result = run_eval(tiny_checkpoint[0], imagenet_c_root=tree, val_root=imagenet_tree / "val",
                      out_dir=tmp_path / "out", allow_partial=True, on_cell_done=lambda *a: done.append(a[:2]), **kwargs)
    assert done == [("clean", 0), ("snow", 1), ("snow", 2)]
    assert set(result["skipped"]) == {"fog/1", "fog/2"} and "fog" not in result["corruptions"]
    assert {"fog/1", "fog/2"} <= set(metrics_for(result)["missing"])


def test_partly_unreadable_cell_is_scored_on_the_rest(full_eval, tiny_checkpoint, tiny_config, c_tree, imagenet_tree,
                                                     tmp_path):
    tree = tmp_path / "c"
    shutil.copytree(c_tree, tree)
    bad = sorted((tree / "fog" / "1" / CLASSES[2]).iterdir())[0]
    _break(bad)
    with pytest.warns(UserWarning, match="fog/1: 1 unreadable file"):
        result = run_eval(tiny_checkpoint[0], imagenet_c_root=tree, val_root=imagenet_tree / "val",
                          out_dir=tmp_path / "out", **SMALL)
    cell = result["corruptions"]["fog"]["1"]
    assert cell["count"] == 23 and cell["unreadable"] == 1
    # the independent reference on the 23 readable images
    images, labels = load_folder(c_tree / "fog" / "1", CLASSES)
    keep = np.ones(len(labels), bool)
    keep[int(np.sum(labels < 2))] = False  # load_folder is sorted by class, then file: the first file of class 2
    ref = reference_cell(tiny_checkpoint[1], images[keep], labels[keep], tiny_config)
    assert cell["error"] == pytest.approx(ref["error"], abs=1e-9)
    from apr.report import write_report

    md = write_report([tmp_path / "out" / "tiny.json"], tmp_path / "report", plots=False).read_text()
    assert "**Unreadable files** (DeepAugment + APR-P, skipped; each cell scored on the rest): fog/1: 1." in md


# ----------------------------------------------------------------------------- third-party weights, shift suites


def _script_main():
    sys.path.insert(0, str(REPO))
    try:
        from eval_imagenet_c import main
    finally:
        sys.path.remove(str(REPO))
    return main


def test_checkpoint_and_released_weights_in_one_command(full_eval, tiny_checkpoint, tiny_config, c_tree,
                                                         imagenet_tree, tmp_path, capsys):
    """A project checkpoint, an AugMix-style release ({"state_dict": {"module.…"}} in a .pth.tar) and a
    safetensors file of the same weights: one command, ImageNet-C cells + a shift suite, one report."""
    from safetensors.torch import save_file

    from apr.report import format_percent

    state = tiny_checkpoint[1].state_dict()
    released = tmp_path / "augmix_release" / "checkpoint.pth.tar"
    released.parent.mkdir()
    torch.save({"epoch": 90, "arch": "cnn_tiny", "best_acc1": torch.tensor(77.5),
                "state_dict": {f"module.{k}": v for k, v in state.items()}}, released)
    plain = tmp_path / "tiny_weights.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(plain))
    sketch = shutil.copytree(imagenet_tree / "val", tmp_path / "sketch")  # wnid folders, as ImageNet-Sketch
    out = tmp_path / "out"
    cfg = tiny_config.data
    rc = _script_main()([
        "--checkpoint", str(tiny_checkpoint[0]), "--model", "cnn_tiny", "--weights", str(released), str(plain),
        "--mean", *map(str, cfg.mean), "--std", *map(str, cfg.std), "--image-size", "32", "--resize", "32",
        "--imagenet-c", str(c_tree), "--val", str(imagenet_tree / "val"), "--corruptions", "snow", "--severities", "1",
        "--suite", f"imagenet-sketch={sketch}", "--out", str(out), "--backend", "torchvision", "--workers", "0",
        "--precision", "fp32", "--device", "cpu", "--quiet", "--batch-size", "16"])
    assert rc == 0, capsys.readouterr().err
    names = ["tiny", "augmix_release-checkpoint", "tiny_weights"]
    corruption = {n: load_result(out / f"{n}.json") for n in names}
    shift = {n: json.loads((out / f"{n}.shift.json").read_text()) for n in names}
    reference = full_eval[0]
    for name in names:  # the same weights give the checkpoint's counts, whichever file they came from
        assert corruption[name]["corruptions"]["snow"]["1"]["correct"] == reference["corruptions"]["snow"]["1"]["correct"]
        assert corruption[name]["clean"]["correct"] == reference["clean"]["correct"]
        sketch_cell = shift[name]["suites"]["imagenet-sketch"]["cells"]["imagenet-sketch"]
        # the Sketch tree is a copy of val, preprocessed as val: its error is the clean error
        assert (sketch_cell["count"], sketch_cell["correct"]) == (reference["clean"]["count"], reference["clean"]["correct"])
        assert shift[name]["corruption"]["mce"] == pytest.approx(corruption[name]["metrics"]["mce"])
    assert corruption["augmix_release-checkpoint"]["config"] is None
    assert corruption["augmix_release-checkpoint"]["aug"] == "cnn_tiny weights"
    assert corruption["augmix_release-checkpoint"]["checkpoint_sha256"] == file_sha256(released)
    assert corruption["augmix_release-checkpoint"]["weights"]["mean"] == pytest.approx(list(cfg.mean))
    report = (out / "report.md").read_text()
    assert "## Distribution shift" in report
    sketch_error = format_percent(100 * shift["tiny_weights"]["suites"]["imagenet-sketch"]["cells"]["imagenet-sketch"]["error"])
    row = next(line for line in report.splitlines() if line.startswith("| cnn_tiny weights (tiny_weights)"))
    assert sketch_error in row and format_percent(corruption["tiny_weights"]["metrics"]["mce"]) in row


def test_weights_of_another_architecture_are_refused_naming_the_tensor(imagenet_tree, tmp_path, capsys):
    torch.save(create_model("cnn_small", 4).state_dict(), tmp_path / "small.pth")
    common = ["--suite", f"imagenet-sketch={imagenet_tree / 'val'}", "--out", str(tmp_path / "out"),
              "--backend", "torchvision", "--workers", "0", "--device", "cpu", "--quiet"]
    rc = _script_main()(["--model", "cnn_tiny", "--weights", str(tmp_path / "small.pth"),
                         "--val", str(imagenet_tree / "val"), *common])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "tensor features.0.0.weight has shape (32, 3, 3, 3) in the file but (16, 3, 3, 3)" in err
    rc = _script_main()(["--model", "cnn_tiny", "--weights", str(tmp_path / "small.pth"), *common])
    err = capsys.readouterr().err
    assert rc == 2 and "--classes" in err  # no --val and no --classes: the class list is unknown
