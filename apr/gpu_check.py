"""apr-gpu-check: one command that proves the GPU path within a fixed time budget (docs/gpu.md).

The lent GPU machine gives 15 minutes in all and at most 10 minutes a command, so the check runs
its sections in the order that yields the most per second (environment, eager APR ops, eager
ResNet-50 step, GPU JPEG loader -> step, evaluation, heat map, ``pytest -m cuda``, compiled
variants), gives each its own deadline inside ``--budget-s``, skips a section that no longer fits,
stops one that overruns, and rewrites ``gpu_check.md``, ``gpu_check.json`` and
``gpu_check_pytest.log`` under ``--out`` after every section and on SIGTERM: a killed run still
returns everything it finished. On the GPU machine::

    PYTHONPATH=. python3 -m apr.gpu_check --out $OUT --budget-s 480

and in CI, tiny sizes on a CPU: ``python -m apr.gpu_check --device cpu --quick --out /tmp/gc``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from apr.io import atomic_write_json, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]  # the checkout: tests/ and benchmarks/ live there
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
MD, JSON, LOG = "gpu_check.md", "gpu_check.json", "gpu_check_pytest.log"  # all that comes back ($OUT: <= 8 files)
ABSENT_ON_GPU_BOX = ("imagecorruptions", "nvidia.dali", "autoattack")


class SectionTimeout(BaseException):
    """A section ran past its deadline (BaseException: a section's own ``except Exception`` must not eat it)."""


class Terminated(BaseException):
    """SIGTERM (the device tool's limit, a scheduler): write what is finished, then exit."""


def _on_sigterm(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one final write, not one per repeated signal
    raise Terminated()


def _on_alarm(signum, frame):
    raise SectionTimeout()


@contextlib.contextmanager
def deadline(seconds: float):
    """Raise :class:`SectionTimeout` in the main thread after ``seconds`` (between Python bytecodes)."""
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------------------------------
# the record: rows, section states, goals; written whole after every change of state


@dataclass
class Check:
    out: Path
    header: dict
    rows: list = field(default_factory=list)
    sections: list = field(default_factory=list)  # {key, title, status, seconds, reason}
    pytest_log: Path | None = None  # the live log of the pytest child (outside --out)
    goals: Callable[[list], list] = lambda rows: []

    def add(self, section: str, item: str, value, note: str = "") -> None:
        self.rows.append({"section": section, "item": item, "value": value, "note": str(note).replace("|", "/")})

    def value(self, section: str, item: str):
        return next((r["value"] for r in self.rows if (r["section"], r["item"]) == (section, item)), None)

    def write(self) -> None:
        """gpu_check.json, gpu_check.md and the pytest log, each replaced atomically."""
        goals = self.goals(self.rows)
        atomic_write_json(self.out / JSON, {**self.header, "written": _now(), "sections": self.sections,
                                            "goals": goals, "rows": self.rows}, fsync=False)
        atomic_write_text(self.out / MD, self.markdown(goals), fsync=False)
        if self.pytest_log is not None and self.pytest_log.exists():
            atomic_write_text(self.out / LOG, self.pytest_log.read_text(errors="replace"), fsync=False)

    def markdown(self, goals: list) -> str:
        h = self.header
        lines = [f"# gpu_check: {h['device']}, torch {h['torch']}, {h['date']}{', --quick' if h['quick'] else ''}",
                 "", f"budget {h['budget_s']:.0f} s; written {_now()}", "", "## Goals", "",
                 "| goal | figure | verdict |", "|---|---|---|"]
        lines += [f"| {g['goal']} | {_fmt(g['figure'])} | {g['verdict']} |" for g in goals]
        lines += ["", "## Sections", "", "| section | status | s | note |", "|---|---|---|---|"]
        lines += [f"| {s['title']} | {s['status']} | {_fmt(s['seconds'])} | {s['reason']} |" for s in self.sections]
        lines += ["", "## Figures", "", "| section | item | value | note |", "|---|---|---|---|"]
        lines += [f"| {r['section']} | {r['item']} | {_fmt(r['value'])} | {r['note']} |" for r in self.rows]
        return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else ("" if value is None else str(value))


def _now() -> str:
    return f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M:%S} UTC"


# ---------------------------------------------------------------------------------------
# the goals of issue 21, judged on whatever rows exist so far


def judge_goals(rows: list, full_size: bool) -> list:
    """APR-SP <= 1 ms per 256x3x224x224 and <= 5 % of a ResNet-50 bf16 step; ResNet-50 >= 3,500 img/s;
    loader >= 0.95x synthetic. Only a CUDA run at full size can pass or fail them."""
    get = {(r["section"], r["item"]): r["value"] for r in rows}

    def best(*keys):
        values = [get[k] for k in keys if isinstance(get.get(k), float)]
        return min(values) if values else None

    def most(*keys):
        values = [get[k] for k in keys if isinstance(get.get(k), float)]
        return max(values) if values else None

    goals = [("APR-SP ms per 256x3x224x224 batch <= 1", best(("APR ops", "apr_sp fused ms/batch"),
                                                            ("compiled", "apr_sp fused (compile) ms/batch")), 1.0, "<="),
             ("APR-SP share of a ResNet-50 bf16 step <= 0.05", best(("train step", "APR-SP share"),
                                                                   ("compiled", "APR-SP share compiled")), 0.05, "<="),
             ("ResNet-50 bf16 train step img/s >= 3500", most(("train step", "none img/s"),
                                                              ("compiled", "none compiled img/s")), 3500.0, ">="),
             ("GPU JPEG loader feeding the step / synthetic >= 0.95",
              get.get(("data -> step", "fraction of the synthetic step")), 0.95, ">=")]
    out = []
    for goal, figure, bound, op in goals:
        if not isinstance(figure, float):
            verdict = "not measured"
        elif not full_size:
            verdict = "n/a (not a full-size CUDA run)"
        else:
            verdict = "pass" if (figure <= bound if op == "<=" else figure >= bound) else "FAIL"
        out.append({"goal": goal, "figure": figure, "verdict": verdict})
    return out


# ---------------------------------------------------------------------------------------
# child processes (pytest, the compiled variants): stopped at their deadline, killed on SIGTERM


def run_child(cmd: list, seconds: float, log: Path) -> int | None:
    """Run ``cmd`` (stdout+stderr into ``log``) for at most ``seconds``; None when it was stopped."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            return proc.wait(timeout=max(seconds, 0.1))
        except subprocess.TimeoutExpired:
            return None
        finally:
            _stop_group(proc)


def _stop_group(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# ---------------------------------------------------------------------------------------
# the plan and its runner


@dataclass(frozen=True)
class Plan:
    key: str
    title: str
    run: str  # name of the section function in apr.gpu_check_sections
    cap_s: float  # its own deadline on a full run
    quick_cap_s: float  # on --quick
    min_s: float  # skipped when less than this is left of the budget
    full_only: str = ""  # why --quick skips it


PLAN = (Plan("env", "environment", "section_env", 20, 10, 1),
        Plan("ops", "APR ops", "section_apr_ops", 60, 20, 5),
        Plan("train", "train step", "section_train_step", 90, 30, 10),
        Plan("data", "data -> step", "section_data_step", 120, 30, 10),
        Plan("eval", "evaluation", "section_eval", 40, 20, 5),
        Plan("heatmap", "heat map", "section_heatmap", 40, 20, 5),
        Plan("pytest", "pytest -m cuda", "section_pytest", 180, 60, 20),
        Plan("compiled", "compiled", "section_compiled", 300, 60, 60,
             full_only="--quick: compiling ResNet-50 takes minutes on a CPU"))


def section_deadline(plan: Plan, later: list, left: float, quick: bool) -> float | None:
    """Seconds this section may take (None: skip it). Later sections keep their minimum unless this
    one is needed to run at all: the plan is ordered by what a second buys."""
    if left < plan.min_s:
        return None
    cap = plan.quick_cap_s if quick else plan.cap_s
    reserve = sum(p.min_s for p in later)
    return max(plan.min_s, min(cap, left - reserve, left))


def run_plan(check: Check, plan: tuple, args, device: torch.device, sections) -> bool:
    """Every planned section in order, each within its deadline; False when SIGTERM stopped the run."""
    end = time.monotonic() + args.budget_s
    states = {p.key: {"key": p.key, "title": p.title, "status": "not reached", "seconds": None, "reason": ""}
              for p in plan}
    check.sections[:] = list(states.values())
    wanted = [p for p in plan if p.key not in args.skip and not (args.quick and p.full_only)]
    for p in plan:
        state = states[p.key]
        if p not in wanted:
            state.update(status="skipped", reason="--skip" if p.key in args.skip else p.full_only)
            continue
        seconds = section_deadline(p, wanted[wanted.index(p) + 1:], end - time.monotonic(), args.quick)
        if seconds is None:
            state.update(status="skipped", reason=f"budget: {max(0.0, end - time.monotonic()):.0f} s left, "
                                                  f"needs {p.min_s:.0f} s")
            check.write()
            continue
        if not _run_one(check, p, state, seconds, args, device, sections):
            return False
    return True


def _run_one(check: Check, p: Plan, state: dict, seconds: float, args, device, sections) -> bool:
    state.update(status="running", reason=f"deadline {seconds:.0f} s")
    check.write()
    t0 = time.monotonic()
    try:
        with deadline(seconds):
            getattr(sections, p.run)(check, args, device, t0 + seconds)
        state.update(status="done", reason="")
    except SectionTimeout:
        state.update(status="stopped", reason=f"over its deadline of {seconds:.0f} s; rows before that are kept")
    except Terminated:
        state.update(status="interrupted", reason="SIGTERM")
        return False
    except Exception as exc:  # noqa: BLE001 - one broken section must not cost the others
        last = traceback.format_exc(limit=4).strip().splitlines()
        state.update(status="error", reason=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                                            f" ({last[-3].strip()[:120] if len(last) >= 3 else ''})")
    finally:
        state["seconds"] = time.monotonic() - t0
        _release_memory(device)
    check.write()
    return True


def _release_memory(device: torch.device) -> None:
    """The next section (or the pytest and compile children) gets the GPU memory this one cached."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="apr-gpu-check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for gpu_check.md, .json and the pytest log ($OUT)")
    p.add_argument("--budget-s", type=float, default=480, help="seconds for all sections together (default 480: "
                   "one 10-minute device call with room for start-up)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda (default) or cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes (CPU check that the command still runs)")
    p.add_argument("--batch", type=int, default=256, help="batch size of the full run (default 256)")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before timing")
    p.add_argument("--skip", nargs="*", default=[], choices=[x.key for x in PLAN], help="sections to leave out")
    p.add_argument("--pytest-target", nargs="*", default=["tests"], help="what pytest -m cuda collects (default tests)")
    p.add_argument("--compiled-child", type=Path, help=argparse.SUPPRESS)  # internal: the compiled section's process
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup = min(args.repeats, 3), min(args.warmup, 1)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from apr import gpu_check_sections as sections

    device = torch.device(args.device)
    if args.quick and device.type == "cpu":
        torch.set_num_threads(1)  # on a shared, oversubscribed CPU two threads made tiny ResNet-50 steps 25x slower
    torch.backends.cudnn.benchmark = True  # as training sets it (apr.train._setup_determinism)
    if args.compiled_child is not None:
        return sections.compiled_child(args, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    header = {"device": name, "torch": torch.__version__, "date": _now(), "quick": args.quick,
              "budget_s": args.budget_s, "command": " ".join(sys.argv)}
    full_size = device.type == "cuda" and not args.quick and args.batch == 256
    check = Check(args.out, header, goals=lambda rows: judge_goals(rows, full_size))
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    with tempfile.TemporaryDirectory(prefix="gpu_check.") as tmp:
        args.tmp = Path(tmp)
        try:
            finished = run_plan(check, PLAN, args, device, sections)
        except Terminated:  # between two sections
            finished = False
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        check.write()
    signal.signal(signal.SIGTERM, previous)
    print(check.markdown(check.goals(check.rows)), flush=True)
    return 0 if finished else 128 + signal.SIGTERM


if __name__ == "__main__":  # run as apr.gpu_check, not __main__, so the sections share its classes
    from apr.gpu_check import main as _main

    raise SystemExit(_main())
