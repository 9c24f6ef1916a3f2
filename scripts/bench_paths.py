"""The two sides of a `make bench` path, each a block of optimizer steps: the project's trainer
(Lightning, with the run's module, strategy, data module and every callback of a run), and its
reference (scripts/raw_loop.py: a plain torch loop, or DeepSpeed's engine driven by hand)."""

from __future__ import annotations

import contextlib
import io
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from llm.model import ModelConfig, flops_per_token


class StepClock:
    """The ends of a block's optimizer steps. The device is synchronised only at the two edges of the
    measured part, the end of the warm-up and the last step, as a run waits for it only at logging
    steps: the block's step time is the time between the edges over the steps, and each step's own
    time is when the host finished it (on a GPU: queued it). Between the edges `syncs` counts where
    the host waited for the device (llm/observe/host_syncs.py)."""

    def __init__(self, device: torch.device, warmup: int, steps: int):
        from llm.observe.host_syncs import HostSyncs

        assert warmup >= 1, "the measured part starts at the end of a warm-up step"
        self.device, self.warmup, self.steps = device, warmup, steps
        self.syncs = HostSyncs(device, skip=(__file__,))
        self.step_syncs: list[int] = []  # host synchronisations in each measured step
        self.times: list[float] = []
        self.cpu: list[float] = []  # process CPU seconds (all threads): what steal time on a shared host leaves alone
        self.peak = 0.0

    def tick(self) -> None:
        from llm.observe.monitor import memory_bytes

        done = len(self.times) + 1
        if done > self.warmup + self.steps:  # past the measured steps (the trainer's last one)
            return
        if self.syncs.counting:  # the end of a measured step: what it synchronised since the last end
            self.step_syncs.append(self.syncs.total() - sum(self.step_syncs))
        edge = done in (self.warmup, self.warmup + self.steps)
        if edge:
            self.syncs.counting = False  # the clock's own wait is not the path's
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.peak = max(self.peak, memory_bytes(self.device)[2 if self.device.type == "cuda" else 0])
        self.times.append(time.perf_counter())
        self.cpu.append(time.process_time())
        self.syncs.counting = self.warmup <= done < self.warmup + self.steps

    def block_step_seconds(self) -> float:
        """Between the synchronised edges, per optimizer step."""
        return (self.times[self.warmup + self.steps - 1] - self.times[self.warmup - 1]) / self.steps

    def step_times(self, cpu: bool = False) -> list[float]:
        ticks = (self.cpu if cpu else self.times)[self.warmup - 1 : self.warmup + self.steps]
        return [b - a for a, b in zip(ticks, ticks[1:], strict=False)]


@dataclass(frozen=True)
class BenchPath:
    """One way to train, timed through the trainer and through its reference: a plain torch loop,
    or DeepSpeed's own engine with the same config when the path is a ZeRO preset."""

    name: str
    deepspeed: str | None  # a preset in configs/deepspeed/, or None
    compile: bool

    @classmethod
    def parse(cls, name: str) -> BenchPath:
        from llm.errors import ConfigError
        from llm.preflight.presets import preset_names

        if name in ("eager", "compiled"):
            return cls(name, None, name == "compiled")
        preset, _, suffix = name.partition("-")
        if preset in preset_names() and suffix in ("", "compiled"):
            return cls(name, preset, suffix == "compiled")
        raise ConfigError(
            f"paths={name}: unknown; use eager, compiled, or a DeepSpeed preset ({', '.join(preset_names())}), "
            "optionally followed by -compiled"
        )

    @property
    def reference(self) -> str:
        return "deepspeed engine" if self.deepspeed else "torch loop"


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def optimizer_config():
    from llm.config import OptimizerConfig

    # torch's fused AdamW, as a GPU run uses it, on a CPU too: there the unfused one reads its step
    # counters and the skip flag on the host, which a GPU run does not, and the count would say so
    return OptimizerConfig(lr=3e-3, warmup_steps=2, fused=True)


def strategy_for(path: BenchPath, batch: int):
    """The trainer's strategy of a path, for one process, exactly as `make train DS=...` builds it."""
    from llm.train.strategy import build_strategy

    return build_strategy(path.deepspeed, None, batch, device().type == "cuda", world_size=1)


