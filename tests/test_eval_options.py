"""The evaluator as a user drives it: clean-only evaluation, --max-images of every suite, the Python API
``apr.evaluate`` (same numbers as the CLI's JSON), one precision default, attack defaults that follow the data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import apr
from apr.checkpoint import save_checkpoint
from apr.commands.evaluate import main as eval_main
from apr.config import Config, config_to_dict
from apr.models import create_model

CLASSES = [f"n{k:08d}" for k in range(4)]
FAST = ["--backend", "torchvision", "--workers", "0", "--device", "cpu", "--no-progress", "--batch-size", "7"]
API_FAST = dict(backend="torchvision", num_workers=0, device="cpu", progress=False, batch_size=7)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A cnn_tiny checkpoint for 32 px images (weights seeded, not trained: the numbers only need to agree)."""
    cfg = Config()
    cfg.data.image_size, cfg.data.val_resize = 32, 32
    cfg.model.name, cfg.train.run_name = "cnn_tiny", "tiny"
    torch.manual_seed(0)
    model = create_model("cnn_tiny", 4).eval()
    path = save_checkpoint({"model": model.state_dict(), "model_name": "cnn_tiny", "num_classes": 4,
                            "classes": CLASSES, "config": config_to_dict(cfg), "epoch": 1, "step": 1},
                           tmp_path_factory.mktemp("ckpt") / "tiny.pt")
    return path, model, cfg


@pytest.fixture(scope="module")
def small_c_tree(imagenet_tree, tmp_path_factory) -> Path:
    from apr.corrupt import make_corrupted_tree

    dst = tmp_path_factory.mktemp("c") / "c"
    make_corrupted_tree(imagenet_tree / "val", dst, corruptions=["snow", "contrast"], severities=(1, 2), resize=None,
                        crop=None, workers=0, progress=False)
    return dst


def _reference_clean_error(model, cfg, val: Path) -> float:
    """PIL decode + NumPy normalisation + a plain fp32 forward, per image."""
    hits = []
    for k, name in enumerate(CLASSES):
        for path in sorted((val / name).iterdir()):
            with Image.open(path) as img:
                x = np.asarray(img.convert("RGB"), np.float32) / 255.0
            x = (x - np.asarray(cfg.data.mean, np.float32)) / np.asarray(cfg.data.std, np.float32)
            with torch.no_grad():
                hits.append(int(model(torch.from_numpy(x.transpose(2, 0, 1).copy())[None]).argmax()) == k)
    return 1.0 - float(np.mean(hits))


def test_val_alone_evaluates_the_clean_error(tiny, imagenet_tree, tmp_path):
    path, model, cfg = tiny
    assert eval_main(["--checkpoint", str(path), "--val", str(imagenet_tree / "val"), "--out", str(tmp_path),
                      "--precision", "fp32", *FAST]) == 0
    result = json.loads((tmp_path / "tiny.shift.json").read_text())
    assert result["clean"]["count"] == 24 and result["suites"] == {}
    assert result["clean"]["error"] == pytest.approx(_reference_clean_error(model, cfg, imagenet_tree / "val"))
    assert (tmp_path / "report.md").is_file()


def test_nothing_to_evaluate_still_names_the_options(tiny, tmp_path, capsys):
    with pytest.raises(SystemExit):
        eval_main(["--checkpoint", str(tiny[0]), "--out", str(tmp_path)])
    assert "--val DIR / --cifar DIR alone for the clean error" in capsys.readouterr().err


def test_max_images_is_a_fixed_class_balanced_subset_of_every_cell(tiny, imagenet_tree, small_c_tree, tmp_path):
    val = imagenet_tree / "val"
    argv = ["--checkpoint", str(tiny[0]), "--imagenet-c", str(small_c_tree), "--val", str(val), "--out",
            str(tmp_path), "--corruptions", "snow", "contrast", "--severities", "1", "2", "--suite",
            f"imagenet-sketch={val}", "--max-images", "8", "--precision", "fp32", *FAST]
    assert eval_main(argv) == 0
    corruption = json.loads((tmp_path / "tiny.json").read_text())
    shift = json.loads((tmp_path / "tiny.shift.json").read_text())
    counts = [corruption["clean"]["count"]] + [cell["count"] for c in corruption["corruptions"].values()
                                               for cell in c.values()]
    counts.append(shift["suites"]["imagenet-sketch"]["cells"]["imagenet-sketch"]["count"])
    assert counts == [8] * 6 and corruption["eval"]["max_images"] == 8
    from apr.data.base import balanced_subset

    labels = np.repeat(np.arange(4), 6)  # folder order: 6 images per class
    assert np.bincount(labels[balanced_subset(labels, 8).numpy()]).tolist() == [2] * 4
    # a full run is not mistaken for the subset's: the cells are evaluated again on every image
    with pytest.warns(UserWarning, match="max_images"):
        assert eval_main([a if a != "8" else "24" for a in argv]) == 0
    assert json.loads((tmp_path / "tiny.json").read_text())["clean"]["count"] == 24


