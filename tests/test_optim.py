"""Optimizer and schedule: batch-scaled lr, and a scheduler rebuilt at step g is the one stepped g times."""

from pathlib import Path

import pytest
import torch

from apr.config import load_config
from apr.optim import build_optimizer, build_scheduler, cyclic_factor, scaled_lr, set_cyclic_momentum

ROOT = Path(__file__).resolve().parents[1]


def test_lr_scales_with_the_global_batch():
    cfg = load_config(overrides=["optim.lr=0.1", "optim.lr_base_batch=256", "train.batch_size=32"])
    assert scaled_lr(cfg, 8) == pytest.approx(0.1)  # 8 x 32 = 256: the paper's recipe
    assert scaled_lr(cfg, 1) == pytest.approx(0.1 * 32 / 256)
    unscaled = load_config(overrides=["optim.lr=0.1", "optim.lr_base_batch=0", "train.batch_size=32"])
    assert scaled_lr(unscaled, 4) == pytest.approx(0.1)


def test_cifar_recipe_keeps_the_reference_lr_on_one_process_and_scales_on_two():
    cfg = load_config(ROOT / "configs" / "cifar" / "cifar10_wrn40_2_apr_sp.yaml")
    assert scaled_lr(cfg, 1) == pytest.approx(0.1)  # single-process results unchanged
    assert scaled_lr(cfg, 2) == pytest.approx(0.2)  # global batch 256


@pytest.mark.parametrize("schedule", [["optim.schedule=step", "optim.step_size=2"],
                                      ["optim.schedule=cosine", "optim.warmup_epochs=1"],
                                      ["optim.schedule=cyclic"]])
def test_scheduler_built_at_a_step_matches_one_stepped_there(schedule):
    cfg = load_config(overrides=["train.epochs=6", "optim.gamma=0.5", *schedule])
    steps_per_epoch, base_lr = 3, 0.4

    def fresh():
        params = [torch.nn.Parameter(torch.zeros(2))]
        optimizer = build_optimizer(params, cfg, base_lr)
        return optimizer, build_scheduler(optimizer, cfg, steps_per_epoch, base_lr)

    optimizer, stepped = fresh()
    for global_step in range(1, 15):
        optimizer.step()
        stepped.step()
        other_optimizer, _ = fresh()
        other_optimizer.param_groups[0]["lr"] = 123.0  # whatever a checkpoint of another world left there
        rebuilt = build_scheduler(other_optimizer, cfg, steps_per_epoch, base_lr, global_step)
        assert rebuilt.last_epoch == stepped.last_epoch == global_step
        assert rebuilt.get_last_lr()[0] == pytest.approx(stepped.get_last_lr()[0], rel=1e-12)
        assert other_optimizer.param_groups[0]["lr"] == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-12)
        other_optimizer.step()
        rebuilt.step()
        stepped_next = stepped.lr_lambdas[0](global_step + 1) * base_lr
        assert rebuilt.get_last_lr()[0] == pytest.approx(stepped_next, rel=1e-12)


def test_cyclic_schedule_is_the_reference_triangle_per_step():
    """0 -> lr_max at mid-run -> 0, per optimizer step: by hand, and against torch's CyclicLR as the
    reference builds it (base_lr 0, step_size_up = step_size_down = half the steps; momentum not cycled)."""
    cfg = load_config(overrides=["optim.schedule=cyclic", "train.epochs=2", "optim.lr=0.2"])
    steps_per_epoch, lr_max = 5, 0.2
    optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(2))], cfg, lr_max)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch, lr_max)
    used = []
    for _ in range(10):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    by_hand = [0.0, 0.04, 0.08, 0.12, 0.16, 0.2, 0.16, 0.12, 0.08, 0.04]  # lr_max * 2i/10, then 2(10-i)/10
    assert used == pytest.approx(by_hand, abs=1e-12)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # after the last step

    reference_optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr_max, momentum=0.9)
    reference = torch.optim.lr_scheduler.CyclicLR(reference_optimizer, base_lr=0.0, max_lr=lr_max,
                                                  step_size_up=10 / 2, step_size_down=10 / 2,
                                                  cycle_momentum=False)
    expected = []
    for _ in range(10):
        expected.append(reference_optimizer.param_groups[0]["lr"])
        reference_optimizer.step()
        reference.step()
    assert used == pytest.approx(expected, abs=1e-9)
    assert cyclic_factor(5, 10) == 1.0 and cyclic_factor(0, 10) == 0.0 and cyclic_factor(12, 10) == 0.0


def test_cyclic_momentum_moves_against_the_lr_as_the_reference_cycliclr():
    cfg = load_config(overrides=["optim.schedule=cyclic", "train.epochs=2", "optim.cyclic_momentum=[0.8, 0.9]"])
    optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(2))], cfg, 0.2)
    scheduler = build_scheduler(optimizer, cfg, 5, 0.2)
    reference_optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.2, momentum=0.9)
    reference = torch.optim.lr_scheduler.CyclicLR(reference_optimizer, base_lr=0.0, max_lr=0.2, step_size_up=5,
                                                  step_size_down=5, base_momentum=0.8, max_momentum=0.9)
    used, expected = [], []
    for _ in range(10):
        used.append(optimizer.param_groups[0]["momentum"])
        expected.append(reference_optimizer.param_groups[0]["momentum"])
        optimizer.step()
        scheduler.step()
        set_cyclic_momentum(optimizer, cfg, 5, scheduler.last_epoch)
        reference_optimizer.step()
        reference.step()
    by_hand = [0.9 - 0.1 * f for f in (0, .2, .4, .6, .8, 1, .8, .6, .4, .2)]
    assert used == pytest.approx(by_hand, abs=1e-12)
    assert used == pytest.approx(expected, abs=1e-9)
    rebuilt_optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(2))], cfg, 0.2)
    build_scheduler(rebuilt_optimizer, cfg, 5, 0.2, global_step=5)  # a resume on another world size
    assert rebuilt_optimizer.param_groups[0]["momentum"] == pytest.approx(0.8)
