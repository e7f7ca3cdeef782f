"""apr.metrics.ood_metrics / adaptive_rms_calibration_error, apr.ood.scores, and python -m apr.ood end to end.

Metrics are checked against values worked out by hand and against the reference's five
numbers (TNR at 95 % TPR, AUROC, DTACC, AUIN, AUOUT) re-derived here from their definitions.
The end-to-end runs use a real cnn_tiny checkpoint whose weights are set by hand so that it is
confident on dark images (the digits) and uniform on bright ones (the OOD sets).
"""

from __future__ import annotations

import json
import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from apr.checkpoint import save_checkpoint
from apr.cli import run_main
from apr.config import Config, config_to_dict
from apr.data.ood_sets import OODSetError
from apr.errors import UserError
from apr.metrics import MetricsError, adaptive_rms_calibration_error, ood_metrics
from apr.models import create_model
from apr.ood import SCHEMA, SCORE_NAMES, evaluate_ood, load_ood_result, main, scores

from conftest import write_cifar10_folder

CLASSES = [f"n{k:08d}" for k in range(4)]
FAST = dict(backend="torchvision", num_workers=0, batch_size=16, precision="fp32", device="cpu", progress=False)

pytestmark = pytest.mark.usefixtures("one_thread")  # cnn_tiny runs ~15x faster on one thread on a busy box


# ----------------------------------------------------------------------------- metrics by hand


def test_perfect_separation():
    got = ood_metrics([3.0, 4.0, 5.0], [0.0, 1.0, 2.0])
    assert got == {"auroc": 1.0, "fpr95": 0.0, "aupr_in": 1.0, "aupr_out": 1.0, "detection_accuracy": 1.0}


def test_reversed_scores_are_the_worst_case():
    got = ood_metrics([0.0, 1.0], [2.0, 3.0, 4.0])
    assert got["auroc"] == pytest.approx(0.0)
    assert got["fpr95"] == pytest.approx(1.0)  # every OOD image must be accepted to reach 95 % TPR
    assert got["detection_accuracy"] == pytest.approx(0.5)  # no threshold beats accepting everything


def test_identical_distributions():
    values = [1.0, 2.0, 3.0, 4.0]
    got = ood_metrics(values, values)
    assert got["auroc"] == pytest.approx(0.5)
    assert got["fpr95"] == pytest.approx(1.0)
    assert got["detection_accuracy"] == pytest.approx(0.5)


def test_ties_by_hand():
    """in = [2, 1, 1], out = [1, 0]. Pairs: (2,1) (2,0) (1,0) (1,0) won, (1,1) twice tied -> AUROC 5/6.
    Thresholds >=2: TPR 1/3 FPR 0; >=1: TPR 1 FPR 1/2; >=0: TPR 1 FPR 1.
    AP(in): 1/3 * 1 + 2/3 * 3/4 = 5/6. AP(out, -score): 1/2 * 1 + 1/2 * 1/2 = 3/4. DTACC max(2/3, 3/4, 1/2)."""
    got = ood_metrics([2.0, 1.0, 1.0], [1.0, 0.0])
    want = {"auroc": 5 / 6, "fpr95": 0.5, "aupr_in": 5 / 6, "aupr_out": 0.75, "detection_accuracy": 0.75}
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key


def _reference_numbers(ins: np.ndarray, outs: np.ndarray) -> dict:
    """The reference's metric_ood quantities from their definitions (continuous scores, no ties)."""
    auroc = np.mean(ins[:, None] > outs[None, :]) + 0.5 * np.mean(ins[:, None] == outs[None, :])
    # TNR at 95 % TPR: the highest threshold that still accepts >= 95 % of the in-distribution
    k = math.ceil(0.95 * ins.size)
    threshold = np.sort(ins)[::-1][k - 1]
    tnr = np.mean(outs < threshold)
    thresholds = np.concatenate([np.unique(np.concatenate([ins, outs])), [np.inf]])
    dtacc = max(0.5 * (np.mean(ins >= t) + np.mean(outs < t)) for t in thresholds)

    def average_precision(pos, neg):  # mean over positives of the precision at their rank
        ranked = np.sort(np.concatenate([pos, neg]))[::-1]
        return np.mean([np.mean(pos >= p) * pos.size / np.sum(ranked >= p) for p in pos])

    return {"tnr95": tnr, "auroc": auroc, "dtacc": dtacc, "auin": average_precision(ins, outs),
            "auout": average_precision(-outs, -ins)}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_against_the_reference_definitions(seed):
    rng = np.random.default_rng(seed)
    ins, outs = rng.normal(1.0, 1.0, 200), rng.normal(0.0, 1.3, 317)
    got, ref = ood_metrics(ins, outs), _reference_numbers(ins, outs)
    np.testing.assert_allclose(1.0 - got["fpr95"], ref["tnr95"], atol=1e-12)
    np.testing.assert_allclose(got["auroc"], ref["auroc"], atol=1e-12)
    np.testing.assert_allclose(got["detection_accuracy"], ref["dtacc"], atol=1e-12)
    np.testing.assert_allclose(got["aupr_in"], ref["auin"], atol=1e-12)
    np.testing.assert_allclose(got["aupr_out"], ref["auout"], atol=1e-12)
    assert 0.6 < got["auroc"] < 0.9  # the shifted normals overlap: not a degenerate case


