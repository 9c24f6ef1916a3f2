"""When and how training writes checkpoints, so that a kill at any moment leaves one to continue
from. Their layout (step names, `last`, `best`) is llm/checkpointing/files.py's CheckpointFolder.

A save is written under `<name>.partial` by every rank that holds a part of it, and renamed to its
final name by rank 0 once all have finished: a name without the suffix is a complete checkpoint.
RESUME=auto takes the one with the highest step (llm/checkpointing/resume.py). The previous checkpoints are removed
only after the new one is complete.

Saves happen every `save_every` optimizer steps, once `save_every_minutes` have passed since the
last one (the ranks agree: the slowest clock decides), at the last step, when training ends early, and
when the job is asked to stop: SIGTERM, SIGINT (Ctrl-C) or SIGUSR1 (SLURM's warning before a time
limit) saves at the next step boundary and stops with status 128 + the signal; under SLURM, SIGUSR1 also requeues the
job (`scontrol requeue`), which then resumes from that checkpoint. A second signal exits at once, unless it
repeats the first one's SIGTERM or SIGUSR1: SLURM delivers those along more than one path (to the job
step, and SIGUSR1 again from the batch shell, which hands it on: scripts/slurm/train.sbatch).
"""

from __future__ import annotations

import math
import os
import signal
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Checkpoint

from llm import ranks
from llm.checkpointing.files import CheckpointFolder, remove
from llm.errors import RunStopped
from llm.launch.commands import continue_command
from llm.signals import STOPS

PARTIAL = ".partial"


def sync_to_disk(path: Path) -> None:
    """fsync every file of a checkpoint, so that the rename that publishes it cannot reach the disk
    before its contents do (a host crash right after the rename would leave a named, empty file)."""
    for file in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
        with open(file, "rb") as f:
            os.fsync(f.fileno())


