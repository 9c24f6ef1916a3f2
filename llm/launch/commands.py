"""Starting one job on many nodes through the launchers people already have.

    make train-multinode   torchrun, run once on every node            (python -m llm torchrun)
    make train-deepspeed   the DeepSpeed launcher over a hostfile       (python -m llm deepspeed)
    make slurm             sbatch scripts/slurm/train.sbatch            (python -m llm slurm)

Each one checks the world it will form and prints it, refuses an impossible one with one line
before anything starts, then hands over to its launcher, which starts `python -m llm fit` in
every process. From there Lightning reads the ranks from the launcher's environment, and the
processes agree on the run folder and the inputs through rank 0 (llm/launch/agreement.py), which serves a small
store on MASTER_PORT + 1: both ports must be open between the nodes.

Options of the launcher come first; the training options (those of `make train`) follow `--`.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

from llm import handoff
from llm.errors import ConfigError, one_line
from llm.launch.agreement import DEFAULT_TIMEOUT
from llm.launch.hosts import check_socket_interfaces, check_ssh, deepspeed_env_file
from llm.paths import slurm_script

LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1"}


# --- checks shared by the launchers ---------------------------------------------------------------


def continue_command(run: str | Path, teacher: str | None = None, max_steps: int | None = None) -> str:
    """The command that continues the run in folder `run`: make over the run's own config.yaml, the
    resolved config it was started with (its model, data, strategy, processes, teacher and every
    ARGS= override), so that nothing given at the start has to be typed again; make distill for a
    distillation (`teacher`)."""
    run = Path(run)
    words = ["make", "distill" if teacher else "train", f"RUN={shlex.quote(str(run))}"]
    words.append(f"CONFIG={shlex.quote(str(run / 'config.yaml'))}")
    if teacher:
        words.append(f"TEACHER={shlex.quote(teacher)}")
    if max_steps:
        words.append(f"MAX_STEPS={max_steps}")
    return " ".join([*words, "RESUME=auto"])


def split_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the launcher's options, the training options after `--`)."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, []


def check_count(name: str, value: int, field: str) -> int:
    if value < 1:
        raise ConfigError(f"{field}={value}: {name} must be at least 1")
    return value


def parse_nnodes(value: str) -> tuple[int, int]:
    """NNODES=N, or MIN:MAX for an elastic job: (fewest, most) nodes."""
    parts = value.split(":")
    if len(parts) > 2 or not all(re.fullmatch(r"-?\d+", p) for p in parts):
        raise ConfigError(f"NNODES={value}: give a number of nodes, or MIN:MAX for an elastic job, e.g. 1:4")
    low, high = int(parts[0]), int(parts[-1])
    check_count("nodes", low, "NNODES")
    if high < low:
        raise ConfigError(f"NNODES={value}: the most nodes is below the fewest; give MIN:MAX, e.g. {low}:{low + 1}")
    return low, high


def available_devices(on_gpu: bool) -> tuple[int, str]:
    """How many processes this machine can run one device each for: GPUs, or CPU cores."""
    if on_gpu:
        import torch

        return torch.cuda.device_count(), "GPUs"
    return os.cpu_count() or 1, "CPU cores"


def check_devices(devices: int) -> int:
    check_count("processes per node", devices, "DEVICES")
    available, kind = available_devices(on_gpu=_has_gpu())
    if devices > available:
        raise ConfigError(f"DEVICES={devices}: this machine has {available} {kind}; use 1 to {available}")
    return devices


def check_port(port: int) -> int:
    if not 1024 <= port <= 65534:
        raise ConfigError(
            f"MASTER_PORT={port}: not a usable port; give one from 1024 to 65534 (MASTER_PORT+1 is used too)"
        )
    return port


def check_ports_free(port: int) -> None:
    """On the node that will host rank 0: the process group's port and the agreement's are free."""
    for p in (port, port + 1):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            # as torch's store binds: connections of a run that just ended (TIME_WAIT) do not count
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("", p))
            except OSError as exc:
                raise ConfigError(
                    f"MASTER_PORT={port}: port {p} is already in use on this host ({exc.strerror}); "
                    f"choose another MASTER_PORT (it and the next port must be free)"
                ) from exc


def check_host(addr: str) -> None:
    try:
        socket.getaddrinfo(addr, None)
    except socket.gaierror as exc:
        raise ConfigError(f"MASTER_ADDR={addr}: unknown host ({exc.strerror}); give node 0's address or name") from exc


def wait_for_master(addr: str, port: int, timeout: float) -> None:
    """On the other nodes: node 0's launcher answers on MASTER_PORT before this node starts."""
    check_host(addr)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((addr, port), timeout=min(5.0, max(timeout, 0.1))):
                return
        except OSError:
            if time.monotonic() >= deadline:
                raise ConfigError(
                    f"MASTER_ADDR={addr}: no answer on port {port} within {timeout:.0f} s; start node 0 first, and "
                    f"check the address and that ports {port} and {port + 1} are open (LAUNCH_TIMEOUT= to wait longer)"
                ) from None
            time.sleep(0.5)


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def training_command(fit_args: list[str], devices: int, nnodes: int | None) -> tuple[list[str], dict]:
    """The training options for every process, and the environment that carries the rest. The run
    folder travels in the environment: torchrun's own parser would take `--run` for its `--run-path`.
    `nnodes` None: each process reads the nodes of its round from torchrun's environment (elastic)."""
    env = {}
    args, rest = [], list(fit_args)
    while rest:
        arg = rest.pop(0)
        if arg == "--run" and rest:
            env[handoff.RUN_DIR] = rest.pop(0)
        elif arg.startswith("--run="):
            env[handoff.RUN_DIR] = arg.split("=", 1)[1]
        else:
            args.append(arg)
    nodes = [f"--trainer.num_nodes={nnodes}"] if nnodes else []
    return ["fit", *args, f"--trainer.devices={devices}", *nodes], env


