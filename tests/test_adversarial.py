"""apr.adversarial: FGSM/PGD against closed-form perturbations of a linear model, a trained model's
robustness curve, AutoAttack end to end, and the resumable CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.testing import assert_close

import apr.adversarial.run as adv_run
from apr.adversarial.attacks import _random_start
from apr.adversarial import (AdversarialError, FGSMPerturbation, autoattack, build_attacks,
                             catastrophic_overfitting_check, fgsm_perturb, masking_flags, parse_eps, pgd_attack,
                             stratified_subset)
from apr.adversarial.__main__ import main as adv_main
from apr.checkpoint import save_checkpoint
from apr.cli import run_main
from apr.config import Config, config_to_dict
from apr.inference import ImageClassifier
from apr.models import create_model

EPS = 8 / 255


# ----------------------------------------------------------------------------- linear model, closed form


def linear_classifier(weights: torch.Tensor, mean=None, std=None) -> ImageClassifier:
    """Two classes, logits = W x (no bias): d CE / dx = p_other (W_other - W_label), whose sign is known."""
    linear = nn.Linear(weights.shape[1], 2, bias=False)
    with torch.no_grad():
        linear.weight.copy_(weights)
    return ImageClassifier(nn.Sequential(nn.Flatten(), linear), mean, std, precision="fp32")


@pytest.fixture
def linear_case():
    torch.manual_seed(0)
    weights = torch.randn(2, 3 * 2 * 2) * 0.1
    # pixels at the borders of [0, 1] so that both clamps matter
    images = torch.tensor([[0.0, 1.0, 0.5, 0.01], [0.99, 0.2, 0.02, 1.0], [0.5, 0.03, 0.97, 0.0]]).reshape(1, 3, 2, 2)
    images = torch.cat([images, 1 - images])
    labels = torch.tensor([0, 1])
    # the sign of the loss gradient, per image: sign(W_other - W_label), reshaped as an image
    signs = torch.stack([(weights[1 - y] - weights[y]).sign() for y in labels.tolist()]).reshape(images.shape)
    return weights, images, labels, signs


def test_fgsm_without_random_start_is_one_signed_step(linear_case):
    weights, images, labels, signs = linear_case
    adv = fgsm_perturb(linear_classifier(weights), images, labels, eps=EPS, alpha=EPS, random_start=False)
    assert_close(adv, (images + EPS * signs).clamp(0, 1))


def test_fgsm_eps_is_in_pixel_units_with_normalisation_inside(linear_case):
    weights, images, labels, signs = linear_case
    model = linear_classifier(weights, mean=[0.4, 0.5, 0.6], std=[0.2, 0.3, 0.25])
    adv = fgsm_perturb(model, images, labels, eps=EPS, alpha=EPS, random_start=False)
    # dividing by a positive std keeps the gradient's sign: the same pixel-space step as without normalisation
    assert_close(adv, (images + EPS * signs).clamp(0, 1))


def test_fgsm_random_start_step_and_projections_match_hand_computation(linear_case):
    weights, images, labels, signs = linear_case
    alpha = 10 / 255
    adv = fgsm_perturb(linear_classifier(weights), images, labels, eps=EPS, alpha=alpha, random_start=True,
                       generator=torch.Generator().manual_seed(5))
    u = torch.rand(images.shape, generator=torch.Generator().manual_seed(5)).numpy()
    x, s = images.numpy(), signs.numpy()
    start = np.clip(x + (2 * u - 1) * EPS, 0, 1) - x          # U(-eps, eps), kept inside [0, 1]
    step = np.clip(start + alpha * s, -EPS, EPS)                 # signed step, back into the eps-ball
    expected = np.clip(x + step, 0, 1)                           # and into [0, 1]
    assert_close(adv, torch.from_numpy(expected).float())
    assert (adv - images).abs().max() <= EPS + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1
    # pixels whose start plus the step passes eps (and that [0, 1] does not stop) end on the ball's face
    on_face = torch.from_numpy((start * s + alpha >= EPS)) & ((images + EPS * signs) >= 0) & ((images + EPS * signs) <= 1)
    assert on_face.sum() >= 3
    assert_close((adv - images)[on_face], (EPS * signs)[on_face])


def test_random_start_stays_in_the_ball_and_the_image_range(linear_case):
    weights, images, labels, _ = linear_case
    images = images.repeat(50, 1, 1, 1)
    labels = labels.repeat(50)
    tiny = 1e-6  # a negligible step: the output is the random start itself
    adv = fgsm_perturb(linear_classifier(weights), images, labels, eps=EPS, alpha=tiny,
                       generator=torch.Generator().manual_seed(1))
    delta = adv - images
    assert delta.abs().max() <= EPS + 2 * tiny
    assert adv.min() >= 0 and adv.max() <= 1
    assert delta.abs().max() > 0.9 * EPS and delta.std() > EPS / 4  # spread over the ball, not a constant


def test_fgsm_leaves_no_parameter_gradients_and_is_a_training_hook(linear_case):
    weights, images, labels, signs = linear_case
    model = linear_classifier(weights).train()
    perturb = FGSMPerturbation(eps=EPS, alpha=EPS, random_start=False)
    adv = perturb(model, images, labels, torch.Generator().manual_seed(0))
    assert all(p.grad is None for p in model.parameters())
    assert not adv.requires_grad and model.training
    assert_close(adv, (images + EPS * signs).clamp(0, 1))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    random_hook = FGSMPerturbation()
    assert torch.equal(random_hook(model, images, labels, g1), random_hook(model, images, labels, g2))  # same path


def test_pgd_steps_accumulate_then_stop_at_the_ball(linear_case):
    weights, images, labels, signs = linear_case
    model = linear_classifier(weights)
    two = pgd_attack(model, images, labels, eps=EPS, alpha=EPS / 3, steps=2, random_start=False)
    assert_close(two, (images + 2 * EPS / 3 * signs).clamp(0, 1))
    five = pgd_attack(model, images, labels, eps=EPS, alpha=EPS / 3, steps=5, random_start=False)
    assert_close(five, (images + EPS * signs).clamp(0, 1))


def test_fgsm_under_bf16_autocast_keeps_the_contract(linear_case):
    weights, images, labels, signs = linear_case
    model = linear_classifier(weights)
    model.precision = "bf16"
    adv = fgsm_perturb(model, images, labels, eps=EPS, alpha=EPS, random_start=False)
    assert adv.dtype == torch.float32
    assert (adv - images).abs().max() <= EPS + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    assert_close(adv, (images + EPS * signs).clamp(0, 1))  # bf16 rounds the logits, not the sign here


@pytest.mark.parametrize("text", ["0", "-8/255", "1/0", "eight", "nan"])
def test_bad_eps_is_a_user_error(text):
    with pytest.raises(AdversarialError):
        parse_eps(text)


def test_eps_fractions_and_bad_settings():
    assert_close(parse_eps("8/255"), 8 / 255)
    assert parse_eps("0.5") == 0.5
    with pytest.raises(AdversarialError, match="unknown attack"):
        build_attacks(["fgsm", "cw"], eps=EPS)
    with pytest.raises(AdversarialError, match=r"\(0, 1\]"):
        build_attacks(["pgd"], eps=2.0)
    with pytest.raises(AdversarialError, match="Linf"):
        build_attacks(["pgd"], eps=0.5, norm="L2")
    with pytest.raises(AdversarialError):
        FGSMPerturbation(eps=0.0)


# ----------------------------------------------------------------------------- a trained model


@pytest.fixture(scope="module")
def digits_model():
    """An MLP trained on 600 of sklearn's 8x8 digits (as 3-channel images); attacked on 400 of them."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images[:600] / 16.0, dtype=torch.float32).unsqueeze(1).repeat(1, 3, 1, 1)
    labels = torch.tensor(digits.target[:600])
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(192, 64), nn.ReLU(), nn.Linear(64, 10))
    model = ImageClassifier(net, [0.3] * 3, [0.4] * 3, precision="fp32")
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(100):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
    model.eval()
    return model, images[:400], labels[:400]


