"""The two sides of a `make bench` path, each a block of optimizer steps timed one by one: the
project's trainer (Lightning, with the run's module, strategy, data module and monitor), and its
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
    """Wall-clock times at the end of each optimizer step (after a device sync on GPU)."""

    def __init__(self):
        self.times: list[float] = []
        self.cpu: list[float] = []  # process CPU seconds (all threads): what steal time on a shared host leaves alone
        self.peak = 0.0

    def tick(self, device: torch.device) -> None:
        from llm.train.monitor import memory_bytes

        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.times.append(time.perf_counter())
        self.cpu.append(time.process_time())
        self.peak = max(self.peak, memory_bytes(device)[2 if device.type == "cuda" else 0])

    def step_times(self, warmup: int, cpu: bool = False) -> list[float]:
        ticks = self.cpu if cpu else self.times
        return [b - a for a, b in zip(ticks[warmup:], ticks[warmup + 1 :], strict=False)]


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
        from llm.train.strategy import preset_names

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

    return OptimizerConfig(lr=3e-3, warmup_steps=2)


def strategy_for(path: BenchPath, batch: int):
    """The trainer's strategy of a path, for one process, exactly as `make train DS=...` builds it."""
    from llm.train.strategy import build_strategy

    return build_strategy(path.deepspeed, None, batch, device().type == "cuda", world_size=1)


def trainer_block(
    path: BenchPath,
    config: ModelConfig,
    data_kwargs: dict,
    precision: str,
    steps: int,
    tmp: Path,
    teacher: ModelConfig | None = None,
):
    """A block of steps through the trainer; with `teacher`, distilled from a frozen model of that
    architecture (its weights do not change the step's time)."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from llm.data.datamodule import TokenDataModule
    from llm.train.loggers import RunCSVLogger
    from llm.train.module import LanguageModel
    from llm.train.monitor import PerformanceMonitor

    clock = StepClock()

    class Tick(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            clock.tick(pl_module.device)

    trainer = L.Trainer(
        accelerator="auto",
        devices=1,
        strategy=strategy_for(path, data_kwargs["batch_size"]),
        precision=precision,
        max_steps=steps,
        gradient_clip_val=1.0,
        logger=RunCSVLogger(str(tmp / f"csv-{time.monotonic_ns()}")),
        log_every_n_steps=10,
        callbacks=[Tick(), PerformanceMonitor(flops_per_token(config))],
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    model = LanguageModel(config, optimizer_config(), compile=path.compile)
    if teacher is not None:
        from llm.model import Transformer

        model.use_teacher(Transformer(teacher))
    with contextlib.redirect_stdout(io.StringIO()):  # the monitor's line about the peak, once per block
        trainer.fit(model, datamodule=TokenDataModule(**data_kwargs))
    return clock


def reference_block(path: BenchPath, config: ModelConfig, data_kwargs: dict, precision: str, steps: int):
    from raw_loop import deepspeed_engine_steps, engine_config, raw_training_steps

    from llm.data.datamodule import TokenDataModule
    from llm.model import Transformer

    clock = StepClock()
    data = TokenDataModule(**data_kwargs)
    data.setup("fit")
    loader = data.train_loader(rank=0, world_size=1, start_batch=0, end_batch=steps)
    model = Transformer(config)
    tick = lambda step: clock.tick(device())  # noqa: E731
    if path.deepspeed is None:
        raw_training_steps(
            model, loader, optimizer_config(), precision, steps, device(), steps, compile=path.compile, on_step=tick
        )
        return clock
    ensure_process_group()
    preset = strategy_for(path, data_kwargs["batch_size"]).config  # with the trainer's one-process changes
    ds_config = engine_config(preset, data_kwargs["batch_size"], precision)
    if path.compile:
        model.compile()  # as the trainer compiles it: the Transformer and its loss, before the engine wraps it
    deepspeed_engine_steps(model, loader, optimizer_config(), ds_config, steps, device(), steps, on_step=tick)
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
