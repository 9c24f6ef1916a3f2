"""The step clock: one answer, for the module and every callback of a run, to "did this micro-batch
end an optimizer step?", "is that a logging step?" and "is it the last?".

Lightning calls `on_train_batch_end` after every micro-batch; with gradient accumulation most of them
end no optimizer step, and `trainer.global_step` (optimizer steps done) moves only when one does. The
module notes the step count as each micro-batch starts (its `on_train_batch_start` runs after every
callback's and before the forward pass), so at the batch's end any callback can tell, in whatever
order Lightning calls them, whether the count moved.

Steps are counted from 1, as the console and metrics.csv count them. Lightning logs every
`log_every_n_steps` steps and at the step a run is asked to stop, which the last one is
(callbacks.ValidateAtEnd): `is_logging_step` is that rule.
"""

from __future__ import annotations


def is_logging_step(step: int, every: int, max_steps: int) -> bool:
    """Optimizer step `step` (from 1) is one whose metrics are logged: every `every`, and the last."""
    return step % every == 0 or step >= max_steps


class StepClock:
    """The module's record of the step count at the start of the micro-batch under way."""

    def __init__(self):
        self._at_batch_start: int | None = None

    def batch_start(self, trainer) -> None:
        self._at_batch_start = trainer.global_step

    def stepped(self, trainer) -> bool:
        """At a batch's end: it ended an optimizer step (accumulation done, the optimizer ran or skipped)."""
        return self._at_batch_start is not None and trainer.global_step != self._at_batch_start

    def logging_step(self, trainer) -> bool:
        """At a batch's end: it ended an optimizer step whose metrics are logged."""
        return self.stepped(trainer) and is_logging_step(
            trainer.global_step, trainer.log_every_n_steps, trainer.max_steps
        )

    def last_step(self, trainer) -> bool:
        """At a batch's end: it ended the run's last optimizer step."""
        return self.stepped(trainer) and trainer.global_step >= trainer.max_steps

    @staticmethod
    def logging_step_under_way(trainer) -> bool:
        """During a micro-batch (forward, backward): the optimizer step it is part of will be logged."""
        return is_logging_step(trainer.global_step + 1, trainer.log_every_n_steps, trainer.max_steps)
