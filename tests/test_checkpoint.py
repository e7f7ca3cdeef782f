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
    checkpoint_position,
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


class _FakeCuda:
    """torch.cuda as one process of a multi-GPU job sees it: ``visible`` GPUs, ``current`` its own."""

    def __init__(self, visible: int, current: int):
        self.visible, self.current, self.states = visible, current, {}

    def install(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: self.visible)
        monkeypatch.setattr(torch.cuda, "get_rng_state", self.get)
        monkeypatch.setattr(torch.cuda, "set_rng_state", self.set)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [self.get(i) for i in range(self.visible)])
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: [self.set(s, i) for i, s in enumerate(states)])

    def _index(self, device):
        index = self.current if device in (None, "cuda") else int(device)
        if not 0 <= index < self.visible:
            raise RuntimeError(f"CUDA error: invalid device ordinal {index}")
        return index

    def get(self, device="cuda"):
        index = self._index(device)
        return self.states.get(index, torch.tensor([index], dtype=torch.uint8))

    def set(self, state, device="cuda"):
        self.states[self._index(device)] = state


def test_cuda_rng_state_is_this_process_gpu_only(monkeypatch):
    """Saved by local rank 3 seeing 8 GPUs, resumed by a process that sees only its own GPU (cuda:0)."""
    saver = _FakeCuda(visible=8, current=3)
    saver.install(monkeypatch)
    state = capture_rng_state()
    resumer = _FakeCuda(visible=1, current=0)
    resumer.install(monkeypatch)
    restore_rng_state(state)
    assert resumer.states[0].tolist() == [3]  # rank 3's own generator, now on the only visible GPU


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


def test_saved_best_metric_includes_the_save_itself(tmp_path):
    """A run resumed from a file must know that file's own val error: otherwise a later, worse epoch
    overwrites best.pt."""
    manager = CheckpointManager(tmp_path, keep_last=5)
    state, _ = _state()
    manager.save({**state, "best_metric": manager.best_metric}, 1, 0, 0.3)
    assert load_checkpoint(tmp_path / "checkpoint-e0001-s0000000.pt")["best_metric"] == 0.3
    assert load_checkpoint(tmp_path / "best.pt")["best_metric"] == 0.3
    resumed = CheckpointManager(tmp_path, keep_last=5)
    resumed.best_metric = load_checkpoint(tmp_path / "checkpoint-e0001-s0000000.pt")["best_metric"]
    resumed.save({**state, "epoch": 2}, 2, 0, 0.4)  # worse: best.pt stays epoch 1's
    assert load_checkpoint(tmp_path / "best.pt")["best_metric"] == 0.3
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 1
    assert load_checkpoint(tmp_path / "checkpoint-e0002-s0000000.pt")["best_metric"] == 0.3


def test_checkpoint_position_reads_the_file_name():
    assert checkpoint_position("runs/x/checkpoint-e0012-s0000345.pt") == (12, 345)
    assert checkpoint_position("runs/x/best.pt") is None


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signals_become_a_flag(sig):
    before = signal.getsignal(sig)
    with PreemptionFlag() as flag:
        assert not flag.is_set
        os.kill(os.getpid(), sig)
        assert flag.is_set and flag.received == sig
    assert signal.getsignal(sig) == before


def test_manager_never_saves_non_finite_weights_and_says_which_checkpoint_is_good(tmp_path):
    from apr.checkpoint import TrainingDiverged

    manager = CheckpointManager(tmp_path, keep_last=1)
    bad, _ = _state()
    bad["model"] = {k: torch.full_like(v, float("inf")) if v.is_floating_point() else v
                    for k, v in bad["model"].items()}
    with pytest.raises(TrainingDiverged, match=f"not saved; no checkpoint was saved in {tmp_path} before it"):
        manager.save(bad, 0, 1)
    assert list(tmp_path.iterdir()) == []
    good = manager.save(_state()[0], 0, 2)
    with pytest.raises(TrainingDiverged, match=f"the last good checkpoint is {good}"):
        manager.save(bad, 0, 3, metric=0.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == [good.name]  # keep_last=1 did not prune it


def test_weights_are_finite_looks_at_every_float_tensor():
    from apr.checkpoint import weights_are_finite

    assert weights_are_finite({"w": torch.ones(3), "n": torch.tensor([2**62])})
    assert not weights_are_finite({"w": torch.ones(3), "bn.running_var": torch.tensor([1.0, float("nan")])})
    assert not weights_are_finite({"w": torch.tensor([-float("inf")], dtype=torch.bfloat16)})


def test_resolve_resume_auto_skips_unreadable_newest_files(tmp_path, capsys):
    from apr.checkpoint import resolve_resume

    manager = CheckpointManager(tmp_path, keep_last=5)
    good = manager.save(_state()[0], 0, 1)
    manager.path_for(0, 2).write_bytes(b"PK\x03\x04 torn")
    manager.path_for(0, 3).write_bytes(b"")
    assert resolve_resume("auto", tmp_path) == good
    assert sorted(p.name for p in tmp_path.glob("*.corrupt")) == [
        "checkpoint-e0000-s0000002.pt.corrupt", "checkpoint-e0000-s0000003.pt.corrupt"]
    assert capsys.readouterr().err.count("falling back to the previous checkpoint") == 2
    assert resolve_resume(None, tmp_path / "empty") is None


def test_clean_stale_temp_files_removes_only_our_temporaries(tmp_path):
    from apr.checkpoint import clean_stale_temp_files

    ours = [tmp_path / ".checkpoint-e0001-s0000002.pt.ab12.tmp", tmp_path / ".best.pt.zz.tmp"]
    theirs = [tmp_path / ".notes.txt.tmp", tmp_path / "checkpoint-e0001-s0000001.pt", tmp_path / "metrics.csv"]
    for path in ours + theirs:
        path.write_text("x")
    assert sorted(clean_stale_temp_files(tmp_path)) == sorted(ours)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in theirs)


@pytest.mark.cuda
def test_cuda_rng_state_round_trips_through_a_saved_checkpoint(tmp_path):
    """The real CUDA generator: saved in a checkpoint file, restored after other draws, the same numbers."""
    torch.cuda.init()
    torch.rand(1, device="cuda")  # the generator exists and has moved
    save_checkpoint({"rng": capture_rng_state()}, tmp_path / "rng.pt")
    first = torch.rand(1000, device="cuda")
    dropout = torch.nn.functional.dropout(torch.ones(1000, device="cuda"), 0.5)
    torch.rand(12345, device="cuda")
    assert not torch.equal(torch.rand(1000, device="cuda"), first)  # without the restore: other numbers
    restore_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert torch.equal(torch.rand(1000, device="cuda"), first)
    assert torch.equal(torch.nn.functional.dropout(torch.ones(1000, device="cuda"), 0.5), dropout)
