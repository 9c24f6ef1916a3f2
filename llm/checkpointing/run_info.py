"""What every checkpoint carries besides the weights and optimizer state, gathered by a callback."""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy

from llm import compat
from llm.checkpointing import universal
from llm.config import CHECKPOINT_FORMAT
from llm.redact import scrub, scrub_text


class RunInfo(Callback):
    """Make every checkpoint self-contained and resumable exactly: the resolved config, the
    tokenizer, the world size, every rank's random-number generator states, a distillation's
    teacher (its content's digest, which a resume must match) and the latest validation loss."""

    def __init__(
        self, config: dict, data_folder: Path, resumed_from: str | None = None, teacher_digest: str | None = None
    ):
        self.config = config
        self.data_folder = Path(data_folder)
        self.resumed_from = resumed_from  # the checkpoint this session continues, if any
        self.teacher_digest = teacher_digest
        self.start_step, self.train_seconds = 0, 0.0
        self.validated_step: int | None = None  # the optimizer step of the latest validation

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        # before any callback's on_validation_end, where a checkpoint of this step is written
        if not trainer.sanity_checking:
            self.validated_step = trainer.global_step

    def on_train_start(self, trainer, pl_module) -> None:
        self.start_step, self._started = trainer.global_step, time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        self.train_seconds = time.perf_counter() - self._started

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["llm_config"] = self.config
        checkpoint["llm_format"] = CHECKPOINT_FORMAT
        checkpoint["tokenizer_json"] = (self.data_folder / "tokenizer.json").read_text()
        checkpoint["data_meta"] = scrub(json.loads((self.data_folder / "meta.json").read_text()))
        checkpoint["world_size"] = trainer.world_size
        checkpoint["command"] = scrub_text(" ".join(["python -m llm", *sys.argv[1:]]))
        checkpoint["rng_states"] = all_ranks(trainer, rng_states())
        if self.teacher_digest:
            checkpoint["teacher_digest"] = self.teacher_digest
        loss = trainer.callback_metrics.get("val/loss")
        if self.validated_step is not None and loss is not None:  # what a model card says of it
            checkpoint["validation"] = {"step": self.validated_step, "loss": float(loss)}
        if isinstance(trainer.strategy, DeepSpeedStrategy):  # so that it can be re-partitioned
            checkpoint.update(universal.client_state())

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        states = checkpoint.get("rng_states") or []
        if len(states) == trainer.world_size:
            set_rng_states(states[trainer.global_rank])
        # resumed with another accumulation (another world size, the same tokens per step): the
        # micro-batches counted so far as if the run had always accumulated this many
        then = (checkpoint.get("llm_config") or {}).get("trainer", {}).get("accumulate_grad_batches")
        now = trainer.accumulate_grad_batches
        if then and then != now and "loops" in checkpoint:
            compat.shift_batch_progress(checkpoint, checkpoint["global_step"] * (now - then))


def rng_states() -> dict:
    """This process's generators (torch, CUDA, Python's random), in types a weights-only load accepts."""
    states = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def all_ranks(trainer, value) -> list:
    """`value` of every rank, in rank order, on every rank."""
    if trainer.world_size == 1 or not torch.distributed.is_initialized():
        return [value]
    gathered = [None] * trainer.world_size
    torch.distributed.all_gather_object(gathered, value)
    return gathered
