"""apr.gpu_check (apr-gpu-check): a budget with a deadline per section, files rewritten after every
section and on SIGTERM, the CUDA tests' log with FAILED and ERROR names, compile status, the goals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from apr import gpu_check
from apr.gpu_check import Check, Plan, judge_goals, run_plan

ROOT = Path(__file__).resolve().parents[1]
# what the lent GPU machine lacks: the check must run without importing any of them
BLOCK_ABSENT = ("import runpy, sys\n"
                "for name in ('imagecorruptions', 'nvidia.dali', 'autoattack'):\n"
                "    sys.modules[name] = None  # import raises ImportError, as on the GPU box\n"
                "sys.argv[0] = 'apr.gpu_check'\n"
                "runpy.run_module('apr.gpu_check', run_name='__main__', alter_sys=True)\n")


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _wait_for(proc, path: Path, ready, timeout: float) -> dict:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        data = _read_json(path)
        if data and ready(data):
            return data
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else proc.returncode
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"not ready after {timeout} s: {_read_json(path)}")


def test_quick_cpu_run_killed_by_sigterm_returns_every_finished_section(tmp_path):
    """The real command in a subprocess, absent packages blocked, SIGTERM while the CUDA tests run:
    every section before them comes back with its figures, the interrupted one says so, and the
    pytest log so far is there."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-c", BLOCK_ABSENT, "--device", "cpu", "--quick", "--out", str(out),
           "--pytest-target", "tests/test_fourier.py"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    status = lambda data: {s["key"]: s["status"] for s in data["sections"]}  # noqa: E731
    _wait_for(proc, out / "gpu_check.json", lambda d: status(d)["pytest"] == "running", timeout=240)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM, stdout
    data = json.loads((out / "gpu_check.json").read_text())
    assert status(data) == {"env": "done", "ops": "done", "train": "done", "data": "done", "eval": "done",
                            "heatmap": "done", "pytest": "interrupted", "compiled": "not reached"}
    rows = {(r["section"], r["item"]): r["value"] for r in data["rows"]}
    assert rows[("environment", "package imagecorruptions")] == "absent"
    for op in ("recombine", "apr_p", "apr_s", "apr_sp unfused (S then P)", "apr_sp fused"):
        assert isinstance(rows[("APR ops", f"{op} ms/batch")], float) and rows[("APR ops", f"{op} ms/batch")] > 0, op
    assert rows[("train step", "none img/s")] > 0 and rows[("train step", "apr_sp img/s")] > 0
    assert 0 < rows[("train step", "APR-SP share")] < 1
    assert "photos" in rows[("data -> step", "JPEG folder")]
    fed, synthetic = rows[("data -> step", "GPU decode feeding the step img/s")], rows[("data -> step", "synthetic step img/s")]
    assert rows[("data -> step", "fraction of the synthetic step")] == pytest.approx(fed / synthetic, rel=1e-6)
    assert rows[("evaluation", "ImageClassifier img/s")] > 0 and rows[("heat map", "Fourier heat map s")] > 0
    # the Markdown holds the same: goals (n/a on a CPU), every section's state, every row
    markdown = (out / "gpu_check.md").read_text()
    assert "| pytest -m cuda | interrupted |" in markdown and "n/a (not a full-size CUDA run)" in markdown
    assert markdown.count("\n| ") == 3 + len(data["goals"]) + len(data["sections"]) + len(data["rows"])
    assert (out / "gpu_check_pytest.log").exists()
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.md", "gpu_check_pytest.log"]


def _fake_sections(out: Path, seen: dict):
    def fast(check, args, device, until):
        check.add("fast", "figure", 1.0)

    def slow(check, args, device, until):
        seen["on disk when slow started"] = _read_json(out / "gpu_check.json")
        check.add("slow", "first figure", 2.0)
        time.sleep(30)  # stopped by its deadline long before
        check.add("slow", "never", 3.0)

    def broken(check, args, device, until):
        raise RuntimeError("simulated failure")

    return SimpleNamespace(fast=fast, slow=slow, broken=broken, never=fast)