@pytest.mark.parametrize("source", ["checkpoint", "module"])
def test_python_api_returns_the_numbers_of_the_cli_json(source, tiny, imagenet_tree, small_c_tree, tmp_path):
    path, model, cfg = tiny
    val = str(imagenet_tree / "val")
    assert eval_main(["--checkpoint", str(path), "--imagenet-c", str(small_c_tree), "--val", val, "--out",
                      str(tmp_path / "cli"), "--corruptions", "snow", "contrast", "--severities", "1", "2",
                      "--allow-partial", "--precision", "fp32", *FAST]) == 0
    cli = json.loads((tmp_path / "cli" / "tiny.json").read_text())
    given = path if source == "checkpoint" else create_model("cnn_tiny", 4)
    if source == "module":
        given.load_state_dict(model.state_dict())
        extra = dict(classes=CLASSES, mean=cfg.data.mean, std=cfg.data.std, image_size=32, val_resize=32)
    else:
        extra = {}
    result = apr.evaluate(given, imagenet_c=str(small_c_tree), val=val, corruptions=["snow", "contrast"],
                          severities=[1, 2], allow_partial=True, precision="fp32", **API_FAST, **extra)["corruption"]
    assert result["clean"]["error"] == pytest.approx(cli["clean"]["error"], abs=1e-6)
    for c, cells in cli["corruptions"].items():
        for s, cell in cells.items():
            assert result["corruptions"][c][s]["error"] == pytest.approx(cell["error"], abs=1e-6)
            assert result["corruptions"][c][s]["ece"] == pytest.approx(cell["ece"], abs=1e-5)
    assert result["metrics"]["mce"] == pytest.approx(cli["metrics"]["mce"], abs=1e-4)


def test_api_clean_only_of_an_in_memory_model(tiny, imagenet_tree):
    path, model, cfg = tiny
    out = apr.evaluate(model, val=str(imagenet_tree / "val"), mean=cfg.data.mean, std=cfg.data.std, image_size=32,
                       val_resize=32, precision="fp32", max_images=12, **API_FAST)
    assert set(out) == {"shift"} and out["shift"]["clean"]["count"] == 12


def test_one_precision_default_gives_one_clean_ece_in_corruption_and_ood(tiny, imagenet_tree, small_c_tree,
                                                                         tmp_path):
    """The demo report showed the same model's clean ECE as 16.95 (corruptions, bf16) and 16.93 (OOD, fp32)."""
    from apr.data.suites import make_suite
    from apr.evaluation import EvalOptions, evaluate_checkpoint
    from apr.ood import evaluate_ood

    path, _, _ = tiny
    val = imagenet_tree / "val"
    options = EvalOptions(backend="torchvision", num_workers=0, device="cpu", progress=False,
                          corruptions=["snow"], severities=[1])  # the demo's options: precision left at its default
    corruption = evaluate_checkpoint(path, make_suite(imagenet_c=str(small_c_tree), val=str(val)), tmp_path, options)
    ood = evaluate_ood(path, ood={"c": str(small_c_tree / "snow" / "2")}, out_dir=tmp_path, in_folder=val,
                       backend="torchvision", num_workers=0, device="cpu", progress=False)
    assert corruption["eval"]["precision"] == "fp32"
    assert corruption["clean"]["ece"] == pytest.approx(ood["in_distribution"]["ece"], abs=1e-9)


@pytest.mark.parametrize("data, eps, n", [("--val", "4/255", 5000), ("--cifar", "8/255", 10000)])
def test_attack_defaults_follow_the_data(data, eps, n):
    from apr.adversarial.__main__ import apply_data_defaults, build_parser

    args = build_parser().parse_args(["--checkpoint", "a.pt", data, "d", "--out", "o"])
    apply_data_defaults(args)
    assert (args.eps, args.max_images, args.max_images_default) == (eps, n, True)
    args = build_parser().parse_args(["--checkpoint", "a.pt", data, "d", "--out", "o", "--eps", "2/255",
                                      "--max-images", "7"])
    apply_data_defaults(args)
    assert (args.eps, args.max_images, args.max_images_default) == ("2/255", 7, False)


def test_an_imagenet_attack_prints_its_plan_and_cost_first(tiny, imagenet_tree, tmp_path, capsys):
    from apr.adversarial.__main__ import main as adv_main

    assert adv_main(["--checkpoint", str(tiny[0]), "--val", str(imagenet_tree / "val"), "--attack", "fgsm", "pgd",
                     "--pgd-steps", "2", "--out", str(tmp_path), "--backend", "torchvision", "--workers", "0",
                     "--device", "cpu", "--batch-size", "24"]) == 0
    err = capsys.readouterr().err
    # the 5,000-image default is more than the folder holds: every image (24), at 4/255
    assert "Linf eps 4/255 on a fixed class-balanced subset of 24 of 24 images (ImageNet" in err
    assert "estimated cost: 24 images x up to 3 forward/backward passes (fgsm 1, pgd 2) = 72 passes" in err
    result = json.loads(next(tmp_path.glob("*.adv.json")).read_text())
    assert result["attacks"]["pgd"]["settings"]["eps"] == pytest.approx(4 / 255)
