"""The run folder: its name, what goes in it (loggers, checkpoints), resuming from it, its summary.

runs/<name>/
  config.yaml      the resolved config, without secrets
  checkpoints/     step-<n>.ckpt, and last.ckpt and best.ckpt pointing at them (llm/checkpointing.py)
  metrics.csv      every logged metric (CSVLogger)
  wandb/           the W&B run
  summary.json     written at the end of training
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import socket
import sys
import time
import zipfile
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from llm import ranks
from llm.checkpointing import Checkpoints, complete_checkpoints
from llm.errors import ConfigError
from llm.model import count_params
from llm.progress import progress_bar
from llm.redact import scrub, scrub_text

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


def check(cfg) -> Path:
    """Decide the run folder and refuse to reuse one by accident; creates nothing."""
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


def create(cfg) -> Path:
    """Create the run folder (first process), become its one writer, and hand its name to the
    processes started later. Two trainings started into one folder at once both pass `check`; the
    lock decides between them before either writes anything."""
    global _writer_lock
    run_dir = Path(cfg.run)
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
    if cfg.resume is None and holds_run(run_dir):  # filled since `check`, by a training that has ended
        raise ConfigError(f"run={run_dir}: already holds a run; continue it with RESUME=auto, or choose another RUN")
    return run_dir


def release_writer() -> None:
    global _writer_lock
    if _writer_lock is not None:
        _writer_lock.close()
        _writer_lock = None


def is_complete_checkpoint(path: Path) -> bool:
    """A whole checkpoint file (torch.save writes a zip whose directory comes last), or a DeepSpeed
    checkpoint folder whose `latest` tag names a written step."""
    if path.is_file():
        return zipfile.is_zipfile(path)
    if path.is_dir() and (path / "latest").is_file():
        return (path / (path / "latest").read_text().strip()).is_dir()
    return False


def resume_checkpoint(resume: str | None, run_dir: Path) -> str | None:
    """The checkpoint to continue from: the path given, or with `auto` the complete checkpoint of
    the highest step in the run folder (None: there is none yet). Decided once, by rank 0."""
    if resume is None:
        return None
    if resume != "auto":
        return resume
    folder = run_dir / "checkpoints"
    for path in reversed(complete_checkpoints(folder)):
        if is_complete_checkpoint(path):
            say(f"resuming from {path}")
            return str(path)
    if (run_dir / "summary.json").is_file() or not _is_run_config(run_dir / "config.yaml"):
        raise ConfigError(
            f"resume=auto: {run_dir} holds no checkpoint to continue, and files of something else than a run "
            "that stopped before its first save; choose another RUN"
        )
    say(f"resume=auto: no checkpoint in {folder} yet, starting from scratch")
    return None


def _is_run_config(path: Path) -> bool:
    """No config.yaml (the folder is new or empty), or the config of a training run."""
    if not path.exists():
        return True
    import yaml

    try:
        config = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError):
        return False
    return isinstance(config, dict) and {"model", "data", "trainer"} <= config.keys()


def check_resume(cfg, path: str) -> None:
    """Refuse, in one line, to continue a checkpoint as a run it cannot continue exactly: another
    model, world size, batch or seed; allow more (or fewer, not yet reached) steps with a warning."""
    from llm.checkpoint import read_header, verify_checkpoint

    header = read_header(path, field="resume")  # a file that is no checkpoint, or holds a payload: refused unread
    verify_checkpoint(path, field="resume")  # every other shard too, and each file against its checksums
    then, step = header["config"], header["step"]
    hint = "resume with the checkpoint's settings, or start a new RUN"
    model_then = {k: v for k, v in then["model"]["config"].items() if not k.startswith("__")}
    model_now = {k: v for k, v in vars(cfg.model.config).items() if not k.startswith("__")}
    for key in sorted(model_then.keys() | model_now.keys()):
        if model_then.get(key) != model_now.get(key):
            raise ConfigError(
                f"model.config.{key}={model_now.get(key)}: the checkpoint {path} has {model_then.get(key)}; {hint}"
            )
    from llm.data.datamodule import datamodule_args

    accumulate = "trainer.accumulate_grad_batches"
    data_then, data_now = datamodule_args(then["data"]), datamodule_args(cfg.data)
    same = [
        ("data.batch_size", data_then["batch_size"], data_now.batch_size),
        (accumulate, then["trainer"]["accumulate_grad_batches"], cfg.trainer.accumulate_grad_batches),
        ("seed_everything", then.get("seed_everything"), cfg.seed_everything),
        ("data.seed", data_then["seed"], data_now.seed),
    ]
    from llm.preflight import world_size

    world = world_size(cfg.trainer)
    if header.get("world_size") and world:
        same.append(("trainer.devices x trainer.num_nodes", header["world_size"], world))
    for key, old, new in same:
        if old != new:
            raise ConfigError(f"{key}={new}: the checkpoint {path} was trained with {old}; {hint}")
    check_resume_data(then, cfg, path)
    check_resume_optimizer(then, cfg, path)
    max_steps = cfg.trainer.max_steps
    if max_steps == step and not (Path(cfg.run) / "summary.json").is_file():
        # stopped during its final validation, after the last step's checkpoint: finish that
        say(f"the checkpoint {path} is at the last step, {step}; its validation and summary.json are still to do")
        return
    if max_steps <= step:
        raise ConfigError(
            f"trainer.max_steps={max_steps}: the checkpoint {path} has already trained {step} steps; "
            "give more steps (MAX_STEPS=) to continue it"
        )
    if max_steps != then["trainer"]["max_steps"]:
        say(
            f"warning: trainer.max_steps {then['trainer']['max_steps']} -> {max_steps}: "
            f"continuing from step {step}, the learning rate now decays to its minimum at step {max_steps}"
        )


# how Make names a data setting, for the command that continues a run on its own data
MAKE_VARIABLES = {"text": "TEXT", "hf": "HF", "tokenizer": "TOKENIZER"}


def check_resume_data(then: dict, cfg, path: str) -> None:
    """The same data and tokenizer as the checkpoint's: a resume on other text, or on the same text
    cut by another tokenizer, would continue the step count and the W&B run of a different run.
    Where the cache lies (and how many processes prepare it) may change."""
    from dataclasses import fields

    from llm.data.datamodule import datamodule_args
    from llm.data.prepare import PrepareConfig
    from llm.preflight import prepare_config

    data_then, data_now = PrepareConfig.from_data_config(datamodule_args(then["data"])), prepare_config(cfg)
    for name in (f.name for f in fields(PrepareConfig) if f.name not in ("cache_dir", "num_proc", "hf_streaming")):
        old, new = getattr(data_then, name), getattr(data_now, name)
        if old != new and old != scrub(new):  # the checkpoint's config was written scrubbed
            give = f"{MAKE_VARIABLES[name]}={old}" if name in MAKE_VARIABLES else f"ARGS=--data.{name}={old}"
            raise ConfigError(
                f"data.{name}={new}: the checkpoint {path} was trained with {old}; continue it on its own data "
                f"({give}), or start a new RUN"
            )


def check_resume_optimizer(then: dict, cfg, path: str) -> None:
    """The optimizer's settings as the checkpoint has them: its optimizer and schedule states hold
    the learning rate, warm-up, betas and decay they were built with, and a resume restores those, so
    a change here would be recorded in config.yaml and then silently not happen."""
    old_settings = then["model"].get("optimizer") or {}
    new_settings = vars(cfg.model.optimizer)
    for key in sorted(k for k in old_settings.keys() | new_settings.keys() if k != "fused" and not k.startswith("__")):
        old, new = old_settings.get(key), new_settings.get(key)
        if (list(old) if isinstance(old, list | tuple) else old) != (
            list(new) if isinstance(new, list | tuple) else new
        ):
            raise ConfigError(
                f"model.optimizer.{key}={new}: the checkpoint {path} was trained with {old}, which its optimizer "
                "state keeps on resume; resume with it, or train its weights on in a new RUN (make export, "
                "then INIT=<that folder>)"
            )


def _plain(value):
    return list(value) if isinstance(value, list | tuple) else value  # betas: a list in YAML, a tuple here


def say(line: str) -> None:
    """Print once per job, from the first process."""
    if ranks.is_first_process():
        print(line)


class ValidateAtEnd(Callback):
    """Validate (and so checkpoint) after the final step too, not only every `eval_every` steps.
    Lightning validates when a run is asked to stop, so ask at the last step."""

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= trainer.max_steps:
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
            trainer.fit_loop.epoch_loop._batches_that_stepped = trainer.global_step
            self._pending = False


class RunInfo(Callback):
    """Make every checkpoint self-contained and resumable exactly: the resolved config, the
    tokenizer, the world size, and every rank's random-number generator states."""

    def __init__(self, config: dict, data_folder: Path):
        self.config = config
        self.data_folder = Path(data_folder)
        self.start_step, self.train_seconds = 0, 0.0
        self.resumed_from: str | None = None  # set by the CLI when it resumes

    def on_train_start(self, trainer, pl_module) -> None:
        self.start_step, self._started = trainer.global_step, time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        self.train_seconds = time.perf_counter() - self._started

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["llm_config"] = self.config
        checkpoint["tokenizer_json"] = (self.data_folder / "tokenizer.json").read_text()
        checkpoint["data_meta"] = scrub(json.loads((self.data_folder / "meta.json").read_text()))
        checkpoint["world_size"] = trainer.world_size
        checkpoint["command"] = scrub_text(" ".join(["python -m llm", *sys.argv[1:]]))
        checkpoint["rng_states"] = all_ranks(trainer, rng_states())

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        states = checkpoint.get("rng_states") or []
        if len(states) == trainer.world_size:
            set_rng_states(states[trainer.global_rank])


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


