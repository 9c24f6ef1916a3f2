"""The run folder: its name, the check that a new run does not reuse one by accident, and its one
writer. What goes in it:

runs/<name>/
  config.yaml      the resolved config, without secrets
  checkpoints/     step-<n>.ckpt, and last.ckpt and best.ckpt pointing at them (llm/checkpointing/saving.py)
  metrics.csv      every logged metric (CSVLogger)
  wandb/           the W&B run
  summary.json     written at the end of training (llm/observe/summary.py)

Which checkpoint a run continues from is llm/checkpointing/resume.py's.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

from llm import handoff, ranks
from llm.config import RunOptions
from llm.errors import ConfigError


def resolve_run_dir(options: RunOptions) -> Path:
    if options.run:
        return Path(options.run)
    given = handoff.received(handoff.RUN_DIR)
    if given:
        return Path(given)
    if ranks.slurm_job_id():  # a requeued job keeps its id, and so its folder
        return Path("runs") / f"{options.experiment}-{ranks.slurm_job_id()}"
    return Path("runs") / f"{options.experiment}-{time.strftime('%Y%m%d-%H%M%S')}"


def decide(options: RunOptions) -> Path:
    """The run folder (options.run, else named by the experiment), refused where a new run would
    reuse one by accident; creates nothing."""
    named = bool(options.run) or handoff.received(handoff.RUN_DIR) is not None or bool(ranks.slurm_job_id())
    run_dir = resolve_run_dir(options)
    if ranks.is_first_process():
        if run_dir.exists() and not run_dir.is_dir():
            raise ConfigError(f"run={run_dir}: is a file; a run is a folder, choose another RUN")
        resume = options.resume
        if resume is None:
            refuse_taken(run_dir)
        if resume == "auto" and not named:
            raise ConfigError("resume=auto: no run to continue was named; give RUN=runs/<name> as well")
        if resume not in (None, "auto") and not Path(resume).exists():
            raise ConfigError(f"resume={resume}: no such checkpoint; give a checkpoint path, or auto")
    return run_dir


def refuse_taken(run_dir: Path) -> None:
    """A new run goes into a new or empty folder, or one that a start which never trained a step left
    behind (its config.yaml and W&B files: a refused or crashed start must not block the next)."""
    kind = contents(run_dir)
    if kind == "run":
        raise ConfigError(f"run={run_dir}: already holds a run; continue it with RESUME=auto, or choose another RUN")
    if kind == "other":
        names = sorted(p.name for p in run_dir.iterdir() if p.name not in RUN_FILES)
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise ConfigError(
            f"run={run_dir}: a folder of other files ({shown}), not a run's; a run goes into a new or empty "
            "folder: choose another RUN, e.g. runs/<name>"
        )


# what a run writes into its folder; a start that ends before its first logged step leaves only START_FILES
RUN_FILES = {".writer", "config.yaml", "config.yaml.tmp", "wandb", "checkpoints", "metrics.csv", "summary.json", "eval"}
START_FILES = {".writer", "config.yaml", "config.yaml.tmp", "wandb", "checkpoints"}


def contents(run_dir: Path) -> str:
    """What a folder holds: "empty" (or missing), "started" (what a start that never trained a step
    leaves: its config.yaml, W&B's files, an empty checkpoints/), "run" (a run's work: a checkpoint,
    metrics or a summary) or "other" (files that no run wrote)."""
    if not run_dir.is_dir():
        return "empty"
    names = {p.name for p in run_dir.iterdir()}
    checkpoints = run_dir / "checkpoints"
    if names & {"metrics.csv", "summary.json"} or (checkpoints.is_dir() and any(checkpoints.iterdir())):
        return "run"
    if names - START_FILES or ("config.yaml" in names and not is_run_config(run_dir / "config.yaml")):
        return "other"
    return "started" if names - {WRITER_LOCK} else "empty"


def is_run_config(path: Path) -> bool:
    """No config.yaml (the folder is new or empty), or the config of a training run."""
    if not path.exists():
        return True
    import yaml

    try:
        config = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError, OSError):
        return False
    return isinstance(config, dict) and {"model", "data", "trainer"} <= config.keys()


WRITER_LOCK = ".writer"  # in the run folder: flock-ed by the one training that writes into it
_writer_lock = None  # its open file, held until the process ends (the kernel then releases the lock)


def create(options) -> Path:
    """Create the run folder (first process), become its one writer, and hand its name to the
    processes started later. Two trainings started into one folder at once both pass `decide`; the
    lock decides between them before either writes anything."""
    global _writer_lock
    run_dir = Path(options.run)
    handoff.hand_on(handoff.RUN_DIR, str(run_dir))
    if not ranks.is_first_process():
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = open(run_dir / WRITER_LOCK, "a+")  # held open for the process's lifetime
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
    if options.resume is None:  # filled since `decide`, by a training that has ended
        refuse_taken(run_dir)
    return run_dir


def release_writer() -> None:
    global _writer_lock
    if _writer_lock is not None:
        _writer_lock.close()
        _writer_lock = None
