"""Which checkpoint a run continues from, and the refusal, in one line, of one it cannot continue
exactly: another model, tokens per step, seed, data or optimizer (a full-state checkpoint may
continue on another number of processes that keeps its tokens per step)."""

from __future__ import annotations

import math
import shlex
from dataclasses import asdict, fields
from pathlib import Path

from llm.checkpointing import run_folder
from llm.checkpointing.files import Checkpoint, CheckpointFolder, content_digest
from llm.config import DistillConfig, OptimizerConfig, PrepareConfig, RunConfig
from llm.errors import ConfigError
from llm.ranks import say


def resume_checkpoint(resume: str | None, run_dir: Path) -> str | None:
    """The checkpoint to continue from: the path given, or with `auto` the complete checkpoint of
    the highest step in the run folder (None: there is none yet). Decided once, by rank 0."""
    if resume is None:
        return None
    if resume != "auto":
        return resume
    folder = CheckpointFolder(run_dir / "checkpoints")
    newest = folder.newest_complete()
    if newest:
        say(f"resuming from {newest}")
        return str(newest)
    if (run_dir / "summary.json").is_file() or run_folder.contents(run_dir) == "other":
        raise ConfigError(
            f"resume=auto: {run_dir} holds no checkpoint to continue, and files of something else than a run "
            "that stopped before its first save; choose another RUN"
        )
    say(f"resume=auto: no checkpoint in {folder.path} yet, starting from scratch")
    return None


def check_resume(now: RunConfig, path: str) -> bool:
    """Refuse, in one line, to continue a checkpoint as a run it cannot continue exactly: another
    model, tokens per step, seed, data or optimizer settings; allow more (or fewer, not yet
    reached) steps with a warning. The two configs are compared field by field (llm/config.py).
    True: a DeepSpeed checkpoint that continues on another number of processes (llm/checkpointing/universal.py)."""
    checkpoint = Checkpoint(path, field="resume")
    header = checkpoint.header()  # a file that is no checkpoint, or holds a payload: refused unread
    checkpoint.verify()  # every other shard too, and each file against its checksums
    then, step = header.run_config, header.step
    hint = "resume with the checkpoint's settings, or start a new RUN"
    for key, old in asdict(then.model).items():
        new = getattr(now.model, key)
        if old != new:
            raise ConfigError(f"model.config.{key}={new}: the checkpoint {path} has {old}; {hint}")
    repartition = check_resume_step_shape(then, now, header.world_size, checkpoint)
    same = [
        ("seed_everything", then.options.seed_everything, now.options.seed_everything),
        ("data.seed", then.loader.seed, now.loader.seed),
    ]
    for key, old, new in same:
        if old != new:
            raise ConfigError(f"{key}={new}: the checkpoint {path} was trained with {old}; {hint}")
    check_resume_data(then.data, now.data, path)
    check_resume_optimizer(then.optimizer, now.optimizer, path)
    check_resume_teacher(then.distill, header.teacher_digest, now.distill, path)
    max_steps = now.trainer.max_steps
    if max_steps == step and not (now.folder / "summary.json").is_file():
        # stopped during its final validation, after the last step's checkpoint: finish that
        say(f"the checkpoint {path} is at the last step, {step}; its validation and summary.json are still to do")
        return repartition
    if max_steps <= step:
        raise ConfigError(
            f"trainer.max_steps={max_steps}: the checkpoint {path} has already trained {step} steps; "
            "give more steps (MAX_STEPS=) to continue it"
        )
    if max_steps != then.trainer.max_steps:
        # the schedule goes on from the rate it has reached (WarmupCosine.retarget): a run that had
        # finished its decay stays at the minimum
        o = now.optimizer
        then_steps = then.trainer.max_steps
        lr = (
            f"the schedule ended at step {then_steps}: the learning rate stays at its minimum, "
            f"{o.lr * o.min_lr_ratio:.3g} (lr x min_lr_ratio)"
            if step >= then_steps
            else f"the learning rate now decays to its minimum at step {max_steps}"
        )
        say(f"warning: trainer.max_steps {then_steps} -> {max_steps}: continuing from step {step}; {lr}")
    return repartition


