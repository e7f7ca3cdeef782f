"""Adversarial training in the one loop: the FGSM hook against a hand-written fast FGSM, exact resume of an
FGSM-AT run, the PGD overfitting check in the logs, APR-S applied per image with ``s_prob``."""

from __future__ import annotations

import copy
import csv
import os
import signal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from apr.adversarial import FGSMPerturbation
from apr.augment import APRPolicy, apply_apr_s, apr_p, sample_apr_p_params, sample_apr_s_params
from apr.checkpoint import find_latest_checkpoint, load_checkpoint
from apr.config import load_config
from apr.inference import ImageClassifier
from apr.train import overfitting_warning, train, train_step

EPS, ALPHA = 8 / 255, 10 / 255


def hand_fast_fgsm(net, m, s, x, y, generator):
    """Wong et al.'s fast FGSM written out: U(-eps, eps) start kept in [0, 1], one signed step, projections."""
    delta = (torch.rand(x.shape, generator=generator) * 2 - 1) * EPS
    delta = ((x + delta).clamp(0, 1) - x).requires_grad_(True)
    F.cross_entropy(net((x + delta - m) / s), y).backward()
    delta = (delta.detach() + ALPHA * delta.grad.sign()).clamp(-EPS, EPS)
    return (x + delta).clamp(0, 1)


@pytest.mark.parametrize("halves", ["sum", "mean"])
def test_fgsm_hook_attacks_the_clean_and_apr_batch_then_takes_one_sgd_step(halves):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    reference = copy.deepcopy(net)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    classifier = ImageClassifier(net, mean, std, precision="fp32")
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    images, labels = torch.rand(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1])
    forwarded = []
    net.register_forward_pre_hook(lambda module, args: forwarded.append(args[0].detach().clone()))
    generator, ref_generator = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)

    loss = train_step(classifier, optimizer, images, labels, policy=APRPolicy("apr_p", p_prob=1.0),
                      generator=generator, perturb=FGSMPerturbation(EPS, ALPHA), halves=halves)

    batch = torch.cat([images, apr_p(images, prob=1.0, generator=ref_generator)])  # APR draws first
    both = torch.cat([labels, labels])
    adversarial = hand_fast_fgsm(copy.deepcopy(reference), m, s, batch, both, ref_generator)
    assert len(forwarded) == 2  # the attack's forward, then the loss's
    torch.testing.assert_close(forwarded[-1] * s + m, adversarial, rtol=0, atol=1e-5)
    change = forwarded[-1] * s + m - batch
    assert change.abs().max() <= EPS + 1e-5 and change.abs().max() > EPS / 2  # moved, within the ball
    assert (forwarded[-1] * s + m).min() >= -1e-6 and (forwarded[-1] * s + m).max() <= 1 + 1e-6
    logits = reference((adversarial - m) / s)
    expected = F.cross_entropy(logits[:6], labels) + F.cross_entropy(logits[6:], labels)
    expected = expected / 2 if halves == "mean" else expected
    expected.backward()
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-6)
    for new, old in zip(net.parameters(), reference.parameters()):
        torch.testing.assert_close(new, (old - 0.1 * old.grad).detach(), rtol=1e-5, atol=1e-6)
    # the random start drew from the run's generator right after APR: both generators are at the same place
    assert torch.equal(generator.get_state(), ref_generator.get_state())