@pytest.mark.parametrize("ins, outs, match", [
    ([], [1.0], "in-distribution scores are empty"),
    ([1.0], np.zeros(0), "out-of-distribution scores are empty"),
    ([1.0, float("nan")], [0.0], "1 of 2 in-distribution scores are NaN or infinite"),
    ([1.0], [0.0, float("inf")], "out-of-distribution scores are NaN or infinite"),
])
def test_bad_scores_are_refused(ins, outs, match):
    with pytest.raises(MetricsError, match=match) as info:
        ood_metrics(ins, outs)
    assert isinstance(info.value, UserError)


def test_rms_calibration_error_by_hand():
    # 100 samples at confidence 0.6 with 30 right, 100 at 0.9 with 90 right: gaps 0.3 and 0 -> sqrt(0.5 * 0.09)
    conf = np.array([0.9] * 100 + [0.6] * 100)
    correct = np.array([1] * 90 + [0] * 10 + [1] * 30 + [0] * 70)
    assert adaptive_rms_calibration_error(conf, correct) == pytest.approx(math.sqrt(0.045), abs=1e-12)
    # fewer samples than a bin: one bin, |mean conf 0.7 - accuracy 0.5| = 0.2
    assert adaptive_rms_calibration_error([0.8, 0.6], [1, 0]) == pytest.approx(0.2, abs=1e-12)


def test_rms_calibration_error_last_bin_takes_the_remainder():
    rng = np.random.default_rng(3)
    conf, correct = rng.uniform(0.2, 1.0, 250), rng.uniform(size=250) < 0.7
    order = np.argsort(conf)
    bins = [order[:100], order[100:]]  # 250 // 100 = 2 bins, the second holds 150
    want = math.sqrt(sum(len(b) / 250 * (conf[b].mean() - correct[b].mean()) ** 2 for b in bins))
    np.testing.assert_allclose(adaptive_rms_calibration_error(conf, correct, bin_size=100), want, rtol=1e-12)
    with pytest.raises(MetricsError, match="empty"):
        adaptive_rms_calibration_error([], [])


# ----------------------------------------------------------------------------- scores


def test_scores_on_constructed_logits():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3.0), -math.inf, -math.inf], [1000.0, 0.0, 0.0, 0.0]])
    got = scores(logits)
    assert set(got) == set(SCORE_NAMES)
    torch.testing.assert_close(got["msp"], torch.tensor([0.25, 0.75, 1.0]))
    torch.testing.assert_close(got["max_logit"], torch.tensor([0.0, math.log(3.0), 1000.0]))
    torch.testing.assert_close(got["energy"], torch.tensor([math.log(4.0), math.log(4.0), 1000.0]))  # no overflow
    assert all(v.dtype == torch.float32 for v in got.values())
    with pytest.raises(ValueError, match="N x K"):
        scores(torch.zeros(3))


# ----------------------------------------------------------------------------- end to end


def dark_detector(num_classes: int):
    """cnn_tiny set by hand: feature = mean of relu(1.5 - R - G - B) (large on dark pixels), logit 0 = 20 x
    feature, every other logit 0. Dark digits get a confident class 0, bright images uniform logits."""
    model = create_model("cnn_tiny", num_classes)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        convs[0].weight[0, :, 1, 1] = -1.0
        for conv in convs[1:]:
            conv.weight[0, 0, 1, 1] = 1.0
        for bn in norms:
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0)
            bn.weight.fill_(1.0)
        norms[0].bias[0] = 1.5
        model.fc.weight[0, 0] = 20.0
    return model.eval()