def hand_over(command: list[str], env: dict, timeout: float) -> None:
    """Replace this process by the launcher (its exit status becomes the make target's)."""
    sys.stdout.flush()
    os.execvpe(command[0], command, {**os.environ, **env, handoff.LAUNCH_TIMEOUT: str(timeout)})


def _parser(prog: str) -> argparse.ArgumentParser:
    class Parser(argparse.ArgumentParser):
        def error(self, message):  # one line, as every command of the project answers
            sys.stderr.write(f"error: {one_line(message)}\n")
            sys.exit(2)

    parser = Parser(prog=f"python -m llm {prog}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds to wait for node 0")
    return parser


# --- torchrun -------------------------------------------------------------------------------------


def torchrun_main() -> None:
    """`make train-multinode`: torchrun on this node, one of NNODES."""
    own, fit_args = split_args(sys.argv[2:])
    parser = _parser("torchrun")
    parser.add_argument("--nnodes", default="1")
    parser.add_argument("--max_restarts", type=int, default=3)
    parser.add_argument("--node_rank", type=int, default=0)
    parser.add_argument("--master_addr", default="127.0.0.1")
    parser.add_argument("--master_port", type=int, default=29500)
    parser.add_argument("--devices", type=int, default=1)
    a = parser.parse_args(own)
    low, high = parse_nnodes(a.nnodes)
    if low != high:
        return elastic_torchrun(a, low, high, fit_args)
    nnodes = low
    if not 0 <= a.node_rank < nnodes:
        raise ConfigError(
            f"NODE_RANK={a.node_rank}: must be below NNODES={nnodes} (node ranks run from 0 to {nnodes - 1})"
        )
    devices, port = check_devices(a.devices), check_port(a.master_port)
    print(
        f"torchrun: {nnodes} nodes x {devices} processes = {nnodes * devices} processes; "
        f"master {a.master_addr}:{port} (and {port + 1}); this is node {a.node_rank}",
        flush=True,
    )
    check_socket_interfaces(a.master_addr)
    if a.node_rank == 0:
        check_host(a.master_addr)
        check_ports_free(port)
    else:
        wait_for_master(a.master_addr, port, a.timeout)
    args, env = training_command(fit_args, devices, nnodes)
    command = [f"--nnodes={nnodes}", f"--node_rank={a.node_rank}", f"--nproc_per_node={devices}"]
    command += [f"--master_addr={a.master_addr}", f"--master_port={port}", "-m", "llm", *args]
    run_torchrun(command, env, a.timeout)


