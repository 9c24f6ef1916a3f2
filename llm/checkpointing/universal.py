"""A DeepSpeed checkpoint continued on another number of processes: DeepSpeed's universal checkpoint.

A ZeRO checkpoint holds each rank's partition of the optimizer state (and under ZeRO-3 of the
parameters), so it loads only on the split that wrote it. DeepSpeed's `ds_to_universal` gathers the
partitions into one file per parameter (fp32 weights and both Adam moments), which an engine
configured with `checkpoint.load_universal` partitions again for its own world size. Lightning's
strategy neither converts nor asks for that load (Lightning issue #20065): the run does both. The
conversion goes beside the original (`step-<n>.ckpt.universal/`), once; the original stays as it is.

DeepSpeed converts only a checkpoint whose client state carries `universal_checkpoint_info`; every
save of a DeepSpeed run writes it (`client_state`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from pathlib import Path

from llm import compat
from llm.checkpointing.files import Checkpoint, safe_load, weights_only_loads
from llm.errors import ConfigError, exception_line
from llm.ranks import say

SUFFIX = ".universal"
TAG = "checkpoint"  # the tag folder Lightning's DeepSpeed strategy saves under


def client_state() -> dict:
    """What a DeepSpeed save adds to its client state so that ds_to_universal can convert it."""
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    return {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}


def is_universal(path: str | None) -> bool:
    return bool(path) and str(path).rstrip("/").endswith(SUFFIX)


def convert(checkpoint: Checkpoint, world: int) -> Path:
    """The universal form of a ZeRO checkpoint folder, made once beside it (a complete one is reused)."""
    source = checkpoint.path
    out = source.with_name(source.name + SUFFIX)
    if (out / "latest_universal").is_file():
        say(f"continuing {source} on {world} processes from its universal checkpoint {out}")
        return out
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO

    if UNIVERSAL_CHECKPOINT_INFO not in safe_load(checkpoint.client_state_file(), "resume", mmap=True):
        raise ConfigError(
            f"resume={source}: written without DeepSpeed's {UNIVERSAL_CHECKPOINT_INFO} (by an earlier version), so "
            "it cannot be re-partitioned; continue it on the processes that wrote it"
        )
    say(f"re-partitioning {source} for {world} processes: DeepSpeed's universal checkpoint into {out}")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # what an interrupted conversion left
    try:
        # DeepSpeed reports its progress on stdout; its loads read tensors and plain data only
        with contextlib.redirect_stdout(sys.stderr), weights_only_loads():
            compat.convert_to_universal(str(source / checkpoint._tag()), str(partial / TAG))
    except Exception as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise ConfigError(
            f"resume={source}: DeepSpeed could not convert it to a universal checkpoint ({exception_line(exc)}); "
            "continue it on the processes that wrote it"
        ) from exc
    (partial / "latest").write_text(TAG)  # what Lightning checks a DeepSpeed folder by
    os.replace(partial, out)
    return out
