"""What the processes of one job agree on before the process group exists.

When an outside launcher starts every process at once (torchrun on each node, the DeepSpeed
launcher, srun), each process parses the same config, but only the first (global rank 0) may decide
what is decided once: the run folder (a timestamp taken on each node would differ), and whether
the inputs it alone checks are acceptable (a run folder already in use, a checkpoint to resume, the
data it prepares). The others wait for its word through a small key-value store that rank 0 serves
on MASTER_PORT + 1, and stop with rank 0's own one-line error when it refuses, instead of waiting
forever for a process group that will never form.

When Lightning starts the processes itself (`make train DEVICES=n`), rank 0 checks everything
before it starts the others, and the agreement is a formality.
"""

from __future__ import annotations

import json
import os
import time
from datetime import timedelta

from llm import handoff, ranks
from llm.errors import ConfigError, exception_line

DEFAULT_TIMEOUT = 300.0
POLL_SECONDS = 0.2


def launch_timeout() -> float:
    return float(handoff.received(handoff.LAUNCH_TIMEOUT) or DEFAULT_TIMEOUT)


def world_size_from_launcher() -> int:
    """Processes an outside launcher started, 1 when Lightning starts them (it sets no RANK)."""
    if "RANK" in os.environ:  # torchrun, the DeepSpeed launcher
        return int(os.environ.get("WORLD_SIZE", 1))
    if "SLURM_PROCID" in os.environ:  # srun
        return int(os.environ.get("SLURM_NTASKS", 1))
    return 1


def nodes_from_torchrun() -> int | None:
    """Nodes in this round of a torchrun job (WORLD_SIZE / LOCAL_WORLD_SIZE); None outside torchrun.
    An elastic job's count changes from one restart to the next, so it is read, not configured
    (Lightning refuses devices x num_nodes that differs from WORLD_SIZE)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or "LOCAL_WORLD_SIZE" not in os.environ:
        return None
    return max(int(os.environ.get("WORLD_SIZE", 1)) // int(os.environ["LOCAL_WORLD_SIZE"]), 1)


def rendezvous() -> tuple[str, int]:
    """The address and port of rank 0's process group, as Lightning will read them."""
    if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
        return os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    from lightning.fabric.plugins.environments import SLURMEnvironment

    slurm = SLURMEnvironment()  # derives both from the job's node list and id, as Lightning does
    return slurm.main_address, slurm.main_port


class Agreement:
    """Rank 0 publishes values or its refusal; the other ranks wait for them."""

    def __init__(self, store=None, world_size: int = 1):
        self.store, self.world_size = store, world_size
        self.leader = ranks.is_first_process()

    @classmethod
    def start(cls) -> Agreement:
        world = world_size_from_launcher()
        if world <= 1:
            return cls()
        from torch.distributed import TCPStore

        addr, port = rendezvous()
        timeout = launch_timeout()
        leader = ranks.is_first_process()
        try:
            store = TCPStore(
                addr, port + 1, is_master=leader, wait_for_workers=False, timeout=timedelta(seconds=timeout)
            )
        except Exception as exc:  # the client's connection timed out, or the port is taken
            reason = exception_line(exc)
            if leader:
                raise ConfigError(
                    f"MASTER_PORT={port}: rank 0 cannot serve the job's agreement on port {port + 1} ({reason}); "
                    "choose another MASTER_PORT"
                ) from exc
            raise ConfigError(
                f"MASTER_ADDR={addr}: rank 0 did not answer on port {port + 1} within {timeout:.0f} s ({reason}); "
                "check the address, that node 0 is running and that ports MASTER_PORT and MASTER_PORT+1 are open "
                "(LAUNCH_TIMEOUT= to wait longer)"
            ) from exc
        return cls(store, world)

    def publish(self, key: str, value) -> None:
        """Rank 0: the value the others wait for under `key`, unless one of them has refused."""
        if self.store is None or not self.leader:
            return
        self._raise_if_refused()
        self.store.set(f"llm/{key}", json.dumps({"value": value}))

    def refuse(self, line: str) -> None:
        """Stop every process with this line (the first refusal stands). Rank 0 then stays a few
        seconds, so that the others can read it from its store."""
        if self.store is None:
            return
        if not self.store.check(["llm/refused"]):
            self.store.set("llm/refused", json.dumps({"line": line}))
        if self.leader:
            deadline = time.monotonic() + 5.0
            while self.store.add("llm/refusal_read", 0) < self.world_size - 1 and time.monotonic() < deadline:
                time.sleep(POLL_SECONDS)

    def _raise_if_refused(self) -> None:
        if self.store.check(["llm/refused"]):
            line = json.loads(self.store.get("llm/refused"))["line"]
            self.store.add("llm/refusal_read", 1)
            raise ConfigError(line)

    def wait(self, key: str):
        """The others: rank 0's value for `key`; ConfigError with rank 0's line if it refused. Waits
        as long as rank 0 lives (it may be preparing the data); stops if it dies."""
        if self.store is None or self.leader:
            return None
        while True:
            try:
                self._raise_if_refused()
                if self.store.check([f"llm/{key}"]):
                    return json.loads(self.store.get(f"llm/{key}"))["value"]
            except ConfigError:
                raise
            except Exception as exc:  # the store is gone: rank 0 stopped
                raise ConfigError(
                    "rank 0: stopped before the run started (its store on MASTER_PORT+1 closed); see its output"
                ) from exc
            time.sleep(POLL_SECONDS)