def accuracy(model, images, labels) -> float:
    with torch.no_grad():
        return (model(images).argmax(1) == labels).float().mean().item()


def test_trained_model_loses_accuracy_under_pgd_and_more_as_eps_grows(digits_model):
    model, images, labels = digits_model
    clean = accuracy(model, images, labels)
    assert clean > 0.9
    robust = []
    for eps in (0.02, 0.05, 0.1, 0.2):
        adv = pgd_attack(model, images, labels, eps=eps, alpha=eps / 4, steps=10,
                         generator=torch.Generator().manual_seed(0))
        assert (adv - images).abs().max() <= eps + 1e-6
        robust.append(accuracy(model, adv, labels))
    assert all(r <= clean for r in robust)
    assert all(b < a for a, b in zip(robust, robust[1:])), robust
    assert robust[-1] < 0.5 * clean
    fgsm = fgsm_perturb(model, images, labels, eps=0.1, alpha=0.1, random_start=False)
    assert robust[2] <= accuracy(model, fgsm, labels)  # 10-step PGD at least as strong as FGSM


def test_catastrophic_overfitting_check_is_5_step_pgd_accuracy(digits_model):
    model, images, labels = digits_model
    model.train()
    value = catastrophic_overfitting_check(model, images[:128], labels[:128], 0.1,
                                           generator=torch.Generator().manual_seed(2))
    assert model.training  # mode restored
    model.eval()
    adv = pgd_attack(model, images[:128], labels[:128], eps=0.1, alpha=2 / 255, steps=5,
                     generator=torch.Generator().manual_seed(2))
    assert value == pytest.approx(accuracy(model, adv, labels[:128]))
    assert 0.0 <= value < accuracy(model, images[:128], labels[:128])