def test_budget_gives_each_section_a_deadline_and_skips_what_no_longer_fits(tmp_path):
    plan = (Plan("fast", "fast", "fast", 5, 5, 0.1), Plan("slow", "slow", "slow", 0.5, 0.5, 0.1),
            Plan("broken", "broken", "broken", 5, 5, 0.1), Plan("never", "never", "never", 5, 5, 60))
    seen = {}
    check = Check(tmp_path, {"device": "cpu", "torch": torch.__version__, "date": "", "quick": True, "budget_s": 5})
    args = SimpleNamespace(budget_s=5, skip=[], quick=True)
    t0 = time.monotonic()
    assert run_plan(check, plan, args, torch.device("cpu"), _fake_sections(tmp_path, seen))
    assert time.monotonic() - t0 < 5
    states = {s["key"]: s for s in json.loads((tmp_path / "gpu_check.json").read_text())["sections"]}
    assert [states[k]["status"] for k in ("fast", "slow", "broken", "never")] == ["done", "stopped", "error", "skipped"]
    assert "deadline of 0 s" in states["slow"]["reason"] or "deadline of 1 s" in states["slow"]["reason"]
    assert "simulated failure" in states["broken"]["reason"] and "budget" in states["never"]["reason"]
    # written after every section: the fast section's row was on disk before the slow one began
    before = seen["on disk when slow started"]
    assert [r["item"] for r in before["rows"]] == ["figure"] and before["sections"][1]["status"] == "running"
    items = [r["item"] for r in check.rows]
    assert items == ["figure", "first figure"]  # what the stopped section finished is kept


def test_section_deadlines_keep_the_minimum_of_later_sections():
    later = [Plan("b", "b", "b", 100, 10, 20), Plan("c", "c", "c", 100, 10, 30)]
    first = Plan("a", "a", "a", 100, 10, 5)
    assert gpu_check.section_deadline(first, later, 480, quick=False) == 100
    assert gpu_check.section_deadline(first, later, 80, quick=False) == 30  # 80 - 20 - 30
    assert gpu_check.section_deadline(first, later, 40, quick=False) == 5  # earlier sections come first
    assert gpu_check.section_deadline(first, later, 4, quick=False) is None


CUDA_TESTS = '''
import pytest

@pytest.fixture
def corrupted():
    import imagecorruptions  # noqa: F401  (absent on the GPU box)

@pytest.mark.cuda
def test_passes():
    pass

@pytest.mark.cuda
def test_fails():
    assert 1 == 2, "the GPU path is wrong"

@pytest.mark.cuda
def test_needs_a_missing_package(corrupted):
    pass

def test_not_cuda():
    pass
'''


def test_pytest_section_keeps_the_log_and_names_failed_and_errored_tests(tmp_path):
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_fake_cuda.py").write_text(textwrap.dedent(CUDA_TESTS))
    (suite / "pytest.ini").write_text("[pytest]\nmarkers =\n    cuda: needs a GPU\n")
    (suite / "conftest.py").write_text("import sys\nsys.modules['imagecorruptions'] = None\n")
    out = tmp_path / "out"
    check = Check(out, {"device": "cpu", "torch": "", "date": "", "quick": True, "budget_s": 60})
    args = SimpleNamespace(tmp=tmp_path, pytest_target=[str(suite)])
    from apr.gpu_check_sections import section_pytest

    section_pytest(check, args, torch.device("cpu"), time.monotonic() + 120)
    check.write()
    rows = [(r["item"], r["value"], r["note"]) for r in check.rows]
    assert rows[0][:2] == ("counts", "1 passed, 1 failed, 1 error, 0 skipped")
    named = {kind: [r for r in rows if r[0] == kind] for kind in ("failed", "error")}
    assert [r[1].split("/")[-1] for r in named["failed"]] == ["test_fake_cuda.py::test_fails"]
    assert "the GPU path is wrong" in named["failed"][0][2]
    errored = named["error"]
    assert [r[1].split("/")[-1] for r in errored] == ["test_fake_cuda.py::test_needs_a_missing_package"]
    assert "imagecorruptions" in errored[0][2] or "ImportError" in errored[0][2]
    log = (out / "gpu_check_pytest.log").read_text()
    assert "the GPU path is wrong" in log and "test_not_cuda" not in log.split("short test summary")[0].split("collected")[1]


