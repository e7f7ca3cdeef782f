"""benchmarks/gpu_check.py runs on a CPU with tiny sizes and writes its table and JSON (so it cannot rot)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def one_thread():
    """One intra-op thread: two threads on a shared, oversubscribed CPU made the tiny ResNet-50 steps 25x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_gpu_check_quick_on_cpu_writes_table_and_json(tmp_path, capsys, one_thread):
    gpu_check = load_gpu_check()
    out = tmp_path / "check"
    assert gpu_check.main(["--device", "cpu", "--quick", "--out", str(out), "--pytest-target", "tests/test_fourier.py"]) == 0
    data = json.loads((out / "gpu_check.json").read_text())
    markdown = (out / "gpu_check.md").read_text()
    assert data["quick"] is True and data["device"] and data["torch"] in markdown
    rows = {(r["section"], r["item"]): r for r in data["rows"]}
    assert not [r for r in data["rows"] if r["item"] == "error"], data["rows"]
    # the CUDA tests of the target were collected and skipped (no GPU), none failed
    counts = rows[("pytest -m cuda", "counts")]["value"]
    assert "skipped" in counts and "failed" not in counts, counts
    for op in ("recombine", "apr_p", "apr_s", "apr_sp unfused (S then P)", "apr_sp fused"):
        value = rows[("APR ops", f"{op} ms/batch")]["value"]
        assert isinstance(value, float) and value > 0, (op, value)
    assert rows[("train step", "none img/s")]["value"] > 0 and rows[("train step", "apr_sp img/s")]["value"] > 0
    assert 0 < rows[("train step", "APR-SP share")]["value"] < 1
    # the GPU-decode backend fed the step from a JPEG folder the command wrote itself
    assert "photos" in rows[("data -> step", "JPEG folder")]["value"]
    for item in ("GPU-decode loader alone img/s", "synthetic step img/s", "GPU decode feeding the step img/s"):
        assert isinstance(rows[("data -> step", item)]["value"], float) and rows[("data -> step", item)]["value"] > 0
    fed, synthetic = (rows[("data -> step", k)]["value"] for k in ("GPU decode feeding the step img/s", "synthetic step img/s"))
    assert rows[("data -> step", "fraction of the synthetic step")]["value"] == pytest.approx(fed / synthetic, rel=1e-6)
    assert rows[("evaluation", "ImageClassifier img/s")]["value"] > 0
    assert rows[("evaluation", "Fourier heat map s")]["value"] > 0
    # every row is in the Markdown table, which is also printed
    assert markdown.count("\n| ") == len(data["rows"]) + 1
    assert all(rows[(s, "section wall time s")]["value"] > 0 for s in ("pytest -m cuda", "APR ops", "train step", "data -> step", "evaluation"))
    assert "| APR ops | apr_sp fused ms/batch |" in capsys.readouterr().out


def test_a_failing_section_is_recorded_and_the_others_run(tmp_path, monkeypatch):
    gpu_check = load_gpu_check()

    def broken(table, args, device):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(gpu_check, "section_apr_ops", broken)
    out = tmp_path / "check"
    gpu_check.main(["--device", "cpu", "--quick", "--out", str(out), "--skip", "pytest", "train", "data", "eval"])
    rows = json.loads((out / "gpu_check.json").read_text())["rows"]
    assert rows[0]["section"] == "APR ops" and rows[0]["item"] == "error" and "simulated failure" in rows[0]["value"]


def test_gpu_check_needs_an_output_folder():
    with pytest.raises(SystemExit):
        load_gpu_check().parse_args(["--quick"])
