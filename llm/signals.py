"""The signals that ask a run to stop: SIGTERM (`kill`, `timeout`, `scancel`), SIGUSR1 (SLURM's
warning before a time limit) and SIGINT (Ctrl-C). One object owns them in a process:

- `python -m llm fit|prepare` installs it once and restores what was there as it ends;
- outside training (data preparation, a run starting or ending) a signal ends the command with
  one line and the status of a stop (`RunStopped`), nothing having been saved;
- while training holds them (llm/checkpointing/saving.py) the first one asks for a checkpoint at the
  end of the step, then a stop; the same signal again is ignored, another exits at once;
- DataLoader workers and a process that is requeueing its SLURM job ignore them.
"""

from __future__ import annotations

import os
import signal

from llm import ranks
from llm.errors import RunStopped

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopSignals:
    def __init__(self) -> None:
        self.received: int | None = None  # the first signal while training held them
        self.training = False
        self._previous: dict = {}

    def install(self) -> bool:
        """Handle the stop signals in this process; False where it cannot (not the main thread,
        where the thread that owns the process's signals decides)."""
        for signum in STOP_SIGNALS:
            try:
                previous = signal.signal(signum, self._handle)
            except ValueError:
                return False
            self._previous.setdefault(signum, previous)
        return True

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def restore(self) -> None:
        """Put back the handlers there were before `install`."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def hold_for_training(self) -> None:
        """From now on a signal asks for a stop at a step boundary. Installs the handlers again:
        Lightning (2.6) wraps SIGTERM as fit starts (its signal connector) in a handler of its own
        that raises SIGTERMException at its next check, before the step's checkpoint. (It leaves
        SIGUSR1 alone because a handler is there already.) tests/test_signals.py fails if
        Lightning's handler is the one in place during training."""
        self.received = None
        self.training = True
        self.install()

    def release(self) -> None:
        """Training ended: a signal ends the command again."""
        self.training = False

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if not self.training:
            stop_outside_training(name, signum)
        if self.received == signum and signum != signal.SIGINT:  # the same request, delivered again
            return
        if self.received is not None:
            os.write(2, f"\n{name}, the second stop signal: exiting now, without a checkpoint\n".encode())
            os._exit(128 + signum)
        self.received = signum
        if ranks.is_first_process():
            os.write(2, f"\n{name}: saving a checkpoint at the end of this step, then stopping\n".encode())


def stop_outside_training(name: str, signum: int) -> None:
    said = f"{name} while no training step ran: nothing was saved"
    if ranks.is_first_process():
        os.write(2, b"\n")  # the line that follows starts on its own, after a progress bar it cut short
    job = ranks.slurm_job_id() if signum == signal.SIGUSR1 else None  # SLURM's warning, before the first step
    if job:
        raise RunStopped(said, 128 + signum, requeue=job, otherwise="run the command again")
    raise RunStopped(f"{said}; run the command again", 128 + signum)


def ignore(*args) -> None:
    """Ignore the stop signals from now on (a DataLoader's worker_init_fn takes a worker id)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


STOPS = StopSignals()  # this process's
