"""Throughput, MFU, memory and gradient norm, logged every `log_every_n_steps`.

Cheap by construction: between logging steps the monitor reads a clock twice per micro-batch and
touches no device. On a logging step it synchronises the accelerator once (so the clock is
right), gathers one small vector from every rank (memory is reported as the maximum and minimum
across ranks: a lopsided rank is the usual sign of trouble), and hands the numbers to Lightning's
loggers, which write them on rank zero. The rates come from Lightning's `Throughput` utility.
"""

from __future__ import annotations

import ctypes
import resource
import sys
import time

import psutil
import torch
from lightning.fabric.utilities.throughput import Throughput
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy

from llm import compat, ranks
from llm.bars import duration
from llm.config import compute_dtype
from llm.observe.peaks import Peak, find_peak

GiB = 2**30
# the MFU a start-of-run estimate assumes: what the tiny and gpt2 recipes measure on a CPU and a GPU
# (35 to 45%); the progress line then shows the real rate
ESTIMATE_MFU = 0.4
SLOW_STEP_SECONDS = 600  # a step longer than this is announced as a warning


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _glibc_mallinfo2():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        return libc.mallinfo2
    except (OSError, AttributeError):  # not glibc (macOS), or glibc older than 2.33
        return None


_MALLINFO2 = _glibc_mallinfo2() if sys.platform.startswith("linux") else None


def memory_bytes(device: torch.device) -> tuple[float, float, float, float]:
    """(allocated, reserved, peak, host_rss) of this process in bytes.

    On a GPU: torch's CUDA allocator (tensors in use, memory held from the driver, peak in use).
    On a CPU the device memory is host memory: allocated and reserved are what glibc's malloc has
    handed out and holds from the OS (mallinfo2; without glibc, both are the resident set), peak is
    the resident set's high-water mark. Peaks count from the fit's setup (reset_peak_memory)."""
    rss = psutil.Process().memory_info().rss
    if device.type == "cuda":
        return (
            torch.cuda.memory_allocated(device),
            torch.cuda.memory_reserved(device),
            torch.cuda.max_memory_allocated(device),
            rss,
        )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    if _MALLINFO2 is not None:
        info = _MALLINFO2()
        return info.uordblks + info.hblkhd, info.arena + info.hblkhd, peak, rss
    return rss, rss, peak, rss


def reset_peak_memory(device: torch.device) -> float:
    """Count the peak from now on, and return the bytes this process holds now: what was there
    before the model (on a CPU the interpreter and its libraries), which the planner does not count."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return float(torch.cuda.memory_allocated(device))
    try:  # Linux: the resident set's high-water mark (ru_maxrss, VmHWM) starts again from here
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # elsewhere it counts from the process's start: data preparation's peak included
    return float(psutil.Process().memory_info().rss)


class CompileClock:
    """Seconds spent compiling (torch.compile: tracing, code generation, and the backward graph
    compiled at its first use), timed by torch's own start and end callbacks of each compilation."""

    def __init__(self):
        callback_handler = compat.compile_callbacks()
        self.seconds = 0.0
        self._started = 0.0
        self._handler = callback_handler
        callback_handler.register_start_callback(self._start)
        callback_handler.register_end_callback(self._end)

    def _start(self, _args) -> None:
        self._started = time.perf_counter()

    def _end(self, _args) -> None:
        self.seconds += time.perf_counter() - self._started

    def close(self) -> None:
        if self._handler is not None:  # once: a fit and a validation after it both tear down
            self._handler.remove_start_callback(self._start)
            self._handler.remove_end_callback(self._end)
            self._handler = None


