"""A one-node SLURM cluster for the tests: munged, slurmctld and slurmd, as root, in a folder of their own.

The folder is made in the system's temporary folder (munged wants every folder above its socket
open to all, which pytest's are not) and removed when the cluster stops. Nothing outside it is touched: the cluster has its own ``slurm.conf`` (``SLURM_CONF``
points the client commands, and through them the jobs, at it), its own munge key and socket, ports
picked free on 127.0.0.1, and two fake GPUs (character devices) so that a GPU request is a real
allocation with ``CUDA_VISIBLE_DEVICES`` set. ``with SlurmCluster() as cluster:`` starts it;
leaving cancels its jobs, waits for them to end, and stops exactly the three daemons it started,
by PID.

Unlike a production cluster, a requeued job may start again after 5 s (``cred_expire=5``; the
default is 120 s), the scheduler looks at pending jobs every second (``sched_interval``, default
60), and a cancelled job is killed 5 s after its SIGTERM (``KillWait``, default 30).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Self

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo")
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def missing() -> str | None:
    """Why a cluster cannot start here, or None."""
    absent = [name for name in (*DAEMONS, *CLIENTS) if shutil.which(name) is None]
    if absent:
        return f"SLURM is not installed (no {', '.join(absent)}): apt-get install slurmctld slurmd slurm-client munge"
    if os.geteuid() != 0:
        return "the test cluster's daemons run as root (SlurmUser=root), and this is not root"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class SlurmCluster:
    """``with SlurmCluster() as cluster:``; ``cluster.env`` holds ``SLURM_CONF``."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="vllm-generator-slurm-"))
        self.folder.chmod(0o711)
        self.node = socket.gethostname()
        self.env = {**os.environ, "SLURM_CONF": str(self.folder / "slurm.conf")}
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    # ------------------------------------------------------------------ start

    def __enter__(self) -> Self:
        try:
            self._configure()
            munge_socket = self.folder / "munge" / "munge.socket"
            self._start("munged", ["munged", "-F", f"--socket={munge_socket}", *self._munge_files()])
            self._wait(lambda: munge_socket.exists(), "munged to make its socket")
            conf = str(self.folder / "slurm.conf")
            self._start("slurmctld", ["slurmctld", "-D", "-f", conf])
            self._wait(lambda: self._ok(["scontrol", "ping"]), "slurmctld to answer")
            self._start("slurmd", ["slurmd", "-D", "-f", conf, "-N", self.node])
            self._wait(lambda: self.run("sinfo", "--noheader", "--format=%t").stdout.strip() == "idle", "the node to be idle")
        except BaseException:
            self.__exit__()
            raise
        return self

    def _munge_files(self) -> list[str]:
        munge = self.folder / "munge"
        return [f"--key-file={munge / 'munge.key'}", f"--pid-file={munge / 'munged.pid'}", f"--seed-file={munge / 'seed'}",
                f"--log-file={self.folder / 'log' / 'munged.log'}"]  # fmt: skip

    def _configure(self) -> None:
        folder = self.folder
        for name in ("state", "spool", "log", "munge"):
            (folder / name).mkdir(exist_ok=True)
        (folder / "munge").chmod(0o711)  # munged refuses a socket folder that others cannot traverse
        key = folder / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        for i in range(2):
            os.mknod(folder / f"gpu{i}", 0o600 | 0o020000, os.makedev(1, 3))  # a character device, as gres wants
        (folder / "gres.conf").write_text(f"Name=gpu File={folder}/gpu[0-1]\n")
        cpus = os.cpu_count() or 1
        (folder / "slurm.conf").write_text(
            "\n".join(
                [
                    "ClusterName=vgtest",
                    f"SlurmctldHost={self.node}(127.0.0.1)",
                    f"SlurmctldPort={_free_port()}",
                    f"SlurmdPort={_free_port()}",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    f"AuthInfo=socket={folder}/munge/munge.socket,cred_expire=5",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_Core",
                    "ReturnToService=2",
                    "JobAcctGatherType=jobacct_gather/none",
                    "AccountingStorageType=accounting_storage/none",
                    "MpiDefault=none",
                    "MailProg=/bin/true",
                    "KillWait=5",
                    "SchedulerParameters=sched_interval=1",  # start a requeued job once it may (default: a pass every 60 s)
                    f"StateSaveLocation={folder}/state",
                    f"SlurmdSpoolDir={folder}/spool",
                    f"SlurmctldPidFile={folder}/slurmctld.pid",
                    f"SlurmdPidFile={folder}/slurmd.pid",
                    f"SlurmctldLogFile={folder}/log/slurmctld.log",
                    f"SlurmdLogFile={folder}/log/slurmd.log",
                    "GresTypes=gpu",
                    f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=4000 Gres=gpu:2 State=UNKNOWN",
                    f"PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES",
                    "",
                ]
            )
        )

    def _start(self, name: str, command: list[str]) -> None:
        out = open(self.folder / "log" / f"{name}.out", "wb")  # noqa: SIM115 - the daemon writes it until it stops
        self._procs[name] = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env)
        out.close()

    def _wait(self, ready: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready():
            dead = [name for name, proc in self._procs.items() if proc.poll() is not None]
            if dead or time.monotonic() > deadline:
                why = f"{dead[0]} exited" if dead else f"no {what} within {START_TIMEOUT_S:g} s"
                raise RuntimeError(f"the test SLURM cluster did not start: {why}; see {self.folder / 'log'}:\n{self._log_tails()}")
            time.sleep(0.2)

    def _log_tails(self) -> str:
        tails = []
        for log in sorted((self.folder / "log").iterdir()):
            lines = log.read_text(errors="replace").splitlines()[-5:]
            tails.append(f"{log.name}:\n" + "\n".join(f"    {line}" for line in lines))
        return "\n".join(tails)

    def _ok(self, command: list[str]) -> bool:
        return subprocess.run(command, env=self.env, capture_output=True, timeout=10, check=False).returncode == 0

    # ------------------------------------------------------------------ use

    def run(self, *command: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        """A SLURM client command against this cluster."""
        return subprocess.run(list(command), env=self.env, capture_output=True, text=True, timeout=30, check=check)

    def states(self) -> dict[str, str]:
        """Every job's state by id (``12_1`` for an array task), finished ones included."""
        out = self.run("squeue", "--noheader", "--array", "--states=all", "--format=%i|%T", check=True).stdout
        return dict(line.split("|", 1) for line in out.splitlines() if "|" in line)

    def wait_for(self, job: str, states: set[str] | None = None, timeout: float = 180) -> str:
        """Wait until ``job`` is in one of ``states`` (default: any finished state); its state."""
        wanted = states or TERMINAL
        deadline = time.monotonic() + timeout
        while True:
            state = self.states().get(job, "")
            if state in wanted:
                return state
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"job {job} is {state or 'unknown'} after {timeout:g} s, not {sorted(wanted)}:\n{self.run('squeue', '--states=all').stdout}"
                )
            time.sleep(0.3)

    def cancel_all(self) -> None:
        """Cancel every job and wait until none runs and the node is idle again (bounded)."""
        self.run("scancel", "--user=root")
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline:
            idle = self.run("sinfo", "--noheader", "--format=%t").stdout.strip() == "idle"
            if idle and all(s in TERMINAL for s in self.states().values()):
                return
            time.sleep(0.3)

    # ------------------------------------------------------------------ stop

    def __exit__(self, *exc_info: object) -> None:
        try:
            if "slurmd" in self._procs and self._procs["slurmd"].poll() is None:
                self.cancel_all()
        finally:
            self._stop_daemons()
            shutil.rmtree(self.folder, ignore_errors=True)

    def _stop_daemons(self) -> None:
        for name in reversed(DAEMONS):  # slurmd, slurmctld, then munged, which both use
            proc = self._procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=STOP_TIMEOUT_S)