def test_autoattack_apgd_ce_runs_end_to_end_on_cpu(digits_model):
    model, images, labels = digits_model
    x, y = images[:16], labels[:16]
    adv = autoattack(model, x, y, eps=0.1, version="custom", attacks=["apgd-ce"], n_iter=10, seed=0)
    assert adv.shape == x.shape
    assert (adv - x).abs().max() <= 0.1 + 1e-5 and adv.min() >= 0 and adv.max() <= 1
    clean, robust = accuracy(model, x, y), accuracy(model, adv, y)
    assert robust <= clean and robust < 0.75 * clean


@pytest.mark.slow
def test_autoattack_standard_runs_all_four_attacks_on_cpu(digits_model, caplog):
    import logging

    model, images, labels = digits_model
    x, y = images[:8], labels[:8]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of tiny ops (5000 Square queries): threads only add waiting
    try:
        with caplog.at_level(logging.DEBUG, logger="auto-attack"):
            adv = autoattack(model, x, y, eps=0.06, version="standard", seed=0)
    finally:
        torch.set_num_threads(threads)
    ran = [r.getMessage().split()[-1] for r in caplog.records if r.getMessage().startswith("running ")]
    clean, robust = accuracy(model, x, y), accuracy(model, adv, y)
    assert 0 < robust <= clean  # some images survive APGD-CE, so every later attack runs too
    assert ran == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert (adv - x).abs().max() <= 0.06 + 1e-5 and adv.min() >= 0 and adv.max() <= 1


