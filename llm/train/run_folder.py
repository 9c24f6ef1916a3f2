"""The run folder: its name, the check that a new run does not reuse one by accident, and its one
writer. What goes in it:

runs/<name>/
  config.yaml      the resolved config, without secrets
  checkpoints/     step-<n>.ckpt, and last.ckpt and best.ckpt pointing at them (llm/train/saving.py)
  metrics.csv      every logged metric (CSVLogger)
  wandb/           the W&B run
  summary.json     written at the end of training (llm/train/summary.py)

Which checkpoint a run continues from is llm/train/resume.py's.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

from llm import ranks
from llm.errors import ConfigError

RUN_ENV = "LLM_RUN_DIR"  # hands the run folder to the processes a launcher starts after this one
RESUME_ENV = "LLM_RESUME_FROM"  # and the checkpoint rank 0 chose to continue from ("" for none)


def resolve_run_dir(cfg) -> Path:
    if cfg.run:
        return Path(cfg.run)
    if RUN_ENV in os.environ:
        return Path(os.environ[RUN_ENV])
    if ranks.slurm_job_id():  # a requeued job keeps its id, and so its folder
        return Path("runs") / f"{cfg.experiment}-{ranks.slurm_job_id()}"
    return Path("runs") / f"{cfg.experiment}-{time.strftime('%Y%m%d-%H%M%S')}"


def decide(cfg) -> Path:
    """Decide the run folder (cfg.run) and refuse to reuse one by accident; creates nothing."""
    named = bool(cfg.run) or RUN_ENV in os.environ or bool(ranks.slurm_job_id())
    run_dir = resolve_run_dir(cfg)
    cfg.run = str(run_dir)
    if ranks.is_first_process():
        if run_dir.exists() and not run_dir.is_dir():
            raise ConfigError(f"run={run_dir}: is a file; a run is a folder, choose another RUN")
        if holds_run(run_dir) and cfg.resume is None:
            raise ConfigError(
                f"run={run_dir}: already holds a run; continue it with RESUME=auto, or choose another RUN"
            )
        if cfg.resume == "auto" and not named:
            raise ConfigError("resume=auto: no run to continue was named; give RUN=runs/<name> as well")
        if cfg.resume not in (None, "auto") and not Path(cfg.resume).exists():
            raise ConfigError(f"resume={cfg.resume}: no such checkpoint; give a checkpoint path, or auto")
    return run_dir


WRITER_LOCK = ".writer"  # in the run folder: flock-ed by the one training that writes into it
_writer_lock = None  # its open file, held until the process ends (the kernel then releases the lock)


def holds_run(run_dir: Path) -> bool:
    return run_dir.is_dir() and any(p.name != WRITER_LOCK for p in run_dir.iterdir())


def create(options) -> Path:
    """Create the run folder (first process), become its one writer, and hand its name to the
    processes started later. Two trainings started into one folder at once both pass `decide`; the
    lock decides between them before either writes anything."""
    global _writer_lock
    run_dir = Path(options.run)
    os.environ[RUN_ENV] = str(run_dir)
    if not ranks.is_first_process():
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = open(run_dir / WRITER_LOCK, "a+")  # noqa: SIM115 (held open for the process's lifetime)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise ConfigError(
            f"run={run_dir}: another training ({holder}) writes into it now; wait for it to end, or choose another RUN"
        ) from None
    lock.truncate(0)
    lock.write(f"{socket.gethostname()} {os.getpid()}")
    lock.flush()
    _writer_lock = lock
    if options.resume is None and holds_run(run_dir):  # filled since `decide`, by a training that has ended
        raise ConfigError(f"run={run_dir}: already holds a run; continue it with RESUME=auto, or choose another RUN")
    return run_dir


def release_writer() -> None:
    global _writer_lock
    if _writer_lock is not None:
        _writer_lock.close()
        _writer_lock = None


def say(line: str) -> None:
    """Print once per job, from the first process."""
    if ranks.is_first_process():
        print(line)
