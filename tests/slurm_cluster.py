"""A real one-node slurm for the tests: munged, slurmctld and slurmd started in a temporary folder.

Nothing in /etc is used or changed: the cluster has its own slurm.conf (found through SLURM_CONF),
its own MUNGE key and socket, its own free ports, spool and state folders, so several test sessions
on one machine each get their own cluster. Two partitions: ``debug`` (default, preemptable with
PreemptMode=REQUEUE and a GraceTime) and ``urgent`` (higher PriorityTier: its jobs preempt). A
requeued job may start again after ``cred_expire`` + 1 s (slurm's own rule), set short here.

Use the session fixture ``slurm_cluster`` (registered in tests/conftest.py). It is skipped with a
one-line reason where a cluster cannot run (not root, slurm or munge missing); under CI=true it
fails instead, so CI never silently skips the slurm tests.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "srun")
GRACE_TIME = 20  # s between a preemption's SIGTERM and its SIGKILL
REQUEUE_DELAY = 5  # cred_expire: a requeued job waits this + 1 s before it may start again
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE"}


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin")


def why_impossible() -> str | None:
    """The reason this machine cannot run a test cluster, or None."""
    if os.geteuid() != 0:
        return "a test slurm cluster needs root (slurmd runs jobs as their user)"
    missing = [n for n in DAEMONS + CLIENTS if _which(n) is None]
    if missing:
        return f"slurm/munge not installed (missing {', '.join(missing)}): apt-get install slurm-wlm munge"
    return None


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class SlurmCluster:
    """One controller and one compute node on this host, all state under ``root``."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.node = socket.gethostname().split(".")[0]
        self.cpus = os.cpu_count() or 1
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.procs: dict[str, subprocess.Popen] = {}

    # ---------------------------------------------------------------- configuration and daemons
    def _write_config(self) -> None:
        r = self.root
        for d in ("state", "spool", "log", "munge"):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "munge", 0o700)
        ctld_port, slurmd_port = _free_ports(2)
        sock = r / "munge" / "munge.socket"
        self.munge_socket = sock
        self.conf.write_text(f"""\
ClusterName=aprtest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={sock},cred_expire={REQUEUE_DELAY}
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd.pid'}
SlurmctldLogFile={r / 'log' / 'slurmctld.log'}
SlurmdLogFile={r / 'log' / 'slurmd.log'}
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
JobRequeue=1
ReturnToService=2
MinJobAge=3600
KillWait=10
InactiveLimit=0
MessageTimeout=20
MpiDefault=none
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=30 State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime={GRACE_TIME}
PartitionName=urgent Nodes={self.node} MaxTime=30 State=UP PriorityTier=10 PreemptMode=OFF
""")

    def _start_munged(self) -> None:
        m = self.root / "munge"
        key = m / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        self._spawn("munged", "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
                    f"--pid-file={m / 'munged.pid'}", f"--log-file={m / 'munged.log'}", f"--seed-file={m / 'seed'}")
        self.wait_until(self.munge_socket.exists, timeout=30, poll=0.1, what="munged's socket")

    def _spawn(self, name: str, *args: str) -> None:
        """Start a daemon in the foreground (-F/-D), so that this process owns, stops and reaps it."""
        log = open(self.root / "log" / f"{name}.stdout", "ab")
        foreground = "-F" if name == "munged" else "-D"
        self.procs[name] = subprocess.Popen([_which(name), foreground, *args], env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    def start(self, timeout: float = 60) -> "SlurmCluster":
        self._write_config()
        self._start_munged()
        self._spawn("slurmctld", "-i")
        self._spawn("slurmd")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited ({proc.returncode}): {self.log_tail(name)}")
            out = self.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.strip()
            if out and out.split()[0].rstrip("*~#") in ("idle", "mixed", "allocated"):
                return self
            time.sleep(0.5)
        raise RuntimeError(f"slurm did not come up in {timeout} s: {self.log_tail('slurmctld')}"
                           f"{self.log_tail('slurmd')}")

    def log_tail(self, name: str, lines: int = 30) -> str:
        files = [self.root / "log" / f"{name}.log", self.root / "log" / f"{name}.stdout"]
        text = "".join(f.read_text(errors="replace") for f in files if f.exists())
        return "\n".join(text.splitlines()[-lines:])

    def cancel_all(self, timeout: float = 30) -> None:
        """Cancel every job and wait until the queue is empty (a failed test must not hold the CPUs)."""
        self.run("scancel", "--full", "-u", "root", check=False)
        deadline = time.monotonic() + timeout
        while self.squeue() and time.monotonic() < deadline:
            time.sleep(0.5)

    def stop(self) -> None:
        """Cancel every job, then stop slurmd, slurmctld and munged (in that order)."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.cancel_all()
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    # ---------------------------------------------------------------- client helpers
    def run(self, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        """A slurm client command against this cluster (text output)."""
        kw.setdefault("env", self.env)
        done = subprocess.run(list(cmd), capture_output=True, text=True, timeout=60, **kw)
        if check and done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr.strip()}")
        return done

    def submit(self, script: str | Path | None, *args: str, sbatch: list[str] = (), env: dict | None = None,
               cwd: str | Path | None = None) -> int:
        """``sbatch [sbatch] script args...`` (script None: e.g. ``sbatch=["--wrap=..."]``): the job id."""
        run_env = {**self.env, **(env or {})}
        script_args = [str(script), *args] if script is not None else list(args)
        out = self.run("sbatch", "--parsable", *sbatch, *script_args, env=run_env, cwd=cwd).stdout
        return int(out.strip().split(";")[0])

    def job(self, job_id: int | str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, RestartCnt, ExitCode, Reason ...); {} once forgotten."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id), check=False).stdout
        info = {}
        for line in out.splitlines()[:1]:
            for key, value in re.findall(r"(\w+(?::\w+)?)=(\S*)", line):
                info.setdefault(key, value)
        return info

    def array_jobs(self, array_job_id: int | str) -> list[dict[str, str]]:
        """Every task of a job array, as ``job`` dicts."""
        out = self.run("scontrol", "show", "job", "-o", str(array_job_id), check=False).stdout
        return [dict(re.findall(r"(\w+(?::\w+)?)=(\S*)", line)) for line in out.splitlines() if line.strip()]

    def state(self, job_id: int | str) -> str:
        return self.job(job_id).get("JobState", "UNKNOWN")

    def squeue(self, *args: str) -> list[str]:
        """Job ids (with array suffixes) still queued or running, ``squeue`` filters in ``args``."""
        out = self.run("squeue", "-h", "-o", "%i", *args, check=False).stdout
        return out.split()

    def wait_state(self, job_id: int | str, states, timeout: float = 120, poll: float = 0.5) -> dict:
        """Wait until the job is in one of ``states`` (a name or a set); its ``job`` dict."""
        states = {states} if isinstance(states, str) else set(states)
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} not in {sorted(states)} after {timeout} s: {info}\n"
                                   f"{self.log_tail('slurmctld', 15)}")
            time.sleep(poll)

    def wait_done(self, job_id: int | str, timeout: float = 300, log: Path | None = None) -> dict:
        """Wait for the job's end; past ``timeout`` its tasks print their Python stacks (apr.slurm's SIGUSR2)
        into ``log``, whose tail the error then shows: a hang says where it waits."""
        try:
            return self.wait_state(job_id, FINAL_STATES, timeout)
        except TimeoutError as exc:
            if log is None:
                raise
            self.run("scancel", "--signal=USR2", str(job_id), check=False)
            time.sleep(3)
            tail = "\n".join(Path(log).read_text(errors="replace").splitlines()[-150:]) if Path(log).exists() else ""
            raise TimeoutError(f"{exc}\n--- {log}, after SIGUSR2 (every task's stacks):\n{tail}") from None

    def wait_until(self, predicate, timeout: float = 120, poll: float = 0.5, what: str = "condition"):
        """Poll ``predicate()`` until it returns a true value (returned)."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} not reached after {timeout} s")
            time.sleep(poll)

    def pids(self, job_id: int | str, step: str = "0") -> list[int]:
        """The processes of one step of a running job (``scontrol listpids``; step "batch" for the script)."""
        out = self.run("scontrol", "listpids", str(job_id), check=False).stdout.splitlines()[1:]
        return [int(f[0]) for f in (line.split() for line in out) if len(f) >= 3 and f[2] == step]

    def cancel(self, job_id: int | str, *args: str) -> None:
        self.run("scancel", *args, str(job_id))

    def requeue_now(self, job_id: int | str) -> None:
        """Let a requeued (pending) job start at once rather than after its BeginTime."""
        self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now", check=False)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A running one-node slurm cluster (SlurmCluster); stopped at the end of the session."""
    reason = why_impossible()
    if reason:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI must run the slurm tests: {reason}")
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