def trainer_block(
    path: BenchPath,
    config: ModelConfig,
    data_kwargs: dict,
    data_folder: Path,
    precision: str,
    warmup: int,
    steps: int,
    accumulation: int,
    tmp: Path,
    teacher: ModelConfig | None = None,
) -> StepClock:
    """A block of steps through the trainer with every callback of a run (llm/train/callbacks.py
    run_callbacks: the monitor, the skip of non-finite steps, the collective timeout, the checkpoints
    and their stop on signals, the progress lines) and CSV logging. Validation is off and the one
    save comes after the last step: neither is a cost of every step. Logging is every 10 steps, as
    `make train` logs; the run takes one step past the measured ones, so that the last of those is
    not the run's final step, which always logs. With `teacher`, distilled from a frozen model of
    that architecture (its weights do not change the step's time)."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from llm.checkpointing.files import CheckpointFolder
    from llm.checkpointing.saving import Checkpoints
    from llm.config import RunOptions
    from llm.data.datamodule import TokenDataModule
    from llm.observe.loggers import RunCSVLogger
    from llm.observe.monitor import PerformanceMonitor
    from llm.train.callbacks import RunInfo, run_callbacks
    from llm.train.module import LanguageModel

    clock = StepClock(device(), warmup, steps)

    class Tick(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            if trainer.global_step > len(clock.times):  # the end of an optimizer step, not an accumulating batch
                clock.tick()

    folder = tmp / f"trainer-{time.monotonic_ns()}"
    checkpoints = Checkpoints(CheckpointFolder(folder / "checkpoints"), save_every=10**9, keep_last=1)
    callbacks = run_callbacks(
        PerformanceMonitor(flops_per_token(config)), checkpoints, RunInfo({}, data_folder), RunOptions()
    )
    torch.compiler.reset()  # a fresh compile per block: Dynamo's recompile limit would fall back to eager
    trainer = L.Trainer(
        accelerator="auto",
        devices=1,
        strategy=strategy_for(path, data_kwargs["batch_size"]),
        precision=precision,
        max_steps=warmup + steps + 1,
        accumulate_grad_batches=accumulation,
        gradient_clip_val=1.0,
        logger=RunCSVLogger(str(folder)),
        log_every_n_steps=10,
        callbacks=[Tick(), *callbacks],
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    model = LanguageModel(config, optimizer_config(), compile=path.compile)
    if teacher is not None:
        from llm.model import Transformer

        model.use_teacher(Transformer(teacher))
    # the progress lines and the monitor's line about the peak go to stdout, once per block
    with clock.syncs, contextlib.redirect_stdout(io.StringIO()):
        trainer.fit(model, datamodule=TokenDataModule(**data_kwargs))
    return clock


def reference_block(
    path: BenchPath, config: ModelConfig, data_kwargs: dict, precision: str, warmup: int, steps: int, accumulation: int
) -> StepClock:
    from raw_loop import deepspeed_engine_steps, engine_config, raw_training_steps

    from llm.data.datamodule import TokenDataModule
    from llm.model import Transformer

    clock = StepClock(device(), warmup, steps)
    total = warmup + steps
    data = TokenDataModule(**data_kwargs)
    data.setup("fit")
    loader = data.train_loader(rank=0, world_size=1, start_batch=0, end_batch=total * accumulation)
    model = Transformer(config)
    torch.compiler.reset()
    tick = lambda step: clock.tick()  # noqa: E731
    with clock.syncs:
        if path.deepspeed is None:
            raw_training_steps(
                model, loader, optimizer_config(), precision, total, device(), total, accumulation,
                compile=path.compile, on_step=tick,
            )  # fmt: skip
            return clock
        ensure_process_group()
        preset = strategy_for(path, data_kwargs["batch_size"]).config  # with the trainer's one-process changes
        ds_config = engine_config(preset, data_kwargs["batch_size"], accumulation, precision)
        if path.compile:
            model.compile()  # as the trainer compiles it: the Transformer and its loss, before the engine wraps it
        deepspeed_engine_steps(model, loader, optimizer_config(), ds_config, total, device(), total, on_step=tick)
    return clock


def ensure_process_group() -> None:
    """The one-process group DeepSpeed's engine needs, as Lightning would form it (env:// rendezvous)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    import deepspeed
    from lightning.fabric.plugins.environments.lightning import find_free_network_port

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(find_free_network_port()))
    with contextlib.redirect_stdout(io.StringIO()):
        deepspeed.init_distributed(dist_backend="nccl" if device().type == "cuda" else "gloo")
