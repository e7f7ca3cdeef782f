"""``python -m apr.slurm MODULE [ARGS...]``: one ``srun`` task of slurm/train.sh or slurm/eval.sh.

- Ranks come from slurm (:func:`apr.distributed.adopt_slurm_ranks`): ``srun`` starts one task per GPU
  on every node, with no torchrun agent between slurm and the process, so slurm's signals reach the
  process that has to act on them (a SIGTERM to ``srun`` or to torchrun's agent tears the step down).
- SIGUSR1 (``#SBATCH --signal=USR1@120`` before the time limit, ``scancel --signal=USR1``) and SIGTERM
  (preemption, ``scancel``) stop the task cleanly: training saves where it stands (its own
  :class:`~apr.checkpoint.PreemptionFlag` is active in the loop); any other command stops where it is
  (results files are rewritten after every finished cell, so nothing finished is lost).
- SIGUSR2 (``scancel --signal=USR2 JOBID``) prints every thread's Python stack of every task into the job's
  output and lets it run on: where a job that seems hung is waiting.
- Then rank 0 requeues the job once (``scontrol requeue``): after SIGUSR1, and after the SIGTERM of a
  preemption (slurm requeues a preempted job only if it is still running when GraceTime ends; one that
  saved and exited early would count as COMPLETED). After the SIGTERM of ``scancel`` it does not.
"""

from __future__ import annotations

import faulthandler
import os
import re
import runpy
import signal
import subprocess
import sys

from apr.checkpoint import PreemptionFlag
from apr.distributed import adopt_slurm_ranks

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
RETRY_S = 1.0  # a swallowed Stopped is raised again this often (SIGALRM)
MODULES = ("apr.commands.train", "apr.commands.evaluate", "apr.ood", "apr.adversarial", "apr.report")


class Stopped(BaseException):
    """Raised by a stop signal outside the training loop (a BaseException: ``except Exception`` in the
    commands must not swallow it)."""


_running = False  # a command is running: a stop signal may interrupt it


def _stop(signum, frame):  # noqa: ARG001
    """Raise Stopped now and again every second until it unwinds the command: an exception raised where
    Python ignores them (a fork hook, a finalizer) would otherwise let the command run on."""
    if signum != signal.SIGALRM:
        PreemptionFlag.record(signum)
        signal.setitimer(signal.ITIMER_REAL, RETRY_S, RETRY_S)
    if _running:
        raise Stopped(signal.Signals(PreemptionFlag.last_received).name)


def _set_handlers(handler) -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, handler)


def run_module(module: str, args: list[str]) -> int:
    """``python -m module args``, in this process; 0 when a stop signal ended it."""
    global _running
    sys.argv = [module, *args]
    _set_handlers(_stop)
    signal.signal(signal.SIGALRM, _stop)
    try:
        try:
            _running = True
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        finally:  # done: later signals (the requeue's own SIGTERM) must not interrupt the exit
            _running = False
            signal.setitimer(signal.ITIMER_REAL, 0)
            _set_handlers(signal.SIG_IGN)  # (SIG_IGN, unlike a Python handler, outlives interpreter shutdown)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
    except Stopped:
        code = 0
    except Exception as exc:  # a peer rank that stopped first can break a collective: still a stop
        if PreemptionFlag.last_received is None:
            raise
        print(f"apr.slurm: {type(exc).__name__}: {exc} (while stopping)", file=sys.stderr)
        code = 0
    return code


def _stop_signals() -> str:
    """The signal that stopped this task, and a later one if any: rank 0's requeue sends SIGTERM to peers
    that are still exiting after their SIGUSR1 stop."""
    first, last = (signal.Signals(s).name for s in (PreemptionFlag.first_received, PreemptionFlag.last_received))
    return first if first == last else f"{first} (then {last})"


def _rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def _preempted(job: str) -> bool:
    """slurm set a PreemptTime: this SIGTERM is a preemption's (a scancel's has none)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True).stdout
    when = re.search(r"\bPreemptTime=(\S+)", out)
    return bool(when) and when.group(1) not in ("None", "(null)", "Unknown")


def requeue_if_asked() -> bool:
    """Rank 0 requeues the job, once: after SIGUSR1 (the time-limit warning, or by hand), and after a
    preemption's SIGTERM (a job whose tasks all exit 0 before GraceTime ends counts as COMPLETED and
    slurm would not requeue it). Never after a scancel's SIGTERM."""
    job, sig = os.environ.get("SLURM_JOB_ID"), PreemptionFlag.last_received
    if not job or _rank() != 0 or sig not in STOP_SIGNALS:
        return False
    if sig == signal.SIGTERM and not _preempted(job):
        return False
    why = "stopped by SIGUSR1" if sig == signal.SIGUSR1 else "preempted"
    print(f"apr.slurm: {why} and saved; requeueing job {job}", file=sys.stderr, flush=True)
    done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if done.returncode:
        print(f"apr.slurm: scontrol requeue {job} failed: {done.stderr.strip()} "
              "(submitted with --no-requeue?); resubmit to continue", file=sys.stderr)
    return done.returncode == 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip() + f"\n\nMODULE: one of {', '.join(MODULES)}", file=sys.stderr)
        return 0 if argv else 2
    adopt_slurm_ranks()
    faulthandler.register(signal.SIGUSR2, all_threads=True)  # where a job that seems hung waits
    code = run_module(argv[0], argv[1:])
    if PreemptionFlag.last_received is not None:
        print(f"apr.slurm: rank {_rank()} stopped cleanly after {_stop_signals()}", file=sys.stderr, flush=True)
        requeue_if_asked()
    return code


if __name__ == "__main__":
    sys.exit(main())
