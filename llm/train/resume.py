"""Which checkpoint a run continues from, and the refusal, in one line, of one it cannot continue
exactly: another model, world size, batch, seed, data or optimizer."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from llm.checkpoint import is_complete, read_header, verify_checkpoint
from llm.config import CHECKPOINT_FORMAT, model_config_of
from llm.data.datamodule import datamodule_args
from llm.data.prepare import PrepareConfig
from llm.errors import ConfigError
from llm.redact import scrub
from llm.train.preflight import prepare_config, world_size
from llm.train.run_folder import say
from llm.train.saving import step_checkpoints


def resume_checkpoint(resume: str | None, run_dir: Path) -> str | None:
    """The checkpoint to continue from: the path given, or with `auto` the complete checkpoint of
    the highest step in the run folder (None: there is none yet). Decided once, by rank 0."""
    if resume is None:
        return None
    if resume != "auto":
        return resume
    folder = run_dir / "checkpoints"
    for path in reversed(step_checkpoints(folder)):
        if is_complete(path):
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
    header = read_header(path, field="resume")  # a file that is no checkpoint, or holds a payload: refused unread
    verify_checkpoint(path, field="resume")  # every other shard too, and each file against its checksums
    then, step = header["config"], header["step"]
    hint = "resume with the checkpoint's settings, or start a new RUN"
    if header["format"] < CHECKPOINT_FORMAT:
        raise ConfigError(
            f"resume={path}: written by llm 0.1.0, whose learning-rate schedule this version cannot continue; "
            "start a new RUN (INIT= from its make export starts from its weights)"
        )
    model_then = asdict(model_config_of(then["model"]["config"]))
    model_now = asdict(model_config_of(vars(cfg.model.config)))
    for key in sorted(model_then.keys() | model_now.keys()):
        if model_then.get(key) != model_now.get(key):
            raise ConfigError(
                f"model.config.{key}={model_now.get(key)}: the checkpoint {path} has {model_then.get(key)}; {hint}"
            )
    accumulate = "trainer.accumulate_grad_batches"
    data_then, data_now = datamodule_args(then["data"]), datamodule_args(cfg.data)
    same = [
        ("data.batch_size", data_then["batch_size"], data_now.batch_size),
        (accumulate, then["trainer"]["accumulate_grad_batches"], cfg.trainer.accumulate_grad_batches),
        ("seed_everything", then.get("seed_everything"), cfg.seed_everything),
        ("data.seed", data_then["seed"], data_now.seed),
    ]
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