def check_resume_step_shape(then: RunConfig, now: RunConfig, world: int | None, checkpoint: Checkpoint) -> bool:
    """The same tokens per optimizer step, however they are split: sample i of the run is drawn
    from i alone and a step's samples are the next micro-batch x accumulation x processes of them
    (llm/data/datamodule.py), so a full-state checkpoint continues exactly on another number of
    processes whose accumulation keeps the product. A DeepSpeed checkpoint is partitioned over the
    processes that wrote it: on another number of them it continues through DeepSpeed's universal
    checkpoint (True)."""
    world_now = now.world_size or world
    if not world or not world_now:
        return False
    shape = [then.trainer.accumulate_grad_batches, then.loader.batch_size, world]
    shape_now = [now.trainer.accumulate_grad_batches, now.loader.batch_size, world_now]
    if shape == shape_now:
        return False
    block, path = now.model.block_size, checkpoint.path

    def tokens(a: int, b: int, w: int) -> str:
        return f"{a * b * block * w:,} ({a} x {b} x {block} tokens x {w} processes)"

    if math.prod(shape) != math.prod(shape_now):
        raise ConfigError(
            f"tokens per step {tokens(*shape_now)}: the checkpoint {path} was trained with {tokens(*shape)}; "
            f"keep its tokens per step (--tokens_per_step={math.prod(shape) * block} derives the accumulation)"
        )
    say(f"continuing {path} as {tokens(*shape_now)}; it was trained as {tokens(*shape)}: the same samples per step")
    if checkpoint.sharded and world != world_now:
        if not now.options.deepspeed:
            raise ConfigError(
                f"deepspeed=: the checkpoint {path} is DeepSpeed's, partitioned for {world} processes; continue it "
                f"with DeepSpeed (DS={then.options.deepspeed}) to re-partition it for {world_now}"
            )
        return True
    return False


# how Make names a data setting, for the command that continues a run on its own data
MAKE_VARIABLES = {"text": "TEXT", "hf": "HF", "tokenizer": "TOKENIZER"}


def check_resume_data(then: PrepareConfig, now: PrepareConfig, path: str) -> None:
    """The same data and tokenizer as the checkpoint's: a resume on other text, or on the same text
    cut by another tokenizer, would continue the step count and the W&B run of a different run.
    Where the cache lies (and how many processes prepare it) may change."""
    name = now.first_difference(then)
    if name:
        old, new = getattr(then, name), getattr(now, name)
        give = f"{MAKE_VARIABLES[name]}={old}" if name in MAKE_VARIABLES else f"ARGS=--data.{name}={old}"
        raise ConfigError(
            f"data.{name}={new}: the checkpoint {path} was trained with {old}; continue it on its own data "
            f"({give}), or start a new RUN"
        )


def check_resume_teacher(then: DistillConfig, digest: str | None, now: DistillConfig, path: str) -> None:
    """A distillation continues with the teacher it was distilled from (the same contents, wherever
    they lie now) and the same weighting of it; a plain run continues without one. Otherwise the
    loss it minimises would change at the resume without a word."""
    if then.teacher and not now.teacher:
        raise ConfigError(
            f"distill.teacher=None: the checkpoint {path} was distilled from {then.teacher}; continue it with that "
            f"teacher (make distill TEACHER={shlex.quote(then.teacher)} ... RESUME=auto), or start a new RUN"
        )
    if now.teacher and not then.teacher:
        raise ConfigError(
            f"distill.teacher={now.teacher}: the checkpoint {path} was trained without a teacher; distill in a new "
            "RUN (INIT= the make export of this one starts the student from its weights)"
        )
    if not now.teacher:
        return
    if (digest and content_digest(now.teacher, "distill.teacher") != digest) or (
        not digest and now.teacher != then.teacher
    ):
        raise ConfigError(
            f"distill.teacher={now.teacher}: not the teacher the checkpoint {path} was distilled from "
            f"({then.teacher}, as it was then); resume with that teacher, or start a new RUN"
        )
    for name in ("alpha", "temperature", "until"):
        old, new = getattr(then, name), getattr(now, name)
        if old != new:
            raise ConfigError(
                f"distill.{name}={new}: the checkpoint {path} was distilled with {old}; resume with it, or start a "
                "new RUN"
            )


def check_resume_optimizer(then: OptimizerConfig, now: OptimizerConfig, path: str) -> None:
    """The optimizer's settings as the checkpoint has them: its optimizer and schedule states hold
    the learning rate, warm-up, betas and decay they were built with, and a resume restores those, so
    a change here would be recorded in config.yaml and then silently not happen. Whether the kernel is
    fused may change."""
    for name in (f.name for f in fields(OptimizerConfig) if f.name != "fused"):
        old, new = getattr(then, name), getattr(now, name)
        if old != new:
            raise ConfigError(
                f"model.optimizer.{name}={new}: the checkpoint {path} was trained with {old}, which its optimizer "
                "state keeps on resume; resume with it, or train its weights on in a new RUN (make export, "
                "then INIT=<that folder>)"
            )