def elastic_torchrun(a, low: int, high: int, fit_args: list[str]) -> None:
    """NNODES=MIN:MAX: torchrun's c10d rendezvous at MASTER_ADDR:MASTER_PORT, which the nodes join
    and leave; when one fails the others stop their processes, meet again (after waiting
    last_call_timeout, 30 s, for more) and restart, each process continuing from the run's newest
    checkpoint with the nodes it now has (the accumulation derived again from tokens_per_step)."""
    devices, port = check_devices(a.devices), check_port(a.master_port)
    if a.max_restarts < 0:
        raise ConfigError(f"MAX_RESTARTS={a.max_restarts}: must be 0 or more")
    args, env = training_command(fit_args, devices, None)
    run = env.get(handoff.RUN_DIR)
    if not run:
        raise ConfigError(
            f"NNODES={a.nnodes}: an elastic job restarts into the same run folder on every node; give RUN=runs/<name>"
        )
    resume = [arg.split("=", 1)[1] for arg in args if arg.startswith("--resume=")]
    if resume and resume[-1] != "auto":
        raise ConfigError(
            f"RESUME={resume[-1]}: an elastic job continues from its newest checkpoint after each restart; "
            "leave RESUME empty or auto"
        )
    check_host(a.master_addr)
    check_socket_interfaces(a.master_addr)
    print(
        f"torchrun: elastic, {low} to {high} nodes x {devices} processes; rendezvous {a.master_addr}:{port}; "
        f"up to {a.max_restarts} restarts, each from the newest checkpoint in {run}",
        flush=True,
    )
    job = "llm-" + hashlib.sha1(run.encode()).hexdigest()[:12]  # the same on every node: the same RUN=
    command = [f"--nnodes={low}:{high}", f"--nproc_per_node={devices}", f"--max-restarts={a.max_restarts}"]
    command += ["--rdzv-backend=c10d", f"--rdzv-endpoint={a.master_addr}:{port}", f"--rdzv-id={job}"]
    command += [f"--rdzv-conf=join_timeout={max(int(a.timeout), 1)}", "-m", "llm", *args]
    run_torchrun(command + ([] if resume else ["--resume=auto"]), env, a.timeout)