class PerformanceMonitor(Callback):
    def __init__(self, flops_per_token: int, peak_flops: float | None = None):
        """Args:
        flops_per_token: training FLOPs per token (6N + 12·L·H·Q·T)
        peak_flops: peak FLOP/s of one device for MFU; none: a GPU's datasheet value, else measured on the device
        """
        self.flops_per_token = flops_per_token
        self.peak_override = peak_flops
        self.peak: Peak | None = None
        self.compile_clock: CompileClock | None = None
        self.memory_baseline = 0.0  # bytes this process held before the model was built
        self.memory_used: tuple[float, float] | None = None  # GiB over the ranks: (peak - baseline, baseline)

    @property
    def device_peak(self) -> Peak:
        """One device's peak FLOP/s, found in setup."""
        if self.peak is None:
            raise RuntimeError("the device's peak is found in the fit's setup, before it is read")
        return self.peak

    def setup(self, trainer, pl_module, stage: str) -> None:
        # every rank finds its own device's peak; the first says which one MFU is measured against
        if stage == "fit" and self.peak is None:
            device = trainer.strategy.root_device  # the module itself moves there later
            self.peak = find_peak(device, compute_dtype(trainer.precision), self.peak_override)
            ranks.say(f"MFU against {self.peak.describe()}", self.estimate(trainer))
            # the fit's setup hooks run before configure_model builds the model: the peak from here
            # is what training needs, the planner's prediction (summary.json sets them side by side)
            self.memory_baseline = reset_peak_memory(device)
        if self.compile_clock is None:
            self.compile_clock = CompileClock()

    def estimate(self, trainer) -> str:
        """How long a step and the run will take, from the FLOPs and the peak, before the first step:
        a model that would take hours per step on this machine is said before it starts."""
        tokens = tokens_per_optimizer_step(trainer, trainer.datamodule)
        step = self.flops_per_token * tokens / trainer.world_size / (self.device_peak.flops * ESTIMATE_MFU)
        line = (
            f"estimate: {duration(step)} per optimizer step, {duration(step * trainer.max_steps)} for "
            f"{trainer.max_steps:,} steps, at {ESTIMATE_MFU:.0%} MFU (the progress line shows the measured rate)"
        )
        if step > SLOW_STEP_SECONDS:
            return f"warning: {line}; a smaller MODEL=, fewer tokens per step or a GPU would take less"
        return line

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self.compile_clock is not None:
            self.compile_clock.close()

    @property
    def compile_seconds(self) -> float:
        return self.compile_clock.seconds if self.compile_clock else 0.0

    # --- the clock: training time excludes validation, checkpointing and compilation ----------------

    def on_train_start(self, trainer, pl_module) -> None:
        data = trainer.datamodule
        self.tokens_per_sample = data.block_size
        self.tokens_per_step = tokens_per_optimizer_step(trainer, data)
        self.throughput = Throughput(
            available_flops=self.device_peak.flops, world_size=trainer.world_size, window_size=2
        )
        self.train_time = 0.0
        self.samples = 0  # sequences this rank trained on in this session
        self.start_step = self.last_logged_step = trainer.global_step
        self.throughput.update(time=0.0, batches=0, samples=0, lengths=0, flops=0)
        self.logged_time, self.logged_tokens = 0.0, 0  # as of the previous logging step (the rates' window)
        self.waited_until = self._loader_wait(trainer)
        self.last_end: float | None = None  # end of the previous micro-batch; None after a pause

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self.last_end is not None:  # between batches: fetching this one, and the loop's own work
            self.train_time += now - self.last_end
        self.batch_start = now
        self.compiled_before = self.compile_seconds

    def on_validation_start(self, trainer, pl_module) -> None:
        self.last_end = None  # validation and the checkpoint after it are not training time

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking and hasattr(self, "tokens_per_step"):
            # in the validation row too, so that W&B can chart val/ against tokens (`make wandb-dashboard`)
            tokens = float(trainer.global_step * self.tokens_per_step)
            pl_module.log("train/tokens", tokens, on_step=False, on_epoch=True, sync_dist=True)  # equal on all ranks

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.samples += len(batch)
        if pl_module.clock.logging_step(trainer):
            if pl_module.device.type == "cuda":
                torch.cuda.synchronize(pl_module.device)  # the clock must see the finished work
            self._log(trainer, pl_module, time.perf_counter())
        now = time.perf_counter()
        self.train_time += self._batch_seconds(now)
        self.last_end = now

    def _batch_seconds(self, now: float) -> float:
        """Training time of the current micro-batch so far: less any compilation in it."""
        return now - self.batch_start - (self.compile_seconds - self.compiled_before)

    def on_train_end(self, trainer, pl_module) -> None:
        peak = memory_bytes(pl_module.device)[2]
        own = torch.tensor([peak - self.memory_baseline, self.memory_baseline], dtype=torch.float64) / GiB
        every = trainer.strategy.all_gather(own.to(pl_module.device)).reshape(-1, 2)  # (ranks, 2)
        self.memory_used = tuple(every.max(dim=0).values.tolist())

    # --- a logging step ------------------------------------------------------------------------------

    def _log(self, trainer, pl_module, now: float) -> None:
        train_time = self.train_time + self._batch_seconds(now)
        tokens = self.samples * self.tokens_per_sample  # this rank's, this session
        new_tokens = tokens - self.logged_tokens
        self.throughput.update(
            time=train_time,
            batches=trainer.global_step - self.start_step,
            samples=self.samples,
            lengths=tokens,
            flops=new_tokens * self.flops_per_token,
        )
        rates = self.throughput.compute()  # over the interval since the previous logging step
        interval = train_time - self.logged_time  # the window of two updates compute() read
        self.logged_time, self.logged_tokens = train_time, tokens
        world = trainer.world_size
        metrics = {
            "train/tokens": trainer.global_step * self.tokens_per_step,
            "perf/tokens_per_sec": rates["device/items_per_sec"] * world,
            "perf/tokens_per_sec_per_device": rates["device/items_per_sec"],
            "perf/samples_per_sec": rates["device/samples_per_sec"] * world,
            "perf/step_time": interval / (trainer.global_step - self.last_logged_step),
            "perf/mfu": rates["device/mfu"],
            "perf/data_wait_frac": (self._loader_wait(trainer) - self.waited_until) / interval,
        }
        metrics.update(self._memory(trainer, pl_module))
        grad_norm = self._deepspeed_grad_norm(trainer)
        if grad_norm is not None:
            metrics["train/grad_norm"] = grad_norm
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, rank_zero_only=True)
        self.waited_until, self.last_logged_step = self._loader_wait(trainer), trainer.global_step

    @staticmethod
    def _loader_wait(trainer) -> float:
        """Seconds the loop has waited for training batches (StepDataLoader counts them)."""
        return getattr(trainer.train_dataloader, "wait_seconds", 0.0)

    def _memory(self, trainer, pl_module) -> dict:
        own = torch.tensor(memory_bytes(pl_module.device), dtype=torch.float64, device=pl_module.device) / GiB
        every = trainer.strategy.all_gather(own).reshape(-1, 4)  # (ranks, 4): one collective
        high, low = every.max(dim=0).values.tolist(), every.min(dim=0).values.tolist()
        out = {}
        for i, name in enumerate(("allocated", "reserved", "peak", "host_rss")):
            out[f"mem/{name}_max"], out[f"mem/{name}_min"] = high[i], low[i]
        return out

    # --- the gradient norm before clipping: DeepSpeed's (the module logs it otherwise) -------------

    @staticmethod
    def _deepspeed_grad_norm(trainer) -> float | None:
        if not isinstance(trainer.strategy, DeepSpeedStrategy):
            return None
        norm = trainer.strategy.deepspeed_engine.get_global_grad_norm()  # of the last step, before clipping
        return None if norm is None else float(norm)


def tokens_per_optimizer_step(trainer, datamodule) -> int:
    """Tokens in one optimizer step of the whole job: accumulation × micro batch × block × processes."""
    return trainer.accumulate_grad_batches * datamodule.batch_size * datamodule.block_size * trainer.world_size