def save_detector(path: Path, classes: list[str], dataset: str = "imagefolder") -> Path:
    cfg = Config()
    cfg.data.dataset, cfg.data.image_size, cfg.data.val_resize = dataset, 32, 32
    cfg.data.mean, cfg.data.std = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    cfg.model.name, cfg.train.run_name, cfg.aug.name = "cnn_tiny", "detector", "apr_sp"
    model = dark_detector(len(classes))
    return save_checkpoint({"model": model.state_dict(), "model_name": "cnn_tiny", "num_classes": len(classes),
                            "classes": list(classes), "config": config_to_dict(cfg.validate()), "epoch": 1,
                            "step": 1}, path)


def bright_images(n: int, seed: int, size: int = 32) -> np.ndarray:
    """Bright, slightly noisy colour images: the constructed OOD kind."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(170, 240, (n, 1, 1, 3))
    return np.clip(base + rng.normal(0, 8, (n, size, size, 3)), 0, 255).astype(np.uint8)


def write_nested_pngs(root: Path, images: np.ndarray) -> Path:
    for i, img in enumerate(images):
        folder = root / f"part{i % 3}" / ("deep" if i % 2 else "")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"im{i:03d}.png")
    return root


def write_cifar100_folder(folder: Path, images: np.ndarray) -> Path:
    folder.mkdir(parents=True)
    with open(folder / "test", "wb") as f:
        pickle.dump({b"data": images.transpose(0, 3, 1, 2).reshape(len(images), -1),
                     b"fine_labels": [i % 100 for i in range(len(images))]}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"c{k}".encode() for k in range(100)]}, f)
    return folder


def write_svhn_mat(path: Path, images: np.ndarray) -> Path:
    import scipy.io

    labels = (np.arange(len(images)) % 10 + 1).reshape(-1, 1)  # SVHN writes digit 0 as 10
    scipy.io.savemat(str(path), {"X": images.transpose(1, 2, 3, 0), "y": labels})
    return path


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    return save_detector(tmp_path_factory.mktemp("ckpt") / "detector.pt", CLASSES)


@pytest.fixture(scope="module")
def ood_folder(tmp_path_factory):
    return write_nested_pngs(tmp_path_factory.mktemp("ood") / "bright", bright_images(20, seed=1))


def stable(result: dict) -> dict:
    """The JSON without what legitimately changes between two runs (timestamps, wall times)."""
    out = json.loads(json.dumps(result))
    out.pop("created")
    for record in out["ood_sets"].values():
        record.pop("seconds")
    return out


def reference_scores(model, images_uint8: np.ndarray) -> dict:
    with torch.no_grad():
        logits = model(torch.from_numpy(images_uint8.transpose(0, 3, 1, 2).astype(np.float32) / 255.0)).double()
    return {"max_logit": logits.max(1).values.numpy(), "energy": torch.logsumexp(logits, 1).numpy(),
            "msp": logits.softmax(1).max(1).values.numpy()}


def load_pngs(root: Path, pattern: str) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted(root.rglob(pattern))])


def test_folder_sets_end_to_end(detector, ood_folder, imagenet_tree, tmp_path):
    result = evaluate_ood(detector, in_folder=imagenet_tree / "val", ood={"bright": str(ood_folder)},
                          out_dir=tmp_path, **FAST)
    assert load_ood_result(tmp_path / "detector.ood.json") == json.loads(json.dumps(result))
    assert result["schema"] == SCHEMA and result["complete"] and result["aug"] == "apr_sp"
    ind, record = result["in_distribution"], result["ood_sets"]["bright"]
    assert ind["count"] == 24 and record["count"] == 20 and record["skipped_count"] == 0
    val = load_pngs(imagenet_tree / "val", "*.JPEG")
    labels = np.repeat(np.arange(4), 6)
    assert ind["top1_error"] == pytest.approx(np.mean(labels != 0))  # the detector always says class 0
    model = dark_detector(4)
    ref_in, ref_out = reference_scores(model, val), reference_scores(model, load_pngs(ood_folder, "*.png"))
    assert ref_in["max_logit"].min() > 5.0 and np.abs(ref_out["max_logit"]).max() < 1e-6  # confident vs uniform
    for score in SCORE_NAMES:
        assert record["metrics"][score]["auroc"] == pytest.approx(1.0)
        assert record["metrics"][score]["fpr95"] == pytest.approx(0.0)
        hist = record["histograms"][score]
        assert len(hist["edges"]) == 51 and sum(hist["in"]) == 24 and sum(hist["out"]) == 20
        in_hist = np.histogram(ref_in[score], np.asarray(hist["edges"]))[0]
        assert np.abs(in_hist - np.asarray(hist["in"])).sum() <= 2  # an edge value may round to the next bin
    probs = ref_in["msp"]
    assert ind["ece"] == pytest.approx(abs(probs.mean() - np.mean(labels == 0)), abs=1e-4)  # all in one bin
    assert ind["rms_calibration_error"] == pytest.approx(abs(probs.mean() - np.mean(labels == 0)), abs=1e-4)
    assert ind["adaptive_rms_calibration_error"] == pytest.approx(abs(probs.mean() - np.mean(labels == 0)), abs=1e-4)
    assert result["summary"]["sets"] == ["bright"]


def test_cifar_pickle_and_svhn_mat_sets(digits_images, tmp_path):
    images, labels = digits_images
    names = [f"digit_{k}" for k in range(10)]
    ckpt = save_detector(tmp_path / "c.pt", names, dataset="cifar10")
    cifar10 = write_cifar10_folder(tmp_path / "c10" / "cifar-10-batches-py", images[:50], labels[:50],
                                   images[100:130], labels[100:130])
    cifar100 = write_cifar100_folder(tmp_path / "c100" / "cifar-100-python", bright_images(25, seed=2))
    svhn = write_svhn_mat(tmp_path / "test_32x32.mat", bright_images(15, seed=3))
    result = evaluate_ood(ckpt, in_cifar=cifar10, ood={"cifar100": str(tmp_path / "c100"), "svhn": str(svhn)},
                          out_dir=tmp_path / "out", **FAST)
    assert result["in_distribution"]["kind"] == "cifar10" and result["in_distribution"]["count"] == 30
    assert result["in_distribution"]["top1_error"] == pytest.approx(np.mean(labels[100:130] != 0))
    assert [result["ood_sets"][n]["count"] for n in ("cifar100", "svhn")] == [25, 15]
    assert result["ood_sets"]["svhn"]["kind"] == "svhn"
    for name in ("cifar100", "svhn"):
        assert result["ood_sets"][name]["metrics"]["max_logit"]["auroc"] == pytest.approx(1.0)
    capped = evaluate_ood(ckpt, in_cifar=cifar10, ood={"svhn": str(svhn)}, out_dir=tmp_path / "cap",
                          max_images=10, **FAST)
    assert capped["in_distribution"]["count"] == 10 and capped["ood_sets"]["svhn"]["count"] == 10


def test_interrupted_run_resumes_to_the_same_json(detector, ood_folder, imagenet_tree, tmp_path):
    second = write_nested_pngs(tmp_path / "second", bright_images(12, seed=4))
    sets = {"bright": str(ood_folder), "second": str(second)}
    args = dict(in_folder=imagenet_tree / "val", ood=sets, **FAST)
    straight = evaluate_ood(detector, out_dir=tmp_path / "straight", **args)

    def stop(name, record):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evaluate_ood(detector, out_dir=tmp_path / "resumed", on_set_done=stop, **args)
    partial = load_ood_result(tmp_path / "resumed" / "detector.ood.json")
    assert list(partial["ood_sets"]) == ["bright"] and not partial["complete"]
    redone = []
    resumed = evaluate_ood(detector, out_dir=tmp_path / "resumed", on_set_done=lambda n, r: redone.append(n), **args)
    assert redone == ["second"]
    assert stable(resumed) == stable(straight)
    # a changed set (one more file) is scored again, the unchanged one is kept
    write_nested_pngs(tmp_path / "second" / "more", bright_images(1, seed=5))
    redone.clear()
    again = evaluate_ood(detector, out_dir=tmp_path / "resumed", on_set_done=lambda n, r: redone.append(n), **args)
    assert redone == ["second"] and again["ood_sets"]["second"]["count"] == 13


def test_unreadable_image_is_a_counted_skip(detector, imagenet_tree, tmp_path):
    folder = write_nested_pngs(tmp_path / "ood", bright_images(6, seed=6))
    (folder / "broken.png").write_bytes(b"<html>not an image</html>")
    result = evaluate_ood(detector, in_folder=imagenet_tree / "val", ood={"x": str(folder)}, out_dir=tmp_path, **FAST)
    record = result["ood_sets"]["x"]
    assert record["count"] == 6 and record["skipped_count"] == 1
    assert record["skipped"][0].startswith(str((folder / "broken.png").resolve()))


@pytest.mark.parametrize("case, match", [
    ("same", "overlaps the in-distribution set"),
    ("parent", "overlaps the in-distribution set"),
    ("empty", "no image files"),
    ("missing", "OOD set not found"),
    ("bad_mat", "lacks SVHN's 'X'"),
])
def test_bad_ood_sets_are_refused(case, match, detector, imagenet_tree, tmp_path):
    import scipy.io

    paths = {"same": imagenet_tree / "val", "parent": imagenet_tree, "empty": tmp_path / "empty",
             "missing": tmp_path / "nowhere", "bad_mat": tmp_path / "bad.mat"}
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    scipy.io.savemat(str(tmp_path / "bad.mat"), {"images": np.zeros((2, 2))})
    with pytest.raises(OODSetError, match=match):
        evaluate_ood(detector, in_folder=imagenet_tree / "val", ood={"x": str(paths[case])}, out_dir=tmp_path, **FAST)
    assert not (tmp_path / "detector.ood.json").exists()


def test_command_line(detector, ood_folder, imagenet_tree, tmp_path, capsys):
    argv = ["--checkpoint", str(detector), "--in", str(imagenet_tree / "val"), "--ood", f"bright={ood_folder}",
            "--out", str(tmp_path), "--backend", "torchvision", "--workers", "0", "--device", "cpu", "--quiet"]
    assert main(argv) == 0
    assert "bright (20 images, 0 skipped): msp AUROC 100.0 FPR95 0.0" in capsys.readouterr().out
    assert load_ood_result(tmp_path / "detector.ood.json")["settings"]["precision"] == "fp32"  # the CPU default
    assert run_main(main, argv + ["--ood", "bright"]) == 2
    assert "must be NAME=PATH" in capsys.readouterr().err
    assert run_main(main, argv + ["--ood", f"a={ood_folder}", f"a={ood_folder}"]) == 2
    assert "given twice" in capsys.readouterr().err


def _distributed_worker(rank, world_size, port, args, queue):
    os.environ.update(WORLD_SIZE=str(world_size), RANK=str(rank), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        result = evaluate_ood(**args)
        queue.put((rank, stable(result)))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_give_the_numbers_of_one(detector, ood_folder, imagenet_tree, tmp_path):
    """gloo on CPU: each rank scores half of every set; the gathered scores give one process's JSON."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = dict(checkpoint_path=str(detector), in_folder=str(imagenet_tree / "val"), ood={"bright": str(ood_folder)},
                **{**FAST, "batch_size": 5})
    one = stable(evaluate_ood(out_dir=str(tmp_path / "one"), **args))
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(_distributed_worker, args=(2, port, {**args, "out_dir": str(tmp_path / "two")}, queue),
                       nprocs=2, join=True, start_method="spawn")
    got = dict(queue.get(timeout=60) for _ in range(2))
    written = stable(load_ood_result(tmp_path / "two" / "detector.ood.json"))
    for result in (got[0], got[1], written):
        assert result["in_distribution"]["count"] == 24 and result["ood_sets"]["bright"]["count"] == 20
        for score in SCORE_NAMES:
            for key, value in one["ood_sets"]["bright"]["metrics"][score].items():
                assert result["ood_sets"]["bright"]["metrics"][score][key] == pytest.approx(value, abs=1e-9)
            got_hist = np.asarray(result["ood_sets"]["bright"]["histograms"][score]["in"])
            assert np.abs(got_hist - one["ood_sets"]["bright"]["histograms"][score]["in"]).sum() <= 2  # edge rounding
        for key in ("top1_error", "ece", "rms_calibration_error", "adaptive_rms_calibration_error"):
            assert result["in_distribution"][key] == pytest.approx(one["in_distribution"][key], abs=1e-9)


