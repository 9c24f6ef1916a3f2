"""Counting where the host waits for the device: each read of a tensor's value (`item`, `tolist`,
`cpu`, `float()`, `int()`, `bool()`, an index) and each tensor made from Python values on a device
(`torch.tensor(..., device=)`, a blocking copy), named by the line that asked for it, and on a GPU
each `torch.cuda.synchronize`. On a GPU every one of them stalls the queue of kernels; between
logging steps a run should have none (docs/performance.md). `make bench` reports them per optimizer
step; tests count them in a real run (tests/helpers.py HostReads).

    counter = HostSyncs(torch.device("cuda"))
    with counter:            # patches torch while inside
        counter.counting = True
        ...                  # counter.counts: {"item llm/train/x.py:12": 3, ...}

Only tensors on `device`'s type are counted (every tensor on a CPU, where a read stands for the one a
GPU run would make): on a GPU a read of a host tensor waits for nothing. Reads made inside
the C++ of an operator are not seen; `torch.cuda.set_sync_debug_mode` is the check for those."""

from __future__ import annotations

import collections
import os
import traceback
from pathlib import Path

import torch

READS = ("item", "tolist", "cpu", "__float__", "__int__", "__bool__", "__index__")
REPOSITORY = str(Path(__file__).resolve().parents[2]) + "/"


class HostSyncs:
    def __init__(self, device: torch.device, skip: tuple[str, ...] = ()):
        self.device_type = torch.device(device).type
        self.skip = {os.path.realpath(f) for f in (__file__, *skip)}  # frames not named: this module's, a probe's
        self.counts: collections.Counter[str] = collections.Counter()
        self.counting = False
        self._originals: dict = {}

    def total(self) -> int:
        return sum(self.counts.values())

    def __enter__(self) -> HostSyncs:
        self._originals = {("Tensor", name): getattr(torch.Tensor, name) for name in READS}
        for name in READS:
            setattr(torch.Tensor, name, self._counted_read(name, self._originals[("Tensor", name)]))
        self._originals[("torch", "tensor")] = torch.tensor
        torch.tensor = self._counted_tensor(torch.tensor)
        if self.device_type == "cuda":
            self._originals[("cuda", "synchronize")] = torch.cuda.synchronize
            torch.cuda.synchronize = self._counted_call("torch.cuda.synchronize", torch.cuda.synchronize)
        return self

    def __exit__(self, *exc) -> None:
        self.counting = False
        owners = {"Tensor": torch.Tensor, "torch": torch, "cuda": torch.cuda}
        for (owner, name), original in self._originals.items():
            setattr(owners[owner], name, original)
        self._originals = {}

    def _count(self, what: str) -> None:
        self.counting = False  # what the read itself calls is not counted again
        try:
            frames = [f for f in traceback.extract_stack() if os.path.realpath(f.filename) not in self.skip]
            where = frames[-1].filename.split("site-packages/")[-1].removeprefix(REPOSITORY)
            self.counts[f"{what} {where}:{frames[-1].lineno}"] += 1
        finally:
            self.counting = True

    def _counted_read(self, name: str, original):
        counter = self

        def read(tensor, *args, **kwargs):
            if counter.counting and (counter.device_type == "cpu" or tensor.device.type == counter.device_type):
                counter._count(name)
            return original(tensor, *args, **kwargs)

        return read

    def _counted_tensor(self, original):
        counter = self

        def made(*args, **kwargs):
            device = kwargs.get("device")
            if counter.counting and device is not None and torch.device(device).type == counter.device_type:
                counter._count("torch.tensor(device=)")
            return original(*args, **kwargs)

        return made

    def _counted_call(self, what: str, original):
        counter = self

        def call(*args, **kwargs):
            if counter.counting:
                counter._count(what)
            return original(*args, **kwargs)

        return call
