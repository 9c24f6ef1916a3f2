"""Progress of a run: Lightning's rich progress bar on a terminal, and one plain line per logging
interval elsewhere (a SLURM log, a file, a pipe), where a live bar would print nothing."""

from __future__ import annotations

import sys
import time

from lightning.pytorch.callbacks import ProgressBar, RichProgressBar

from llm.bars import duration


def progress_bar() -> ProgressBar:
    return RichBar(refresh_rate=4) if sys.stdout.isatty() else PlainLines()  # redraws per second


class RichBar(RichProgressBar):
    """Lightning's rich progress bar, counting the run's batches rather than epochs (a run here is
    one pass of max_steps, so "Epoch 0/-2" would say nothing), showing the loss read on logging
    steps only: reading it is a device sync, which the other steps are spared.
    `_get_train_description` is Lightning 2.6's own, without a public form (tests/test_compat.py)."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._loss, self._loss_step = "", -1

    @property
    def total_train_batches(self):
        # Lightning takes the optimizer steps left for batches; with accumulation each step is several
        steps_left = self.trainer.max_steps - self.trainer.global_step
        return min(self.trainer.num_training_batches, steps_left * self.trainer.accumulate_grad_batches)

    def _get_train_description(self, current_epoch: int) -> str:
        return f"{'train':{len(self.validation_description)}}"

    def get_metrics(self, trainer, pl_module):
        # called after every batch: the loss, a tensor on the device, is read only when the bar is
        # refreshed (logging steps), and shown as read until the next
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None and trainer.global_step != self._loss_step and pl_module.clock.logging_step(trainer):
            self._loss, self._loss_step = f"{float(loss):.3f}", trainer.global_step
        if getattr(self, "_loss", None):
            items["train/loss"] = self._loss
        items["step"] = str(trainer.global_step)  # a number would be shown as 500.000
        return items


class PlainLines(ProgressBar):
    """One line per logging interval, as nanoGPT and litgpt print them, from rank 0:

    step 120/500 | loss 4.2130 | lr 2.85e-03 | 8,123 tokens/s | MFU 31.2% | mem 1.23 GiB | 48 s, 2.5 min left
    step 200/500 | val loss 4.3001 | ppl 73.71 | bpb 1.7200
    """

    def __init__(self):
        super().__init__()
        self._enabled = True

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer, pl_module) -> None:
        self._started = time.perf_counter()
        self._first_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if not pl_module.clock.logging_step(trainer) or not self._show(trainer):
            return
        m = trainer.callback_metrics
        parts = [f"step {step}/{trainer.max_steps}"]
        for key, shown in (
            ("train/loss", "loss {:.4f}"),
            ("train/lr", "lr {:.2e}"),
            ("perf/tokens_per_sec", "{:,.0f} tokens/s"),
            ("perf/mfu", "MFU {:.1%}"),
            ("mem/peak_max", "mem {:.2f} GiB"),
        ):
            if key in m:
                parts.append(shown.format(float(m[key])))
        elapsed = time.perf_counter() - self._started
        left = elapsed / (step - self._first_step) * (trainer.max_steps - step)  # at this run's rate so far
        parts.append(f"{elapsed:.0f} s, {duration(left)} left")
        print(" | ".join(parts), flush=True)

    def on_validation_end(self, trainer, pl_module) -> None:
        m = trainer.callback_metrics
        if trainer.sanity_checking or "val/loss" not in m or not self._show(trainer):
            return
        parts = [f"step {trainer.global_step}/{trainer.max_steps}", f"val loss {float(m['val/loss']):.4f}"]
        if "val/ppl" in m:
            parts.append(f"ppl {float(m['val/ppl']):.2f}")
        if "val/bpb" in m:
            parts.append(f"bpb {float(m['val/bpb']):.4f}")
        print(" | ".join(parts), flush=True)

    def _show(self, trainer) -> bool:
        return self._enabled and trainer.is_global_zero
