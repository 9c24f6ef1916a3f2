"""A collective that cannot complete ends the run in bounded time, with one line.

A collective (all-reduce, broadcast, barrier, ...) waits for every process of the job. When one of
them stops or hangs, the others would wait for torch's default of 30 minutes (10 with NCCL), and
groups a library creates with `new_group` (DeepSpeed's copy of the world group, which ZeRO reduces
over) get that default whatever the strategy was given. Every group of the job therefore gets the
run's `collective_timeout` (default 600 s); a collective that exceeds it raises, and the entry point
turns that into one line naming the rank, the operation and where it was called:

    stopped: rank 0: all_reduce (deepspeed/runtime/zero/stage_1_and_2.py:1123, allreduce_bucket) had no
    answer from the other processes within 600 s (collective_timeout); ...

and ends the processes it started itself (Lightning's launcher starts ranks 1.. as its children),
so that none is left behind waiting.
"""

from __future__ import annotations

import os
import traceback
from datetime import timedelta

import torch
from lightning.pytorch.callbacks import Callback

from llm import compat, handoff
from llm.config import RunOptions
from llm.launch.commands import continue_command

DEFAULT_TIMEOUT = RunOptions.collective_timeout  # --collective_timeout's default (llm/config.py)
# while the processes start and meet (imports, DeepSpeed's engine), before CollectiveTimeout applies the
# run's own: a short collective_timeout that catches a hang fast must not fail a start on a busy node
STARTUP_TIMEOUT = 300.0
TIMED_OUT = ("Timed out", "timed out", "Timeout", "timeout")
active_timeout: float | None = None  # what the groups of this process were given, for the message
# frames that only pass a collective on: the caller worth naming is the one that asked for it
WRAPPERS = (
    "/torch/",
    "/lightning/pytorch/strategies/",
    "/lightning/fabric/strategies/",
    "/deepspeed/comm/",
    "/lightning/fabric/utilities/distributed.py",
)
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "closed pair")


class CollectiveTimeout(Callback):
    """Gives every process group of the job the run's timeout once the strategy has made them all."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_fit_start(self, trainer, pl_module) -> None:
        global active_timeout
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            compat.set_timeout_of_every_process_group(timedelta(seconds=self.seconds))
            active_timeout = self.seconds


def _where(frames: list[traceback.FrameSummary]) -> tuple[str | None, str]:
    """(the torch.distributed function, the nearest caller outside torch) of a failed collective."""
    operation = None
    for frame in reversed(frames):
        path = frame.filename.replace(os.sep, "/")
        if "/torch/distributed/" in path:
            if operation is None and path.endswith("distributed_c10d.py"):
                operation = frame.name
            continue
        if any(part in path for part in WRAPPERS):
            continue
        short = path.split("/site-packages/")[-1]
        if "/llm/" in short:
            short = "llm/" + short.rsplit("/llm/", 1)[-1]
        return operation, f"{short}:{frame.lineno}, {frame.name}"
    return operation, "unknown caller"


def failed_collective(exc: BaseException) -> str | None:
    """The one line for an exception raised by a collective that timed out or lost a peer, else None."""
    if not isinstance(exc, RuntimeError):
        return None
    message = " ".join(str(exc).split())
    timed_out = any(word in message for word in TIMED_OUT)
    peer_gone = any(word in message for word in PEER_GONE)
    if not (timed_out or peer_gone):
        return None
    frames = traceback.extract_tb(exc.__traceback__)
    operation, caller = _where(frames)
    if operation is None and not any("/torch/distributed/" in f.filename.replace(os.sep, "/") for f in frames):
        if "gloo" not in message.lower() and "nccl" not in message.lower():
            return None
    if operation:
        what = f"{operation} ({caller})"
    elif caller.endswith(", backward"):  # DDP reduces the gradients inside backward, in C++
        what = f"the gradient all-reduce of backward ({caller})"
    else:
        what = f"a collective ({caller})"
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else int(os.environ.get("RANK", 0))
    run = handoff.received(handoff.RUN_DIR)
    resume = f"; then continue with {continue_command(run)}" if run else ""
    if timed_out:
        limit = f"{active_timeout:.0f} s (collective_timeout)" if active_timeout else "the start-up timeout"
        return (
            f"rank {rank}: {what} had no answer from the other processes within {limit}; "
            f"one of them stopped or is stuck: its own output says which{resume}"
        )
    return (
        f"rank {rank}: {what} failed: another process of the job ended ({message[:120]}); "
        f"its own output says why{resume}"
    )


def end_child_processes() -> None:
    """Kill the ranks this process started (Lightning's launcher starts ranks 1.. as its children,
    with this process's own command), so that a rank stuck forever does not outlive the run. Other
    children (W&B's service, which ends the W&B run at exit) are left alone."""
    import sys

    import psutil

    package = __name__.split(".")[0]
    ranks = []
    for child in psutil.Process().children(recursive=True):
        try:
            command = child.cmdline()
        except psutil.Error:
            continue
        if any(arg in (package, f"{package}.__main__") for arg in command[1:3]) or command[1:] == sys.argv[1:]:
            ranks.append(child)
    for child in ranks:
        try:
            child.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(ranks, timeout=10)