def test_autoattack_standard_settings_are_the_published_ones():
    import pyautoattack

    specs = build_attacks(["autoattack"], eps=EPS)
    settings = specs[0].settings
    assert settings["attacks"] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert settings["square_queries"] == 5000 and settings["apgd_t_target_classes"] == 9
    assert settings["library"] == "pyautoattack" and settings["library_version"] == pyautoattack.__version__
    adversary = pyautoattack.AutoAttack(nn.Identity(), eps=EPS, version="standard")  # what the library does
    assert adversary.attacks_to_run == settings["attacks"]
    assert adversary.square.n_queries == 5000 and adversary.apgd_targeted.n_target_classes == 9
    assert adversary.fab.n_target_classes == 9 and adversary.apgd.n_iter == 100


# ----------------------------------------------------------------------------- subset and flags


def test_stratified_subset_is_deterministic_and_balanced():
    labels = torch.arange(10).repeat_interleave(torch.tensor([50, 40, 30, 30, 30, 30, 30, 30, 30, 20]))
    first = stratified_subset(labels, 100, seed=0)
    assert torch.equal(first, stratified_subset(labels, 100, seed=0))
    assert len(set(first.tolist())) == 100
    assert torch.bincount(labels[first], minlength=10).tolist() == [10] * 10
    assert not torch.equal(first, stratified_subset(labels, 100, seed=1))
    with pytest.raises(AdversarialError, match="--max-images"):
        stratified_subset(labels, len(labels) + 1, seed=0)


def test_masking_flags():
    def result(fgsm, pgd, sweep):
        return {"clean": {"accuracy": 0.5}, "attacks": {"fgsm": {"robust_accuracy": fgsm},
                                                        "pgd": {"robust_accuracy": pgd}},
                "eps_sweep": {"eps": [1, 2, 3], "robust_accuracy": sweep}}

    assert masking_flags(result(0.3, 0.2, [0.4, 0.2, 0.1])) == []
    flags = masking_flags(result(0.3, 0.6, [0.4, 0.2, 0.1]))
    assert any(f.startswith("pgd_weaker_than_fgsm") for f in flags)
    assert any(f.startswith("robust_above_clean: pgd") for f in flags)
    assert [f.split(":")[0] for f in masking_flags(result(0.3, 0.2, [0.2, 0.3, 0.1]))] == ["eps_sweep_not_decreasing"]
    assert [f.split(":")[0] for f in masking_flags(result(0.3, 0.2, [0.3, 0.3, 0.3]))] == ["eps_sweep_flat"]


# ----------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, cifar10_folder):
    from apr.data import load_cifar

    images, labels, classes = load_cifar(cifar10_folder, "cifar10", train=True)
    cfg = Config()
    cfg.data.dataset, cfg.data.image_size = "cifar10", 32
    cfg.data.mean, cfg.data.std = [0.3, 0.3, 0.3], [0.3, 0.3, 0.3]
    cfg.model.name, cfg.train.run_name = "cnn_tiny", "adv_tiny"
    torch.manual_seed(0)
    model = create_model("cnn_tiny", len(classes))
    x = torch.tensor(images).permute(0, 3, 1, 2).float() / 255
    classifier = ImageClassifier(model, cfg.data.mean, cfg.data.std)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(30):
        optimizer.zero_grad()
        nn.functional.cross_entropy(classifier(x), torch.tensor(labels)).backward()
        optimizer.step()
    path = tmp_path_factory.mktemp("adv_ckpt") / "tiny.pt"
    save_checkpoint({"model": model.state_dict(), "model_name": "cnn_tiny", "num_classes": len(classes),
                     "classes": list(classes), "config": config_to_dict(cfg), "epoch": 1, "step": 30}, path)
    return path, classifier.eval()


def count_pgd_calls(monkeypatch) -> list:
    calls = []
    real = adv_run.pgd_attack

    def counting(*args, **kwargs):
        calls.append(kwargs.get("steps"))
        return real(*args, **kwargs)

    monkeypatch.setattr(adv_run, "pgd_attack", counting)
    return calls


