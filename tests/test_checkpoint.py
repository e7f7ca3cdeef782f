"""Checkpoints: atomic writes, safe loads, clear errors, RNG round trips, retention, signals."""

import os
import random
import signal

import numpy as np
import pytest
import torch

from apr.checkpoint import (
    CheckpointError,
    CheckpointManager,
    PreemptionFlag,
    capture_rng_state,
    find_latest_checkpoint,
    load_checkpoint,
    load_model_for_eval,
    restore_rng_state,
    save_checkpoint,
)
from apr.config import config_to_dict, load_config
from apr.models import create_model


def _state(model_name="cnn_tiny", classes=("a", "b", "c")):
    model = create_model(model_name, len(classes))
    cfg = load_config(overrides=[f"model.name={model_name}"])
    return {"model": model.state_dict(), "model_name": model_name, "num_classes": len(classes),
            "classes": list(classes), "config": config_to_dict(cfg), "epoch": 1, "step": 0,
            "rng": [capture_rng_state()], "blob": b"\x00dali-bytes"}, model


def test_round_trip_with_weights_only_and_eval_model(tmp_path):
    state, model = _state()
    path = save_checkpoint(state, tmp_path / "ckpt.pt")
    loaded = load_checkpoint(path)
    assert loaded["blob"] == b"\x00dali-bytes" and loaded["classes"] == ["a", "b", "c"]
    eval_model, cfg, classes, info = load_model_for_eval(path)
    assert not eval_model.training and classes == ["a", "b", "c"] and cfg.model.name == "cnn_tiny"
    x = torch.rand(2, 3, 32, 32)
    model.eval()
    assert torch.equal(eval_model(x), model(x))
    assert info["epoch"] == 1


def test_atomic_write_leaves_old_file_intact_when_saving_fails(tmp_path):
    state, _ = _state()
    path = save_checkpoint(state, tmp_path / "ckpt.pt")
    before = path.read_bytes()

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full (simulated)")

    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint({**state, "bad": Unpicklable()}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temp file left behind


@pytest.mark.parametrize("content, message", [
    (None, "checkpoint not found"),
    (b"garbage, not a zip", "cannot read checkpoint"),
])
def test_unreadable_files_are_clear_errors(tmp_path, content, message):
    path = tmp_path / "x.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    state, _ = _state()
    path = save_checkpoint(state, tmp_path / "ckpt.pt")
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(path)


def test_foreign_pickles_are_refused(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not an apr checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"format": "apr.checkpoint/1", "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")


def test_wrong_class_count_or_model_is_a_clear_error(tmp_path):
    state, _ = _state()
    state["num_classes"] = 5
    state["classes"] = list("abcde")
    save_checkpoint(state, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match=r"fc.weight has shape \(3, 64\), the model expects \(5, 64\)"):
        load_model_for_eval(tmp_path / "c.pt")
    state, _ = _state()
    state["model_name"] = "wrn16_2"
    save_checkpoint(state, tmp_path / "d.pt")
    with pytest.raises(CheckpointError, match="holds a different model"):
        load_model_for_eval(tmp_path / "d.pt")


def test_rng_state_round_trip():
    state = capture_rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1).item(), np.random.randn())
    restore_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item(), np.random.randn()) == expected


def test_manager_keeps_last_k_and_best(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    state, _ = _state()
    for epoch, metric in [(1, 0.5), (2, 0.3), (3, 0.4)]:
        manager.save({**state, "epoch": epoch}, epoch, 0, metric)
    manager.save({**state, "epoch": 3, "step": 7}, 3, 7)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["best.pt", "checkpoint-e0003-s0000000.pt", "checkpoint-e0003-s0000007.pt"]
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 2
    assert find_latest_checkpoint(tmp_path).name == "checkpoint-e0003-s0000007.pt"
    assert find_latest_checkpoint(tmp_path / "missing") is None


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signals_become_a_flag(sig):
    before = signal.getsignal(sig)
    with PreemptionFlag() as flag:
        assert not flag.is_set
        os.kill(os.getpid(), sig)
        assert flag.is_set and flag.received == sig
    assert signal.getsignal(sig) == before
