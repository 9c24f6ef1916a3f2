"""Two hosts on one machine for the cluster tests (`make cluster-test`): each a network namespace
with its own address on a bridge this module creates, as root with iproute2. Traffic stays on the
interfaces made here; nothing else on the network is a target. The filesystem is shared, as a
cluster's is. A recipe to try a multi-node launcher on one machine:

    hosts = Hosts(); hosts.create()
    hosts.popen(0, ["make", "train-multinode", "NNODES=2", "NODE_RANK=0", f"MASTER_ADDR={hosts.address(0)}", ...])
    hosts.popen(1, [... "NODE_RANK=1" ...])
    hosts.destroy()

Inside each namespace the interface is named IFNAME on both hosts, so one GLOO_SOCKET_IFNAME= (or
NCCL_SOCKET_IFNAME=) serves both, as on a cluster whose nodes name their interfaces alike. An ssh
server on each (start_ssh) lets the DeepSpeed launcher reach them through pdsh. Everything started in
a namespace ends with it (destroy)."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import signal
import subprocess
from pathlib import Path

IFNAME = "llm0"
TOOLS = ("ip", "pdsh", "ssh", "ssh-keygen", "sshd")


# the daemons and `ip` live in the system folders, which a user's PATH may lack
for folder in ("/usr/sbin", "/sbin"):
    if folder not in os.environ.get("PATH", "").split(":"):
        os.environ["PATH"] = f"{os.environ.get('PATH', '')}:{folder}"


def missing_tools() -> list[str]:
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def free_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.213.0.0/16 that no route of this machine touches."""
    routes = ip("-4", "route", "show", "table", "all").stdout
    taken = [ipaddress.ip_network(w, strict=False) for w in routes.split() if "/" in w and w[0].isdigit()]
    for third in range(7, 250):
        subnet = ipaddress.ip_network(f"10.213.{third}.0/24")
        if not any(subnet.overlaps(t) for t in taken):
            return subnet
    raise RuntimeError("no free /24 in 10.213.0.0/16")


class Hosts:
    def __init__(self, count: int = 2):
        tag = f"{os.getpid() % 100000}"
        self.names = [f"llm{tag}h{i}" for i in range(count)]
        self.bridge = f"llm{tag}br"
        self.subnet = free_subnet()
        self._created: list[tuple[str, ...]] = []  # what destroy() removes, newest first

    def address(self, host: int) -> str:
        return str(self.subnet.network_address + host + 1)

    def create(self) -> None:
        try:
            ip("link", "add", self.bridge, "type", "bridge")
            self._created.append(("link", "del", self.bridge))
            ip("link", "set", self.bridge, "up")
            for host, name in enumerate(self.names):
                ip("netns", "add", name)
                self._created.append(("netns", "del", name))
                outside, inside = f"{name}o", f"{name}i"
                ip("link", "add", outside, "type", "veth", "peer", "name", inside)
                self._created.append(("link", "del", outside))  # takes its peer with it
                ip("link", "set", inside, "netns", name)
                ip("-n", name, "link", "set", inside, "name", IFNAME)
                ip("link", "set", outside, "master", self.bridge, "up")
                ip("-n", name, "addr", "add", f"{self.address(host)}/{self.subnet.prefixlen}", "dev", IFNAME)
                ip("-n", name, "link", "set", "lo", "up")
                ip("-n", name, "link", "set", IFNAME, "up")
        except BaseException:
            self.destroy()
            raise

    def popen(self, host: int, command: list[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.names[host], *command], **kwargs)

    def start_ssh(self, folder: Path) -> dict[str, str]:
        """An ssh server on each host, for root with a key of its own (nothing of the machine's own
        ssh setup is read or changed); the environment under which pdsh and ssh use it."""
        folder.mkdir(parents=True, exist_ok=True)
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation folder
        for key in ("client", "host"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / key)], check=True)
        shutil.copy(folder / "client.pub", folder / "authorized_keys")
        for host, name in enumerate(self.names):
            config = folder / f"sshd-{name}.conf"
            settings = {
                "ListenAddress": self.address(host),
                "HostKey": folder / "host",
                "AuthorizedKeysFile": folder / "authorized_keys",
                "PermitRootLogin": "prohibit-password",
                "PasswordAuthentication": "no",
                "KbdInteractiveAuthentication": "no",
                "StrictModes": "no",
                "UsePAM": "no",
                "PidFile": folder / f"sshd-{name}.pid",
            }
            config.write_text("".join(f"{k} {v}\n" for k, v in settings.items()))
            sshd = shutil.which("sshd") or "/usr/sbin/sshd"
            subprocess.run(["ip", "netns", "exec", name, sshd, "-f", str(config)], check=True, timeout=30)
        options = ["-i", folder / "client", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"]
        return {"PDSH_SSH_ARGS_APPEND": " ".join(map(str, [*options, "-o", "LogLevel=ERROR"]))}

    def unplug(self, host: int) -> None:
        """Its cable pulled: the link on the bridge's side down, so nothing more reaches it or leaves it."""
        ip("link", "set", f"{self.names[host]}o", "down")

    def plug(self, host: int) -> None:
        ip("link", "set", f"{self.names[host]}o", "up")

    def kill_all(self, host: int) -> None:
        """Every process running in the host's namespace, at once (SIGKILL), as a host that dies."""
        for pid in ip("netns", "pids", self.names[host]).stdout.split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)

    def destroy(self) -> None:
        for host in range(len(self.names)):  # sshd and anything else left in the namespace
            if any(args == ("netns", "del", self.names[host]) for args in self._created):
                self.kill_all(host)
        for args in reversed(self._created):
            ip(*args, check=False)
        self._created.clear()