@pytest.mark.filterwarnings("ignore:.*possible gradient masking")
def test_cli_writes_json_and_resumes_without_recomputing(tiny_checkpoint, cifar10_folder, tmp_path, monkeypatch):
    path, classifier = tiny_checkpoint
    args = ["--checkpoint", str(path), "--cifar", str(cifar10_folder), "--attack", "fgsm", "pgd", "--eps", "8/255",
            "--n", "30", "--batch-size", "8", "--pgd-steps", "3", "--out", str(tmp_path / "report"), "--device", "cpu",
            "--eps-sweep", "--sweep-n", "10", "--sweep-steps", "2"]
    calls = count_pgd_calls(monkeypatch)
    assert adv_main(args) == 0
    out = tmp_path / "report" / "adv_tiny.adv.json"
    result = json.loads(out.read_text())
    assert result["schema"] == "apr.adv/1" and result["finished"]
    assert result["n"] == 30 and result["dataset"]["n"] == 30 and result["dataset"]["total"] == 40
    # clean accuracy against an independent pass over the same subset
    from apr.data import load_cifar

    images, labels, _ = load_cifar(cifar10_folder, "cifar10", train=False)
    idx = stratified_subset(torch.tensor(labels), 30, seed=0)
    x = torch.tensor(images[idx.numpy()]).permute(0, 3, 1, 2).float() / 255
    expected = int((classifier(x).argmax(1) == torch.tensor(labels)[idx]).sum())
    assert result["clean"]["correct"] == expected and result["clean"]["n"] == 30
    pgd = result["attacks"]["pgd"]
    assert pgd["settings"]["steps"] == 3 and pgd["settings"]["eps"] == pytest.approx(8 / 255)
    assert pgd["settings"]["alpha"] == pytest.approx(2 / 255) and pgd["n"] == 30
    assert result["attacks"]["fgsm"]["settings"]["random_start"] is False
    assert len(result["eps_sweep"]["robust_accuracy"]) == 4 and result["eps_sweep"]["n"] == [10] * 4
    assert isinstance(result["flags"], list)
    assert len(calls) == 4 * 2 + 4 * 2  # fgsm + pgd + 4 sweep attacks, each over 4 batches / 2 batches
    calls.clear()
    assert adv_main(args) == 0  # a rerun resumes: nothing attacked again
    assert calls == []
    assert json.loads(out.read_text())["attacks"] == result["attacks"]
    assert adv_main([a if a != "3" else "4" for a in args]) == 0  # other PGD settings: only pgd reruns
    assert set(calls) == {4}
    calls.clear()
    assert adv_main(args[:5] + ["fgsm"] + args[7:]) == 0  # fewer attacks asked: the others are kept
    assert calls == []
    kept = json.loads(out.read_text())
    assert set(kept["attacks"]) == {"fgsm", "pgd"} and kept["attacks"]["fgsm"] == result["attacks"]["fgsm"]
    assert kept["attacks"]["pgd"]["settings"]["steps"] == 4 and kept["eps_sweep"] == result["eps_sweep"]


def test_cli_on_an_imagefolder(tiny_config_tree, tmp_path):
    path, tree = tiny_config_tree
    with pytest.warns(UserWarning, match="bf16"):
        assert adv_main(["--checkpoint", str(path), "--val", str(tree), "--attack", "fgsm", "--n", "12",
                         "--backend", "torchvision", "--workers", "0", "--out", str(tmp_path), "--device", "cpu",
                         "--precision", "bf16"]) == 0
    result = json.loads(next(tmp_path.glob("*.adv.json")).read_text())
    assert result["dataset"]["kind"] == "imagefolder" and result["attacks"]["fgsm"]["n"] == 12
    assert result["precision"] == "bf16" and result["clean"]["n"] == 12


