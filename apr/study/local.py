"""The local launcher: the steps one after the other on this machine, each a subprocess with its log.

A study lock (fcntl, released by the kernel when the process dies) refuses a second ``run`` of the same
study; a failed step is recorded with its log and the steps that need it are not started, while every
other step still runs, so one failure never costs the results of the rest.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import subprocess
import sys
import time
from typing import Iterator

from apr.errors import UserError
from apr.study.commands import local_argv
from apr.study.plan import Step, log_path, record, state_dir, step_state
from apr.study.spec import Study

__all__ = ["StudyBusy", "study_lock", "run_local"]


class StudyBusy(UserError, RuntimeError):
    """Another ``run`` of the same study holds its lock."""


@contextlib.contextmanager
def study_lock(study: Study) -> Iterator[None]:
    path = state_dir(study) / "lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise StudyBusy(f"study {study.name} ({study.out}) is already being run by {holder}; wait for it "
                            "to finish (apr-study status shows its steps) or stop that process") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()


def _run_step(study: Study, step: Step, python: str, tee: bool = False) -> bool:
    """One step as a subprocess, its output (stdout and stderr) appended to its log file (and shown: ``tee``)."""
    if step.before is not None:
        step.before()
    log = log_path(study, step.id)
    log.parent.mkdir(parents=True, exist_ok=True)
    argv = local_argv(python, step.module, step.args, study.gpus)
    with open(log, "a") as stream:
        stream.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n")
        stream.flush()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE if tee else stream, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, text=tee)
        record(study, step, "running", pid=os.getpid(), step_pid=proc.pid, log=log)  # the runner: it holds the lock
        try:
            for line in proc.stdout if tee else ():
                stream.write(line)
                sys.stdout.write(line)
            rc = proc.wait()
        except BaseException:  # Ctrl-C: the step stops too, and is resumed next time
            proc.terminate()
            proc.wait()
            raise
    ok = rc == 0 and step.is_done()
    if rc == 0 and not ok:
        with open(log, "a") as stream:
            stream.write("error: the command finished but its results are not complete (see above)\n")
    record(study, step, "done" if ok else "failed", rc=rc, log=log)
    return ok


def run_local(study: Study, steps: list[Step], python: str = sys.executable, echo=print, tee: bool = False) -> int:
    """Run every step that is not done, in order; 0 when all are done, 1 when a step failed.
    ``tee`` shows each step's output as it runs, besides its log."""
    failed: set[str] = set()
    with study_lock(study):
        for step in steps:
            blocked = [n for n in step.needs if n in failed]
            if blocked:
                failed.add(step.id)
                echo(f"{step.id}: not run, it needs {', '.join(blocked)}")
                continue
            state = step_state(study, step)
            if state.status == "done":
                echo(f"{step.id}: done")
                continue
            start = time.perf_counter()
            echo(f"{step.id}: running ({log_path(study, step.id)})", flush=True)
            if _run_step(study, step, python, tee):
                echo(f"{step.id}: done in {time.perf_counter() - start:.0f} s")
            else:
                failed.add(step.id)
                echo(f"{step.id}: FAILED, see {log_path(study, step.id)}: {step_state(study, step).detail}")
    return 1 if failed else 0
