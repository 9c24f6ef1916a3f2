"""The run's own Lightning callbacks that bend Lightning's epoch loop into a step loop (validate at
the last step, log resumed steps under their own number), and the whole set a training run uses,
in order (`run_callbacks`: `make train` and `make bench` alike)."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.callbacks import Callback

from llm import compat
from llm.checkpointing.run_info import RunInfo
from llm.checkpointing.saving import Checkpoints
from llm.config import RunOptions
from llm.launch.collectives import CollectiveTimeout
from llm.observe.monitor import PerformanceMonitor
from llm.observe.progress import progress_bar
from llm.train.guards import NonFiniteSteps
from llm.train.in_loop_eval import InLoopBenchmarks


def run_callbacks(
    monitor: PerformanceMonitor,
    checkpoints: Checkpoints,
    run_info: RunInfo,
    options: RunOptions,
    run_dir: Path | None = None,
) -> list[Callback]:
    """Every callback of a training run besides the user's (which come first), in the order Lightning
    calls them: the monitor before the progress lines, so that a logging step's line shows what it
    has just measured. Lightning moves every `Checkpoint` subclass to the end of the list, wherever
    it is given, so Checkpoints runs last: a validation is printed and recorded (RunInfo) before its
    checkpoint is written. With --eval_tasks= the benchmarks (scored into `run_dir`'s eval/) come
    after the monitor, whose validation row then carries the tokens they are charted against.
    Whether a batch ended an optimizer step does not depend on this order (llm/train/clock.py).
    tests/test_train.py checks the order a run gets."""
    benchmarks = [InLoopBenchmarks(options, run_dir)] if options.eval_tasks and run_dir else []
    return [
        monitor,
        *benchmarks,
        NonFiniteSteps(options.max_skipped_steps),
        CollectiveTimeout(options.collective_timeout),
        ValidateAtEnd(),
        LoggingStepOnResume(),
        run_info,
        progress_bar(),
        checkpoints,  # where Lightning would put it anyway
    ]


class ValidateAtEnd(Callback):
    """Validate (and so checkpoint) after the final step too, not only every `eval_every` steps.
    Lightning validates when a run is asked to stop, so ask at the last step."""

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if pl_module.clock.last_step(trainer):
            trainer.should_stop = True


class LoggingStepOnResume(Callback):
    """Lightning (2.6) restores the step it logs under off by one from the global step when the
    checkpoint was written at a validation (behind, or ahead with DeepSpeed), so a resumed run would
    log step n under n-1 or n+1 and overwrite or skip a row of metrics.csv. With one optimizer the
    two counters are equal by definition: make them so at the first batch, after Lightning's own
    restart bookkeeping."""

    def on_train_start(self, trainer, pl_module) -> None:
        self._pending = True

    def on_train_batch_start(self, trainer, *args) -> None:
        if self._pending:
            compat.set_logging_step(trainer, trainer.global_step)
            self._pending = False