@pytest.fixture
def tiny_config_tree(imagenet_tree, tmp_path):
    cfg = Config()
    cfg.data.image_size, cfg.data.val_resize = 32, 32
    cfg.model.name, cfg.train.run_name = "cnn_tiny", "adv_folder"
    classes = [f"n{k:08d}" for k in range(4)]
    torch.manual_seed(0)
    model = create_model("cnn_tiny", 4)
    path = save_checkpoint({"model": model.state_dict(), "model_name": "cnn_tiny", "num_classes": 4,
                            "classes": classes, "config": config_to_dict(cfg), "epoch": 1, "step": 1},
                           tmp_path / "folder.pt")
    return path, imagenet_tree / "val"


@pytest.mark.parametrize("change, message", [(["--eps", "0"], "eps"), (["--max-images", "41"], "--max-images 41"),
                                             (["--eps=-8/255"], "eps"), (["--eps", "2"], "(0, 1]"),
                                             (["--norm", "L2"], "Linf")])
def test_cli_bad_input_is_one_error_line(tiny_checkpoint, cifar10_folder, tmp_path, capsys, change, message):
    path, _ = tiny_checkpoint
    args = ["--checkpoint", str(path), "--cifar", str(cifar10_folder), "--attack", "fgsm", "--out", str(tmp_path),
            "--device", "cpu", *change]
    assert run_main(adv_main, args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err


def test_cli_unknown_attack_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        adv_main(["--checkpoint", "x.pt", "--cifar", "c", "--attack", "cw", "--out", str(tmp_path)])
    assert exc.value.code == 2 and "invalid choice: 'cw'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- two ranks (gloo, CPU)


def _two_rank_worker(rank: int, port: int, args: list, out):
    """One torchrun-like rank: the CLI on half of the images, then the FGSM hook inside DDP training."""
    import os
    import warnings

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    warnings.simplefilter("ignore")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    code = adv_main(args)
    torch.manual_seed(0)
    model = DDP(linear_classifier(torch.randn(2, 12) * 0.1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    images, labels = torch.rand(4, 3, 2, 2), torch.tensor([0, 1, 0, 1])
    hook_left_grads = []
    for step in range(2):  # DDP must accept the attack pass between two training steps
        optimizer.zero_grad(set_to_none=True)
        adv = FGSMPerturbation()(model, images, labels, torch.Generator().manual_seed(rank * 10 + step))
        hook_left_grads.append(any(p.grad is not None for p in model.parameters()))
        nn.functional.cross_entropy(model(adv), labels).backward()
        optimizer.step()
    weights = model.module.model[1].weight.detach().tolist()  # plain floats: no shared memory across exit
    out.put((rank, code, hook_left_grads, weights))
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.filterwarnings("ignore:.*possible gradient masking")
def test_two_ranks_split_the_images_and_sum_the_counts(tiny_checkpoint, cifar10_folder, tmp_path):
    import socket

    import torch.multiprocessing as mp

    path, _ = tiny_checkpoint
    base = ["--checkpoint", str(path), "--cifar", str(cifar10_folder), "--attack", "fgsm", "--n", "30",
            "--batch-size", "8", "--device", "cpu"]
    assert adv_main(base + ["--out", str(tmp_path / "one")]) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_two_rank_worker, args=(r, port, base + ["--out", str(tmp_path / "two")], out))
             for r in range(2)]
    for p in procs:
        p.start()
    results = sorted((out.get(timeout=240) for _ in procs), key=lambda r: r[0])
    for p in procs:
        p.join(timeout=30)
    assert [r[1] for r in results] == [0, 0]
    one = json.loads((tmp_path / "one" / "adv_tiny.adv.json").read_text())
    two = json.loads((tmp_path / "two" / "adv_tiny.adv.json").read_text())
    assert two["clean"]["n"] == 30 and two["attacks"]["fgsm"]["n"] == 30
    # other batch compositions may round a near-tie differently: counts agree to one image
    assert abs(two["clean"]["correct"] - one["clean"]["correct"]) <= 1
    assert abs(two["attacks"]["fgsm"]["correct"] - one["attacks"]["fgsm"]["correct"]) <= 1
    assert all(left == [False, False] for _, _, left, _ in results)  # the attack wrote no parameter gradient
    assert_close(torch.tensor(results[0][3]), torch.tensor(results[1][3]))  # DDP kept the replicas in step


# ---------------------------------------------------------------------------------------
# FGSM / PGD on CUDA against the CPU


@pytest.fixture
def no_tf32():
    """TF32 off: the comparison is of the attack code on the two devices, not of TF32's 10-bit rounding."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def attack_case(device: str):
    """cnn_tiny (random weights, fp32) and 16 noise images: continuous values, so no max-pool ties."""
    torch.manual_seed(0)
    net = create_model("cnn_tiny", 4).eval()
    model = ImageClassifier(net.to(device), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), precision="fp32")
    images = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return model, images, torch.arange(16) % 4


def unsure_signs(model, images, labels, rel: float = 1e-3) -> torch.Tensor:
    """Input-gradient elements within ``rel`` of their image's largest: float32 noise may give them either sign."""
    x = images.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x), labels, reduction="sum"), x)
    return grad.abs() <= rel * grad.abs().flatten(1).max(1).values.view(-1, 1, 1, 1)