class Checkpoints(Checkpoint):
    """Step checkpoints, written atomically, with `last` and `best` links; stops on a signal."""

    def __init__(self, folder: CheckpointFolder, save_every: int, keep_last: int, every_minutes: float | None = None):
        self.folder, self.save_every, self.keep_last = folder, save_every, keep_last
        self.every_seconds = every_minutes * 60 if every_minutes else None
        self.save_seconds: list[float] = []  # how long each save of this session took (perf/save_seconds)
        self._last_save = time.monotonic()
        self.signals = STOPS  # the process's (llm/signals.py)
        self.last_saved: Path | None = None
        self._installed_here = False
        self._saved_step = -1
        self._stop_pending = 0
        self._best: dict | None = None  # the lowest validation loss so far and its step, alike on every rank
        self._control: torch.distributed.ProcessGroup | None = (
            None  # the process group the stop requests are agreed over (several processes)
        )

    # --- when ----------------------------------------------------------------------------------

    def setup(self, trainer, pl_module, stage: str) -> None:
        # where the entry point has not installed them (a Trainer built by hand, in a script or a
        # test), before Lightning's own handlers: it then leaves SIGUSR1 alone (no mid-step SLURM save)
        self._installed_here = not self.signals.installed and self.signals.install()
        # the ranks agree on a stop at every optimizer step over a CPU (gloo) group: a reduction on
        # the accelerator, read back, would make the host wait for every kernel queued so far. Made
        # here, on every rank in the same order, before the strategy makes its own groups; given the
        # collective timeout with the others (llm/launch/collectives.py)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed and trainer.world_size > 1 and self._control is None:
            on_host = torch.distributed.get_backend() == "gloo"
            self._control = torch.distributed.group.WORLD if on_host else torch.distributed.new_group(backend="gloo")
        # every rank reads the best so far once, before rank 0 can change the file; from then on each
        # keeps it in memory. Deciding from the file at each validation made the ranks disagree when
        # rank 0 had already written this step's best: one waited at the barrier below, the other
        # trained on, and the job hung (until the collective timeout)
        self._best = self.folder.best()

    def on_train_start(self, trainer, pl_module) -> None:
        self.signals.hold_for_training()
        self._last_save = time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if not pl_module.clock.stepped(trainer):  # a micro-batch that accumulated; no optimizer step yet
            return
        step = trainer.global_step
        received, due = self._requested(trainer)
        if step % self.save_every == 0 or pl_module.clock.last_step(trainer) or received or due:
            self.save(trainer)
        if received and step < trainer.max_steps:
            self._stop_pending = received  # at the next batch: this step's metrics reach the logs first

    def on_train_batch_start(self, trainer, pl_module, *args) -> None:
        if self._stop_pending:
            self._stop(trainer, self._stop_pending)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or "val/loss" not in trainer.callback_metrics:
            return
        loss = float(trainer.callback_metrics["val/loss"])  # the same on every rank (synchronised)
        if not math.isfinite(loss):
            return  # a NaN is never the best, and nothing is lower than it
        if self._best is None or loss < self._best["val_loss"]:
            self._best = {"step": trainer.global_step, "val_loss": loss}
            path = self.save(trainer)  # already saved at this step, unless save_every skips it
            if trainer.is_global_zero:
                self.folder.mark_best(path, self._best)
                self._prune()  # the best one before it was kept as best: now it is only an old one
            trainer.strategy.barrier("best checkpoint")

    def on_train_end(self, trainer, pl_module) -> None:
        self.save(trainer)  # training ended early (a callback stopped it): keep where it got to
        self._release()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._release()

    def _release(self) -> None:
        self.signals.release()
        if self._installed_here:
            self.signals.restore()

    def _requested(self, trainer) -> tuple[int, bool]:
        """The signal any rank received (0: none), and whether a save is due by time on any rank:
        the same answers on every rank, from one reduction."""
        due = self.every_seconds is not None and time.monotonic() - self._last_save >= self.every_seconds
        if trainer.world_size == 1:
            return self.signals.received or 0, due
        if self._control is None:  # no process group of our own to agree over: the strategy's
            mine = torch.tensor([self.signals.received or 0, int(due)], device=trainer.strategy.root_device)
            received, due = trainer.strategy.reduce(mine, reduce_op="max").tolist()
            return int(received), bool(due)
        mine = torch.tensor([self.signals.received or 0, int(due)])  # on the host, as the group is
        torch.distributed.all_reduce(mine, op=torch.distributed.ReduceOp.MAX, group=self._control)
        received, due = mine.tolist()
        return int(received), bool(due)

    def _stop(self, trainer, signum: int) -> None:
        name = signal.Signals(signum).name
        said = f"{name} at step {trainer.global_step}; saved {self.last_saved}"
        resume = resume_command(trainer)
        job = ranks.slurm_job_id()
        if signum == signal.SIGUSR1 and job:  # SLURM's warning: queue the job again, then end this one
            raise RunStopped(said, 128 + signum, requeue=job, otherwise=resume)
        raise RunStopped(f"{said}; {resume}", 128 + signum)

    # --- how -----------------------------------------------------------------------------------

    def save(self, trainer) -> Path:
        """Write step-<global step>.ckpt (once per step) and make it the last checkpoint."""
        step = trainer.global_step
        final = self.folder.step_path(step)
        if step == self._saved_step:
            return final
        started = time.perf_counter()
        partial = final.with_name(final.name + PARTIAL)
        if trainer.is_global_zero:
            self.folder.path.mkdir(parents=True, exist_ok=True)
            for stale in self.folder.path.glob(f"*{PARTIAL}"):  # left by a save that was killed
                remove(stale)
        trainer.strategy.barrier("checkpoint start")
        try:
            trainer.save_checkpoint(partial, weights_only=False)  # every rank writes its part, then a barrier
            if trainer.is_global_zero:
                sync_to_disk(partial)
                remove(final)  # an older save of this step, from a run resumed before it
                os.replace(partial, final)
                self.folder.mark_last(final)
                self._prune()
                for logger in trainer.loggers:  # metrics.csv up to here, so that a kill loses no row of it
                    logger.save()
        except OSError as exc:
            if trainer.is_global_zero:
                remove(partial)
            previous = self.last_saved or "none yet"
            raise RunStopped(
                f"checkpoint {final}: {exc.strerror or exc} while saving; the previous checkpoint ({previous}) "
                f"is intact; free space in {self.folder.path} and continue with RESUME=auto",
                1,
            ) from exc
        trainer.strategy.barrier("checkpoint done")
        self._saved_step, self.last_saved = step, final
        seconds = time.perf_counter() - started
        self.save_seconds.append(seconds)
        self._last_save = time.monotonic()
        for logger in trainer.loggers:  # in the row of the step it saved, in Lightning's count (from 0)
            logger.log_metrics({"perf/save_seconds": seconds}, step=max(step - 1, 0))
        return final

    def _prune(self) -> None:
        self.folder.prune(self.keep_last, keep=self.folder.step_path(self._best["step"]) if self._best else None)


def resume_command(trainer) -> str:
    """The command that continues this run (launch.commands.continue_command)."""
    teacher = getattr(getattr(trainer.lightning_module, "distill", None), "teacher", None)
    return continue_command(trainer.default_root_dir, teacher, trainer.max_steps)
