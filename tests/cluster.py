"""A real one-host SLURM cluster for the cluster tests (`make cluster-test`), and a recipe to try a
launcher on one machine: Debian's slurm-wlm and munge, run as root, every file of theirs (config,
key, sockets, state, logs) in a folder of the caller's, and only the daemons started here stopped.

    cluster = SlurmCluster(folder); cluster.start()   # munged, slurmctld, slurmd
    subprocess.run(["sbatch", ...], env=cluster.env)  # SLURM_CONF points the commands at it
    cluster.stop()

Without cgroups (a container): processes are tracked by /proc (proctrack/linuxproc) and tasks are
not bound (task/none). One node, named as this host, with this host's cores, in one partition
`cpu` without GPUs. Job ids start at a random number, so that the run folders named after them
(runs/<experiment>-<job id>) never meet those of an earlier cluster."""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel", "squeue")


# the daemons and `ip` live in the system folders, which a user's PATH may lack
for folder in ("/usr/sbin", "/sbin"):
    if folder not in os.environ.get("PATH", "").split(":"):
        os.environ["PATH"] = f"{os.environ.get('PATH', '')}:{folder}"


def missing_tools() -> list[str]:
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class SlurmCluster:
    def __init__(self, folder: Path, partition: str = "cpu"):
        self.folder = folder
        self.partition = partition
        self.node = socket.gethostname().split(".")[0]
        self.conf = folder / "slurm.conf"
        self.munge_socket = folder / "munge.socket"
        self.first_job_id = random.randint(1_000_000, 60_000_000)
        self._daemons: dict[str, int] = {}
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def write_config(self) -> None:
        for name in ("state", "spool", "munge"):
            (self.folder / name).mkdir(parents=True, exist_ok=True)
        key = self.folder / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        f = self.folder
        self.conf.write_text(
            f"""ClusterName=llmtest
SlurmctldHost={self.node}
SlurmUser=root
SlurmdUser=root
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={f / "state"}
SlurmdSpoolDir={f / "spool"}
SlurmctldPidFile={f / "slurmctld.pid"}
SlurmdPidFile={f / "slurmd.pid"}
SlurmctldLogFile={f / "slurmctld.log"}
SlurmdLogFile={f / "slurmd.log"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SwitchType=switch/none
MpiDefault=none
ReturnToService=2
JobRequeue=1
FirstJobId={self.first_job_id}
MinJobAge=3600
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={f / "jobcomp.txt"}
KillWait=30
NodeName={self.node} CPUs={os.cpu_count() or 1} State=UNKNOWN
PartitionName={self.partition} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
"""
        )

    def start(self, timeout: float = 60) -> None:
        self.write_config()
        f = self.folder
        self._daemon(
            "munged",
            [
                "munged",
                "--force",
                f"--socket={self.munge_socket}",
                f"--key-file={f / 'munge' / 'munge.key'}",
                f"--pid-file={f / 'munged.pid'}",
                f"--log-file={f / 'munged.log'}",
                f"--seed-file={f / 'munge' / 'seed'}",
            ],
            f / "munged.pid",
        )
        self._daemon("slurmctld", ["slurmctld", "-f", str(self.conf)], f / "slurmctld.pid")
        self._daemon("slurmd", ["slurmd", "-f", str(self.conf)], f / "slurmd.pid")
        deadline = time.monotonic() + timeout
        while self.node_state() not in ("idle", "mixed", "allocated"):
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"SLURM node {self.node} not up in {timeout:.0f} s: {self.node_state()!r}\n{self.logs()}"
                )
            time.sleep(0.5)

    def _daemon(self, name: str, command: list[str], pid_file: Path, timeout: float = 20) -> None:
        """Start a daemon that forks into the background, and keep its PID from its PID file."""
        subprocess.run(command, env=self.env, check=True, capture_output=True, text=True)
        deadline = time.monotonic() + timeout
        while not (pid_file.exists() and pid_file.read_text().strip()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} wrote no PID file in {timeout:.0f} s\n{self.logs()}")
            time.sleep(0.1)
        self._daemons[name] = int(pid_file.read_text().split()[0])

    def run(self, *command: str, check: bool = True) -> str:
        result = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=60)
        if check and result.returncode:
            raise RuntimeError(f"{' '.join(command)}: status {result.returncode}: {result.stderr.strip()}")
        return result.stdout

    def node_state(self) -> str:
        try:
            return self.run("sinfo", "-h", "-N", "-o", "%t", check=False).strip().rstrip("*~#$@+")
        except subprocess.TimeoutExpired:
            return "no answer"

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job`'s fields (JobState, Restarts, ExitCode, ...), or {} once it is forgotten."""
        text = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait_for(self, job_id: str, states: set[str], timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while (job := self.job(job_id)).get("JobState") not in states:
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} not in {sorted(states)} within {timeout:.0f} s: {job}")
            time.sleep(0.5)
        return job

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}" for p in sorted(self.folder.glob("*.log"))
        )

    def stop(self) -> None:
        """scontrol shutdown stops slurmctld and slurmd; whatever outlives it, and munged, by PID."""
        if "slurmctld" in self._daemons:
            subprocess.run(["scontrol", "shutdown"], env=self.env, capture_output=True, timeout=30)
        for name, pid in reversed(self._daemons.items()):  # munged last: the others use it until they end
            steps = ((None, 15), (signal.SIGTERM, 10), (signal.SIGKILL, 5))
            for signum, wait in steps[name == "munged" :]:  # munged has no shutdown of its own
                if signum is not None and _alive(pid):
                    os.kill(pid, signum)
                deadline = time.monotonic() + wait
                while _alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.1)
        self._daemons.clear()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie of ours counts as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False