@pytest.mark.cuda
@pytest.mark.parametrize("random_start", [False, True])
def test_fgsm_on_cuda_differs_from_cpu_only_where_the_gradient_sign_is_unsure(no_tf32, random_start):
    cpu_model, images, labels = attack_case("cpu")
    gpu_model, _, _ = attack_case("cuda")
    kwargs = dict(eps=8 / 255, alpha=10 / 255 if random_start else 8 / 255, random_start=random_start)
    cpu = fgsm_perturb(cpu_model, images, labels, generator=torch.Generator().manual_seed(2), **kwargs)
    gpu = fgsm_perturb(gpu_model, images.cuda(), labels.cuda(), generator=torch.Generator().manual_seed(2), **kwargs)
    differ = (gpu.cpu() - cpu).abs() > 1e-6
    # the random start is drawn on the CPU generator: the same start on both devices, the sign taken there
    start = images + _random_start(images, 8 / 255, torch.Generator().manual_seed(2)) if random_start else images
    unsure = unsure_signs(cpu_model, start, labels)
    assert not (differ & ~unsure).any(), int((differ & ~unsure).sum())
    assert differ.float().mean() <= 1e-3, float(differ.float().mean())
    assert (gpu.cpu() - images).abs().max() <= 8 / 255 + 1e-6 and 0 <= gpu.min() and gpu.max() <= 1


@pytest.mark.cuda
def test_pgd_on_cuda_is_as_strong_as_on_cpu(no_tf32):
    cpu_model, images, labels = attack_case("cpu")
    gpu_model, _, _ = attack_case("cuda")
    kwargs = dict(eps=8 / 255, alpha=2 / 255, steps=5, restarts=2)
    cpu = pgd_attack(cpu_model, images, labels, generator=torch.Generator().manual_seed(3), **kwargs)
    gpu = pgd_attack(gpu_model, images.cuda(), labels.cuda(), generator=torch.Generator().manual_seed(3), **kwargs).cpu()
    assert (gpu - images).abs().max() <= 8 / 255 + 1e-6 and 0 <= gpu.min() and gpu.max() <= 1
    with torch.no_grad():
        losses = [F.cross_entropy(cpu_model(x), labels, reduction="none") for x in (images, cpu, gpu)]
    clean, want, got = losses
    assert (got > clean).all()  # the attack climbed on every image
    # 5 signed steps from the same start: elements whose sign was unsure may differ, the loss hardly
    assert ((got - want).abs() / want).median() <= 1e-3 and ((got - want).abs() / want).max() <= 0.05
    assert torch.equal(cpu, pgd_attack(cpu_model, images, labels, generator=torch.Generator().manual_seed(3), **kwargs))
