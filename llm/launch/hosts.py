"""What a launcher needs from the other hosts: an interface on their network, passwordless ssh
for the DeepSpeed launcher (pdsh), and the environment that travels with the processes it starts."""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

from llm import handoff
from llm.errors import ConfigError

# what the training processes of a DeepSpeed multi-node job need from the launching shell's
# environment: the project's own (the run folder LLM_RUN_DIR, LLM_LAUNCH_TIMEOUT, ...), the
# collectives' interfaces, W&B's and Hugging Face's modes and caches. Never secrets: pdsh puts every
# export on the command line of ssh, which any user of either host can read (`wandb login` and
# `huggingface-cli login` store keys in files on the shared home instead)
TRAVELS = (handoff.PREFIX, "GLOO_", "NCCL_", "WANDB_", "HF_", "TOKENIZERS_", "OMP_NUM_THREADS")
SECRETS = ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


def interface_towards(addr: str) -> str | None:
    """The name of this host's interface whose address reaches `addr` (the kernel's route), if any."""
    import psutil

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((socket.gethostbyname(addr), 9))  # UDP: nothing is sent, only a route is chosen
            local = s.getsockname()[0]
    except OSError:
        return None
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.address == local for a in addresses):
            return name
    return None


def check_socket_interfaces(master_addr: str) -> None:
    """GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME name interfaces of this host: one that does not exist
    would fail the process group only once every process has started (gloo), or never form it."""
    import psutil

    names = sorted(psutil.net_if_addrs())
    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        value = os.environ.get(var, "")
        if not value or value.startswith("^"):  # NCCL's ^name excludes: nothing to find
            continue
        wanted = value.lstrip("=").split(",")
        if var == "GLOO_SOCKET_IFNAME" or value.startswith("="):  # exact names
            missing = [w for w in wanted if w not in names]
        else:  # NCCL's prefixes: one interface starting with any of them will do
            missing = [] if any(n.startswith(w) for n in names for w in wanted) else wanted
        if missing:
            towards = interface_towards(master_addr)
            hint = f"; MASTER_ADDR={master_addr} is reached through {towards}" if towards else ""
            raise ConfigError(
                f"{var}={value}: no interface {', '.join(missing)} on this host (it has {', '.join(names)}){hint}; "
                f"give the interface on the nodes' network"
            )


def check_ssh(hostfile: str, hosts: list[str]) -> None:
    """Every host answers ssh without a password, with the options pdsh will use."""
    if shutil.which("pdsh") is None:
        raise ConfigError(
            f"HOSTFILE={hostfile}: the DeepSpeed launcher starts the nodes with pdsh, which this host lacks; "
            "install it (apt-get install pdsh), or use make train-multinode on each node"
        )
    options = shlex.split(os.environ.get("PDSH_SSH_ARGS_APPEND", ""))
    for host in hosts:
        command = ["ssh", *options, "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", host, "true"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
        if result.returncode:
            said = (result.stderr.strip().splitlines() or [f"status {result.returncode}"])[-1]
            raise ConfigError(
                f"HOSTFILE={hostfile}: host {host} does not answer ssh without a password ({said}); the DeepSpeed "
                "launcher starts every node over ssh: set up keys (options in ~/.ssh/config or PDSH_SSH_ARGS_APPEND)"
            )


def deepspeed_env_file(environ: dict) -> Path:
    """A DeepSpeed environment file (DS_ENV_FILE): the user's own .deepspeed_env (in ~ and here, as
    the runner reads them), then the variables the training processes need. A private temporary
    file: the runner reads it once, when it starts."""
    lines = []
    for folder in (Path.home(), Path(".")):
        own = folder / environ.get("DS_ENV_FILE", ".deepspeed_env")
        if own.is_file():
            lines += [line for line in own.read_text().splitlines() if "=" in line]
    for name, value in sorted(environ.items()):
        if name.startswith(TRAVELS) and name not in SECRETS and "\n" not in value:
            lines.append(f"{name}={value}")
    fd, path = tempfile.mkstemp(prefix="llm-deepspeed-env-")
    with os.fdopen(fd, "w") as f:
        f.write("".join(f"{line}\n" for line in lines))  # no empty line: the runner reads each as NAME=value
    return Path(path)