class _DropRefusals(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "(exitcode: 2)" not in record.getMessage()


def run_torchrun(args: list[str], env: dict, timeout: float) -> None:
    """torchrun in this process, so that a refusal stays one line: processes that exit with status 2
    have said why on stderr themselves, and torchrun's report of their failure (a traceback and a
    table) would bury it. Any other failure gets torchrun's report as usual."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    os.environ.update({**env, handoff.LAUNCH_TIMEOUT: str(timeout)})
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_DropRefusals())
    try:
        run(parse_args(args))
    except ChildFailedError as exc:
        if {failure.exitcode for failure in exc.failures.values()} == {2}:
            sys.exit(2)
        raise


# --- the DeepSpeed launcher -----------------------------------------------------------------------


def read_hostfile(path: str) -> dict[str, int]:
    """{host: slots} of a DeepSpeed hostfile (`host slots=N` lines; # starts a comment)."""
    hint = 'a file of "host slots=N" lines, one per node'
    if not path:
        raise ConfigError(f"HOSTFILE=: give {hint}")
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"HOSTFILE={path}: no such file; give {hint}")
    hosts: dict[str, int] = {}
    for number, raw in enumerate(file.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"(\S+)\s+slots=(\d+)", line)
        if not match or int(match.group(2)) < 1:
            raise ConfigError(f'HOSTFILE={path}: line {number} {raw.strip()!r} is not "host slots=N" with N >= 1')
        host = match.group(1)
        if host in hosts:
            raise ConfigError(f"HOSTFILE={path}: host {host} is listed twice (line {number}); list each node once")
        hosts[host] = int(match.group(2))
    if not hosts:
        raise ConfigError(f"HOSTFILE={path}: names no host; give {hint}")
    if len(set(hosts.values())) > 1:
        slots = ", ".join(f"{h}={n}" for h, n in hosts.items())
        raise ConfigError(f"HOSTFILE={path}: slots differ ({slots}); every node must run the same number of processes")
    return hosts


def deepspeed_main() -> None:
    """`make train-deepspeed`: the DeepSpeed launcher over a hostfile, started on the first host."""
    own, fit_args = split_args(sys.argv[2:])
    parser = _parser("deepspeed")
    parser.add_argument("--hostfile", default="")
    parser.add_argument("--master_port", type=int, default=29500)
    a = parser.parse_args(own)
    hosts = read_hostfile(a.hostfile)
    port = check_port(a.master_port)
    first = next(iter(hosts))
    devices, nnodes = next(iter(hosts.values())), len(hosts)
    master = "127.0.0.1" if first in LOCAL_HOSTS else first
    if nnodes == 1 and first in LOCAL_HOSTS:
        check_devices(devices)
    print(
        f"deepspeed: {nnodes} nodes x {devices} processes = {nnodes * devices} processes "
        f"({', '.join(hosts)}); master {master}:{port} (and {port + 1})",
        flush=True,
    )
    check_socket_interfaces(master)
    if first in LOCAL_HOSTS or first == socket.gethostname():
        check_ports_free(port)
    args, env = training_command(fit_args, devices, nnodes)
    command = [sys.executable, "-m", "deepspeed.launcher.runner", f"--hostfile={a.hostfile}"]
    command += [f"--master_addr={master}", f"--master_port={port}", "--no_local_rank", "--module"]
    command.append("--log_level=warning")  # its INFO lines repeat the whole command once per process
    # the runner's own check tries only the first host, with ssh's defaults; pdsh starts every node
    # with PDSH_SSH_ARGS_APPEND's options as well, and so does check_ssh, on each host
    command.append("--no_ssh_check")
    if nnodes > 1:
        check_ssh(a.hostfile, list(hosts))
        # pdsh's processes start from a login shell's environment: what the run needs goes with them
        env["DS_ENV_FILE"] = str(deepspeed_env_file({**os.environ, **env, handoff.LAUNCH_TIMEOUT: str(a.timeout)}))
    hand_over([*command, "llm", *args], env, a.timeout)


# --- SLURM ----------------------------------------------------------------------------------------


def partition_has_gpus(partition: str) -> bool | None:
    """Whether SLURM's partition (empty: the default one) offers GPUs (a gres of `gpu`), from sinfo;
    None when sinfo cannot say."""
    try:
        result = subprocess.run(["sinfo", "-h", "-o", "%P %G"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode:
        return None
    rows = [line.split(None, 1) for line in result.stdout.splitlines() if line.strip()]
    chosen = [gres for name, *gres in rows if (name.rstrip("*") == partition if partition else name.endswith("*"))]
    if not chosen:
        return None
    return any("gpu" in gres for row in chosen for gres in row)


def slurm_main() -> None:
    """`make slurm`: submit scripts/slurm/train.sbatch, one task per device on NNODES nodes."""
    own, fit_args = split_args(sys.argv[2:])
    parser = _parser("slurm")
    parser.add_argument("--nnodes", type=int, default=1)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--partition", default="")
    parser.add_argument("--time", default="")
    parser.add_argument("--account", default="")
    parser.add_argument("--signal_lead", type=int, default=None, help="seconds before the time limit for SIGUSR1")
    a = parser.parse_args(own)
    nnodes, devices = check_count("nodes", a.nnodes, "NNODES"), check_count("processes per node", a.devices, "DEVICES")
    if a.signal_lead is not None and a.signal_lead < 1:
        raise ConfigError(
            f"SIGNAL_LEAD={a.signal_lead}: give the seconds before the time limit at which SLURM asks the job "
            "to save and requeue, e.g. 120 (more than the longest save: summary.json's save_seconds_max)"
        )
    command = ["sbatch", f"--nodes={nnodes}", f"--ntasks-per-node={devices}"]
    gpus = partition_has_gpus(a.partition)
    where = f"partition {a.partition}" if a.partition else "the default partition"
    if gpus is False:
        print(f"slurm: {where} has no GPUs (sinfo): one CPU process per task, no GPU request", flush=True)
    else:  # a partition with GPUs, or sinfo could not tell: the usual case of a training cluster
        command.append(f"--gpus-per-node={devices}")
    if a.signal_lead is not None:
        command.append(f"--signal=USR1@{a.signal_lead}")
    for option, value in (("partition", a.partition), ("time", a.time), ("account", a.account)):
        if value:
            command.append(f"--{option}={value}")
    Path("runs").mkdir(exist_ok=True)  # the job's log goes to runs/slurm-<job id>.out
    args, env = training_command(fit_args, devices, nnodes)
    print(f"slurm: {nnodes} nodes x {devices} processes = {nnodes * devices} processes", flush=True)
    command = [*command, str(slurm_script()), *args[1:]]
    print(" ".join(shlex.quote(c) for c in command), flush=True)
    hand_over(command, env, a.timeout)