def test_s_prob_applies_apr_s_to_each_image_with_its_probability():
    images = torch.rand(16, 3, 8, 8)
    policy = APRPolicy("apr_sp", p_prob=0.0, s_prob=0.5)
    first, second = policy(images, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    params = sample_apr_s_params(16, g)
    keep = torch.rand(16, generator=g, dtype=torch.float64) < 0.5
    expected = torch.where(keep.view(-1, 1, 1, 1), apply_apr_s(images, params), images)
    assert 0 < int(keep.sum()) < 16
    torch.testing.assert_close(first, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(second, first, rtol=0, atol=1e-6)  # p_prob 0: APR-P leaves the batch alone
    unchanged = ~keep
    torch.testing.assert_close(first[unchanged], images[unchanged], rtol=0, atol=0)
    # s_prob 0: nothing replaced; s_prob 1 draws no coins, so older runs keep their random sequence
    none, _ = APRPolicy("apr_s", s_prob=0.0)(images, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(none, images, rtol=0, atol=0)
    g_full, g_old = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    APRPolicy("apr_sp", s_prob=1.0)(images, generator=g_full)
    sample_apr_s_params(16, g_old), sample_apr_p_params(16, 0.6, g_old)
    assert torch.equal(g_full.get_state(), g_old.get_state())


def test_overfitting_warning_fires_on_a_drop_from_the_best_epoch():
    history = [{"pgd_accuracy": 0.30}, {"pgd_accuracy": 0.45}, {"val_top1_error": 0.5}]
    assert overfitting_warning(history, 0.40, 0.2) is None
    assert overfitting_warning(history, 0.25, 0.2) is None  # 0.20 exactly: not more than the allowed drop
    message = overfitting_warning(history, 0.05, 0.2)
    assert "0.050" in message and "0.450" in message and "overfit" in message
    assert overfitting_warning([], 0.0, 0.2) is None  # the first check has nothing to compare with


def adversarial_config(root: Path, out: Path, *extra: str):
    return load_config(overrides=[
        "data.dataset=cifar10", f"data.root={root}", "data.image_size=32", "data.num_workers=1",
        "data.mean=[0.4914, 0.4822, 0.4465]", "data.std=[0.2471, 0.2435, 0.2616]", "model.name=cnn_tiny",
        "optim.lr=0.05", "optim.lr_base_batch=0", "optim.schedule=cyclic", "optim.cyclic_momentum=[0.8, 0.9]",
        "train.epochs=2",
        "train.batch_size=16", "train.precision=fp32", "train.deterministic=true", "train.log_every=1",
        f"train.output_dir={out}", "train.run_name=run", "aug.name=apr_sp", "aug.s_prob=0.5", "aug.p_prob=0.5",
        "aug.loss=mean", "adversarial.method=fgsm", "adversarial.eps=8/255", "adversarial.alpha=10/255", *extra,
    ])


def test_fgsm_training_resumes_exactly_and_logs_the_pgd_check(cifar10_folder, tmp_path):
    straight = train(adversarial_config(cifar10_folder, tmp_path / "a"), progress=False)
    assert straight.status == "finished" and straight.global_step == 10  # 80 / 16 x 2 epochs
    checks = [h["pgd_accuracy"] for h in straight.history]
    assert len(checks) == 2 and all(0.0 <= c <= 1.0 for c in checks)
    assert all(h["overfitting_warning"] in (True, False) for h in straight.history)

    def preempt(info):
        if info["epoch"] == 1 and info["step"] == 2:
            os.kill(os.getpid(), signal.SIGUSR1)

    cfg = adversarial_config(cifar10_folder, tmp_path / "b")
    assert train(cfg, progress=False, on_step_end=preempt).status == "preempted"
    resumed = train(cfg, resume="auto", progress=False)
    a = load_checkpoint(find_latest_checkpoint(tmp_path / "a" / "run"))
    b = load_checkpoint(find_latest_checkpoint(tmp_path / "b" / "run"))
    for key in a["model"]:  # the same code path run twice: bit for bit
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert [h["pgd_accuracy"] for h in resumed.history] == checks  # the check is resume-proof too
    rows = list(csv.DictReader(open(tmp_path / "a" / "run" / "metrics.csv")))
    logged = [float(r["pgd_accuracy"]) for r in rows if r["pgd_accuracy"]]
    assert logged == pytest.approx(checks, abs=1e-5)
    lrs = [float(r["lr"]) for r in rows if r["lr"]]
    assert max(lrs) == pytest.approx(0.05 * (1 - abs(2 * 5 / 10 - 1)), rel=1e-6)  # cyclic peak after step 5


def test_fgsm_training_runs_in_bf16_with_every_aug_and_the_check_can_be_off(cifar10_folder, tmp_path):
    for aug in ("none", "apr_p", "apr_s"):
        cfg = adversarial_config(cifar10_folder, tmp_path / aug, f"aug.name={aug}", "train.precision=bf16",
                                 "train.epochs=1", "train.max_steps_per_epoch=2",
                                 "adversarial.check_every_epoch=false")
        result = train(cfg, progress=False)
        assert result.status == "finished" and result.global_step == 2
        assert "pgd_accuracy" not in result.history[0]
        assert torch.isfinite(torch.tensor(result.history[0]["train_loss"]))