def test_a_child_section_is_stopped_at_its_deadline_and_keeps_what_ran(tmp_path):
    """pytest hanging in a CUDA test: stopped (its process group) before the section's deadline, the tests
    that ran are still named from the verbose log."""
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_hang.py").write_text("import time, pytest\n\n@pytest.mark.cuda\ndef test_a_fails():\n    assert 0\n\n"
                                        "@pytest.mark.cuda\ndef test_b_hangs():\n    time.sleep(120)\n")
    (suite / "pytest.ini").write_text("[pytest]\nmarkers =\n    cuda: needs a GPU\n")
    check = Check(tmp_path / "out", {"device": "cpu", "torch": "", "date": "", "quick": True, "budget_s": 60})
    from apr.gpu_check_sections import CHILD_GRACE_S, section_pytest

    t0 = time.monotonic()
    section_pytest(check, SimpleNamespace(tmp=tmp_path, pytest_target=[str(suite)]), torch.device("cpu"),
                   t0 + CHILD_GRACE_S + 6)
    assert time.monotonic() - t0 < CHILD_GRACE_S + 6
    rows = {r["item"]: r for r in check.rows}
    assert "stopped at its deadline" in rows["counts"]["note"] and rows["counts"]["value"].startswith("0 passed, 1 failed")
    assert rows["failed"]["value"].endswith("test_hang.py::test_a_fails")


def test_compile_status_tells_compiled_from_graph_breaks_and_fallbacks():
    from apr.gpu_check_sections import compile_status, reset_compile_counters

    def smooth(x):
        return (x * 2).sin()

    def breaks(x):
        print("host work")  # dynamo cannot trace print: a graph break
        return x + 1

    reset_compile_counters()
    assert compile_status() == "compile: NOT compiled (dynamo captured no graph)"
    torch.compile(smooth, backend="eager")(torch.rand(4))
    assert compile_status().startswith("compile: compiled, 1 graph(s), 0 graph break(s)")
    reset_compile_counters()
    torch.compile(breaks, backend="eager")(torch.rand(4))
    assert "1 graph break(s)" in compile_status()
    assert compile_status(fell_back="inductor failed").startswith("compile: FELL BACK to eager")


def _rows(share: float, img_s: float) -> list:
    return [{"section": "APR ops", "item": "apr_sp fused ms/batch", "value": 0.8},
            {"section": "train step", "item": "APR-SP share", "value": share},
            {"section": "train step", "item": "none img/s", "value": img_s}]


@pytest.mark.parametrize("full_size, share, img_s, verdicts", [
    (True, 0.04, 3600.0, ["pass", "pass", "pass", "not measured"]),
    (True, 0.06, 3000.0, ["pass", "FAIL", "FAIL", "not measured"]),
    (False, 0.04, 3600.0, ["n/a (not a full-size CUDA run)"] * 3 + ["not measured"]),
])
def test_goals_pass_or_fail_only_on_a_full_size_cuda_run(full_size, share, img_s, verdicts):
    assert [g["verdict"] for g in judge_goals(_rows(share, img_s), full_size)] == verdicts


def test_the_script_is_an_alias_and_needs_an_output_folder():
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--quick"], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2 and "--out" in proc.stderr and "apr-gpu-check" in proc.stderr
