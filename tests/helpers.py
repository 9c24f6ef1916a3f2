"""Callbacks that tests pass to the real entry point with --trainer.callbacks."""

from lightning.pytorch.callbacks import Callback


class StopAtStep(Callback):
    """Stop a run after `step` optimizer steps, as a preempted job would, though its max_steps is larger."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True