def test_bf16_autocast_runs_on_cpu(detector, ood_folder, imagenet_tree, tmp_path):
    result = evaluate_ood(detector, in_folder=imagenet_tree / "val", ood={"bright": str(ood_folder)},
                          out_dir=tmp_path, **{**FAST, "precision": "bf16"})
    assert result["settings"]["precision"] == "bf16"
    assert result["ood_sets"]["bright"]["metrics"]["max_logit"]["auroc"] == pytest.approx(1.0)


def grey_images(n: int, seed: int, size: int = 32) -> np.ndarray:
    """Dark-to-mid grey, slightly noisy images: the dark detector's scores overlap the digits' (AUROC ~0.5),
    so every score's order matters, unlike the perfectly separable bright set."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(10, 80, (n, 1, 1, 1))
    return np.clip(base + rng.normal(0, 8, (n, size, size, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def grey_folder(tmp_path_factory):
    return write_nested_pngs(tmp_path_factory.mktemp("ood") / "grey", grey_images(40, seed=2))


def swappable_pairs(ins: np.ndarray, outs: np.ndarray, rel: float) -> float:
    """Fraction of (in, out) pairs whose order a relative error ``rel`` on each score could reverse: the most
    a metric over pair orders (AUROC) can move under that error."""
    return float(np.mean(np.abs(ins[:, None] - outs[None, :]) <= rel * (np.abs(ins)[:, None] + np.abs(outs)[None, :])))


# bf16 autocast rounds the input and the output of each of the detector's 3 conv + BN layers and its linear
# layer to 8 significant bits (2**-9 relative each): 8 roundings, 8 * 2**-9 = 1.6 %, taken as 2 %
BF16_REL = 0.02


def grey_reference(imagenet_tree, grey_folder) -> tuple[dict, dict]:
    model = dark_detector(4)
    return (reference_scores(model, load_pngs(imagenet_tree / "val", "*.JPEG")),
            reference_scores(model, load_pngs(grey_folder, "*.png")))


def test_grey_set_overlaps_and_cpu_auroc_is_the_pair_count(detector, grey_folder, imagenet_tree, tmp_path):
    result = evaluate_ood(detector, in_folder=imagenet_tree / "val", ood={"grey": str(grey_folder)},
                          out_dir=tmp_path, **FAST)
    ref_in, ref_out = grey_reference(imagenet_tree, grey_folder)
    for score in ("max_logit", "energy"):  # msp saturates at 1.0 in float32 for this detector
        ins, outs = ref_in[score], ref_out[score]
        auroc = np.mean(ins[:, None] > outs[None, :]) + 0.5 * np.mean(ins[:, None] == outs[None, :])
        assert 0.2 < auroc < 0.8  # overlapping, not separable
        assert result["ood_sets"]["grey"]["metrics"][score]["auroc"] == pytest.approx(auroc, abs=1e-9)
    assert swappable_pairs(ref_in["max_logit"], ref_out["max_logit"], BF16_REL) < 0.3  # the CUDA bound below bites


@pytest.mark.cuda
def test_cuda_bf16_agrees_with_cpu(detector, grey_folder, imagenet_tree, tmp_path):
    """AUROC on overlapping scores moves only by the pairs bf16 rounding could reorder (counted on CPU scores)."""
    args = dict(in_folder=imagenet_tree / "val", ood={"grey": str(grey_folder)}, **FAST)
    cpu = evaluate_ood(detector, out_dir=tmp_path / "cpu", **args)
    gpu = evaluate_ood(detector, out_dir=tmp_path / "gpu", **{**args, "device": "cuda", "precision": "bf16"})
    assert gpu["in_distribution"]["top1_error"] == pytest.approx(cpu["in_distribution"]["top1_error"])
    ref_in, ref_out = grey_reference(imagenet_tree, grey_folder)
    slack = swappable_pairs(ref_in["max_logit"], ref_out["max_logit"], BF16_REL)  # every score is monotone in it
    saturated = np.mean((ref_in["msp"].astype(np.float32) == 1)[:, None] | (ref_out["msp"].astype(np.float32) == 1)[None, :])
    for score in SCORE_NAMES:
        bound = slack + (saturated if score == "msp" else 0.0)  # msp ties at 1.0 may break either way
        got, want = (r["ood_sets"]["grey"]["metrics"][score]["auroc"] for r in (gpu, cpu))
        assert abs(got - want) <= bound + 1e-9, (score, got, want, bound)
    assert gpu["ood_sets"]["grey"]["count"] == cpu["ood_sets"]["grey"]["count"] == 40