def callbacks(config: dict, run_dir: Path, data_folder: Path, save_every: int, keep_last: int) -> list:
    checkpoints = Checkpoints(run_dir / "checkpoints", save_every, keep_last)
    return [checkpoints, ValidateAtEnd(), LoggingStepOnResume(), RunInfo(config, data_folder), progress_bar()]


def best_checkpoint(folder: Path) -> str | None:
    best = folder / "best.ckpt"
    return str(folder / os.readlink(best)) if best.is_symlink() else None


def strategy_label(strategy) -> str:
    """ "deepspeed zero2", "ddp", "single_device": what ran, as the user chose it."""
    from llm.strategy import preset_of

    preset = preset_of(strategy)
    if preset:
        return f"deepspeed {preset}"
    name = type(strategy).__name__.removesuffix("Strategy")  # DDP, SingleDevice, FSDP, ...
    return {"DDP": "ddp", "SingleDevice": "single_device"}.get(name, name.lower())


def tokens_per_optimizer_step(trainer: L.Trainer, datamodule) -> int:
    """Tokens in one optimizer step of the whole job: accumulation × micro batch × block × processes."""
    return trainer.accumulate_grad_batches * datamodule.batch_size * datamodule.block_size * trainer.world_size


def write_summary(trainer: L.Trainer, datamodule, model, seconds: float) -> dict:
    """summary.json: what the run did and reached; printed as well. Rank 0 writes it."""
    meta = datamodule.meta
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    tokens_per_step = tokens_per_optimizer_step(trainer, datamodule)
    checkpoints = next(c for c in trainer.callbacks if isinstance(c, Checkpoints))
    info = next(c for c in trainer.callbacks if isinstance(c, RunInfo))
    from llm.monitor import PerformanceMonitor  # imports this module

    monitor = next(c for c in trainer.callbacks if isinstance(c, PerformanceMonitor))
    session_tokens = (trainer.global_step - info.start_step) * tokens_per_step
    summary = {
        "steps": trainer.global_step,
        "tokens": trainer.global_step * tokens_per_step,
        "wall_seconds": round(seconds, 2),
        "tokens_per_second": round(session_tokens / info.train_seconds, 1) if info.train_seconds else 0.0,
        "final_train_loss": metrics.get("train/loss"),  # None when this session trained no step
        "final_val_loss": metrics.get("val/loss"),
        "unigram_val_entropy": meta["unigram_val_entropy"],
        "best_checkpoint": best_checkpoint(checkpoints.folder),
        "last_checkpoint": str(checkpoints.last_saved) if checkpoints.last_saved else info.resumed_from,
        "params": count_params(model.config),
        "world_size": trainer.world_size,
        "strategy": strategy_label(trainer.strategy),
        "precision": str(trainer.precision),
        "compile": model.compile_model,
        "compile_seconds": round(monitor.compile_seconds, 2),  # included in wall_seconds, not in perf/ metrics
        "peak_flops": monitor.peak.flops,  # of one device: MFU's denominator
        "peak_flops_source": monitor.peak.source,
        "data": scrub_text(str(datamodule.folder)),
    }
    if trainer.is_global_zero:
        run_dir = Path(trainer.default_root_dir)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        width = max(len(k) for k in summary)
        print(f"\nsummary ({run_dir / 'summary.json'}):")
        for key, value in summary.items():
            if isinstance(value, float):
                shown = f"{value:.4f}" if key.endswith(("loss", "entropy")) else f"{value:,.1f}"
                shown = f"{value:.3g}" if key == "peak_flops" else shown
            else:
                shown = f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else value
            print(f"  {key:<{width}}  {shown}")
    return summary
