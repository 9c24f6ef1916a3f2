"""A bad step does not poison the run: an optimizer step whose gradient norm is not finite (a NaN
or infinite loss, an overflow in backward) is skipped, counted as `train/skipped_steps`, and more
than `max_skipped_steps` of them in a row stop the run, with the last checkpoint (weights that no
skipped step touched) intact.

Who decides that a step is bad: the module, from the gradient norm it computes for clipping (one
value, the same on every rank after the all-reduce); DeepSpeed's engine, which checks its own
gradient buffers and skips the step itself; under fp16, the grad scaler (its skipped steps are how it
finds its scale, not faults, so they are not counted). Skipping costs no host synchronisation on a
GPU with torch's fused AdamW: the kernel takes the flag as `found_inf`, as under a grad scaler
(llm/compat.py); the counts are read at logging steps only. The module applies the skip from
Lightning's hooks (LanguageModel.configure_gradient_clipping and optimizer_step).
"""

from __future__ import annotations

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy

from llm import compat, ranks
from llm.errors import RunStopped


def skip_update_if_nonfinite(optimizer: torch.optim.Optimizer, norm: torch.Tensor) -> torch.Tensor:
    """After backward and before the update: make this step change nothing when `norm` (the global
    gradient norm) is not finite. Returns the flag, a 0-dim bool tensor on the device.

    torch's fused AdamW takes the flag as it takes a grad scaler's, on the device; any other
    optimizer skips the parameters whose gradient is None, which costs one host synchronisation to
    decide (on CPU, none to speak of)."""
    bad = ~torch.isfinite(norm)
    if optimizer.defaults.get("fused"):
        compat.skip_fused_update_if(optimizer, bad)
    elif bad.item():
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
    return bad


class NonFiniteSteps(Callback):
    """Counts skipped optimizer steps, logs them, and stops after too many in a row."""

    def __init__(self, max_in_a_row: int = 5):
        self.max_in_a_row = max_in_a_row
        self.total, self.in_a_row, self.worst = 0, 0, 0  # as of the last logging step
        # total, in a row, worst in a row: on the device, or on the host under DeepSpeed (whose engine
        # says on the host whether it skipped), so that counting never waits for the device
        self._counts = torch.zeros(3, dtype=torch.long)

    def on_train_start(self, trainer, pl_module) -> None:
        device = "cpu" if isinstance(trainer.strategy, DeepSpeedStrategy) else pl_module.device
        self._counts = torch.tensor([self.total, self.in_a_row, 0], device=device)

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if not pl_module.clock.stepped(trainer):
            return  # accumulating: no optimizer step yet
        bad = self._skipped(trainer, pl_module)
        if bad is not None:  # tensors, read on logging steps only
            counts = self._counts
            in_a_row = (counts[1] + 1) * bad
            self._counts = torch.stack([counts[0] + bad, in_a_row, torch.maximum(counts[2], in_a_row)])
        if pl_module.clock.logging_step(trainer):
            self._report(trainer, pl_module)

    def _read(self) -> list[int]:
        """The counts as numbers: a host read of the device's, once per logging step or checkpoint."""
        return [int(v) for v in self._counts.tolist()]

    @staticmethod
    def _skipped(trainer, pl_module) -> torch.Tensor | int | None:
        if isinstance(trainer.strategy, DeepSpeedStrategy):  # a Python bool: no tensor to make of it
            return int(not trainer.strategy.deepspeed_engine.was_step_applied())
        return None if pl_module.nonfinite is None else pl_module.nonfinite.long()

    def _report(self, trainer, pl_module) -> None:
        total, in_a_row, worst = self._read()
        self._counts[2] = 0
        if total > self.total:
            ranks.say(
                f"warning: step {trainer.global_step}: {total - self.total} optimizer step(s) skipped since the "
                f"last report, for a non-finite gradient norm ({total} in all)"
            )
        self.total, self.in_a_row = total, in_a_row
        pl_module.log("train/skipped_steps", float(total), on_step=True, on_epoch=False, rank_zero_only=True)
        if worst > self.max_in_a_row:
            raise RunStopped(
                f"{worst} optimizer steps in a row had a non-finite gradient norm, more than max_skipped_steps="
                f"{self.max_in_a_row}, by step {trainer.global_step}; the last checkpoint holds weights no skipped "
                "step changed; a learning rate too high needs a new RUN with a lower one (a resume keeps the "
                "optimizer's), data at fault a fix and then RESUME=auto",
                1,
            )

    def state_dict(self) -> dict:
        self.total, self.in_a_row = self._read()[:2]  # a checkpoint between logging steps: the counts as of now
        return {"total": self.total, "in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict) -> None:
        self.total, self.in_a_row = state["total"], state["in_a_row"]
