"""Every input checked before anything expensive starts, and the values derived from them.

Each bad input raises ConfigError with one line that names the field, the value and the fix.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import torch

from llm import ranks
from llm.checkpointing import run_folder
from llm.config import PRECISION_DTYPES, PrepareConfig, RunConfig, TrainerConfig, device_count
from llm.data.prepare import load_meta, prepare, prepared_dir
from llm.data.sources import resolve_source
from llm.data.tokenizer import tokenizer_vocab_size
from llm.errors import ConfigError
from llm.hf import check_weights, from_hf_config, read_config, refuse_quantized
from llm.launch.agreement import nodes_from_torchrun
from llm.launch.commands import available_devices
from llm.model import ModelConfig, count_params
from llm.preflight import autosize, teacher
from llm.preflight.presets import load_preset
from llm.redact import scrub_text
from llm.wandb_settings import wandb_entity, wandb_project

# what Lightning reads as devices in a string besides a count and "auto": -1 (all), or indices "0,1"
DEVICE_LIST = re.compile(r"\s*-1\s*|\s*\d+\s*(,\s*\d+\s*)+,?\s*|\s*\d+\s*,\s*")
PRECISIONS = tuple(PRECISION_DTYPES)


def round_up(n: int, multiple: int = 64) -> int:
    return -(-n // multiple) * multiple


def parse(parsed: Mapping) -> RunConfig:
    """The typed config of a parsed command line (its dict); a model config that cannot be names its field."""
    try:
        return RunConfig.from_dict(parsed)
    except ValueError as exc:  # a ModelConfig that cannot be: a field named
        raise ConfigError(f"model.config.{exc}") from exc


def resolve(parsed: Mapping, command: str, sizes: dict | None = None) -> RunConfig:
    """The run's config with what the command line leaves to the inputs and the hardware filled in,
    so that config.yaml says what runs: INIT='s architecture, the vocabulary size, the precision,
    compile and fused AdamW, DS=auto's preset and batch_size=auto's micro-batch (`sizes`: rank 0's,
    on the other ranks), the accumulation, the run folder. `parsed` (the parsed command line as a
    dict) is left as it is; the parts of the run are built from what this returns, which `check` reads."""
    run = parse(parsed)
    if command == "prepare":
        return with_vocab_size(run)
    if (interval := parsed["trainer"].get("val_check_interval")) is not None:
        raise ConfigError(
            f"trainer.val_check_interval={interval}: a run validates every eval_every optimizer steps; "
            "give eval_every instead"
        )
    if (nodes := nodes_from_torchrun()) is not None:  # an elastic job's, this round's
        run = replace(run, trainer=replace(run.trainer, num_nodes=nodes))
    if run.init:
        run = replace(run, model=architecture_of(run.init, run))
    if tokenizer := teacher.tokenizer_file(run):  # a transformers-folder teacher brings its tokenizer
        run = replace(run, data=replace(run.data, tokenizer=tokenizer))
    run = with_vocab_size(run)
    on_gpu = uses_gpu(run.trainer)
    if run.trainer.precision is None:
        run = replace(run, trainer=replace(run.trainer, precision="bf16-mixed" if on_gpu else "32-true"))
    run = with_speed_options(run, on_gpu)
    if choice := autosize.choose(run, on_gpu, sizes):
        options = replace(run.options, deepspeed=choice["deepspeed"])
        run = replace(run, options=options, loader=replace(run.loader, batch_size=choice["batch_size"]))
    if run.options.tokens_per_step is not None:
        run = replace(run, trainer=replace(run.trainer, accumulate_grad_batches=derived_accumulation(run)))
    # the run folder, refused where a new run would reuse one by accident
    return replace(run, options=replace(run.options, run=str(run_folder.decide(run.options))))


def with_vocab_size(run: RunConfig) -> RunConfig:
    """model.config.vocab_size=null: the data's vocabulary, rounded up to a multiple of 64, which makes
    the embedding and output matmuls faster (the extra rows are never used)."""
    if run.model.vocab_size is not None:
        return run
    return replace(run, model=replace(run.model, vocab_size=round_up(data_vocab_size(run.data))))


def derived_accumulation(run: RunConfig) -> int:
    """--tokens_per_step: the run's invariant. The accumulation is what makes the world size's
    micro-batches add up to it, so that a run on 8 GPUs and one on 6 (or a resume on either) take
    the same optimizer steps; refused in one line, with the nearest settings, where none does."""
    tokens, batch, block = run.options.tokens_per_step or 0, run.loader.batch_size, run.model.block_size
    world = autosize.world_of(run.trainer, uses_gpu(run.trainer))[0]
    given = run.trainer.accumulate_grad_batches
    if batch < 1 or block < 1:
        return given  # check_ranges names the field
    if tokens < 1:
        raise ConfigError(f"tokens_per_step={tokens}: out of range; use a positive number of tokens, e.g. 524288")
    micro = batch * block * world
    if tokens % micro:
        below, above = tokens // micro * micro, (tokens // micro + 1) * micro
        fits = [b for b in range(batch - 1, 0, -1) if tokens % (b * block * world) == 0]
        nearest = f"tokens_per_step={below:,} or {above:,}" if below else f"tokens_per_step={above:,}"
        raise ConfigError(
            f"tokens_per_step={tokens}: not a whole number of micro-batches of {batch} x {block} tokens x {world} "
            f"processes ({micro:,} tokens); use {nearest}" + (f", or data.batch_size={fits[0]}" if fits else "")
        )
    derived = tokens // micro
    if given not in (None, 1, derived):
        raise ConfigError(
            f"trainer.accumulate_grad_batches={given}: tokens_per_step={tokens:,} derives {derived} for {world} "
            "processes; give one of the two (tokens_per_step=null to set the accumulation by hand)"
        )
    return derived


def data_vocab_size(data: PrepareConfig) -> int:
    """The tokens the data will have: the tokenizer's, or the BPE's to be trained."""
    return tokenizer_vocab_size(data.tokenizer, data.eot_token) if data.tokenizer else data.vocab_size


def check(run: RunConfig, command: str, logger=None) -> None:
    """Every input of a resolved config checked, before anything expensive; nothing is changed.
    `logger`: the config's trainer.logger, which is not part of the run's config."""
    data, model = run.data, run.model
    data.check()
    resolve_source(data.text, data.hf)  # the input exists
    vocab = data_vocab_size(data)
    if (model.vocab_size or 0) < vocab:  # resolve sets it (null: the tokenizer's, rounded up)
        source = f"data.tokenizer={data.tokenizer}" if data.tokenizer else f"data.vocab_size={data.vocab_size}"
        if run.init:
            raise ConfigError(
                f"model.init={run.init}: its vocabulary of {model.vocab_size} is smaller than the tokenizer's "
                f"{vocab} tokens ({source}); train with the tokenizer it was trained with (TOKENIZER=)"
            )
        raise ConfigError(
            f"model.config.vocab_size={model.vocab_size} is smaller than the tokenizer's {vocab} tokens ({source}); "
            f"set model.config.vocab_size to at least {vocab}, or null to follow the tokenizer"
        )
    if command == "prepare":
        return
    check_trainer(run.trainer)
    check_loggers(logger)
    check_wandb_names(run.options)
    options = run.options
    if not options.collective_timeout > 0:
        raise ConfigError(
            f"collective_timeout={options.collective_timeout}: must be a positive number of seconds, e.g. 600"
        )
    check_ranges(run)
    check_schedule(run)
    check_disk(run)
    check_fused(run)
    check_float8(run.float8, run.float8_emulate, uses_gpu(run.trainer))
    teacher.check(run)
    if options.deepspeed:
        load_preset(options.deepspeed, options.nvme_path)  # an unknown preset, offload it cannot do, a bad NVMe path


def check_loggers(logger) -> None:
    """trainer.logger in a YAML: loggers there are added to the run's own (metrics.csv and W&B,
    which the run folder, `make plot` and resuming rely on); turning logging off is refused."""
    if logger is False:
        raise ConfigError(
            "trainer.logger=false: a run always writes metrics.csv and a W&B run (offline without a key); "
            "remove it, and set WANDB_MODE=disabled to leave W&B out"
        )


def check_wandb_names(options) -> None:
    """A W&B project or entity shaped like a secret (an API key pasted in the wrong place) would
    leave the machine with every sync, in the clear: W&B's own files keep the name as given."""
    for name, value in (
        ("wandb_project", wandb_project(options.wandb_project)),
        ("wandb_entity", wandb_entity(options.wandb_entity)),
    ):
        if value and scrub_text(value) != value:
            source = f"{name}=" if getattr(options, name) else f"WANDB_{name.split('_')[1].upper()}="
            raise ConfigError(
                f"{source}{scrub_text(value)}: shaped like a secret (an API key or token), which W&B would send "
                "with every sync; give the W&B project's or team's name, and the key in WANDB_API_KEY"
            )


def extra_loggers(logger) -> list:
    """The instantiated trainer.logger of the config (none, one or a list), added to the run's own."""
    if logger in (None, True):
        return []
    return list(logger) if isinstance(logger, list | tuple) else [logger]


def architecture_of(folder: str, run: RunConfig) -> ModelConfig:
    """INIT=: the model's architecture is the folder's (its config.json), whatever MODEL= says; the
    dropout stays the config's (training's choice, not the architecture's)."""
    if not Path(folder).is_dir():
        raise ConfigError(f"model.init={folder}: no such folder; give a Hugging Face model folder (GPT-2 or Llama)")
    raw = read_config(Path(folder), "model.init")
    refuse_quantized(raw, folder, "model.init")
    config = from_hf_config(raw, f"model.init={folder}")
    check_weights(folder, config, "model.init")
    deepspeed, nvme = run.options.deepspeed, run.options.nvme_path
    if deepspeed not in (None, "auto") and load_preset(deepspeed, nvme).get("zero_optimization", {}).get("stage") == 3:
        raise ConfigError(f"model.init={folder}: starting from weights under ZeRO-3 is not supported; use zero2")
    return replace(config, dropout=run.model.dropout)


def uses_gpu(trainer) -> bool:
    return torch.cuda.is_available() and trainer.accelerator in ("auto", "gpu", "cuda")


def check_trainer(trainer: TrainerConfig) -> None:
    if trainer.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator={trainer.accelerator}: no GPU is visible here; use auto or cpu")
    on_gpu = uses_gpu(trainer)
    precision = str(trainer.precision)
    if precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision={precision}: unknown; use one of {', '.join(PRECISIONS)}")
    if precision == "16-mixed" and not on_gpu:
        raise ConfigError(
            "trainer.precision=16-mixed: fp16 mixed precision needs a GPU; on CPU use 32-true or bf16-mixed"
        )
    count = device_count(trainer.devices)
    devices = trainer.devices if count is None else count
    if isinstance(devices, str) and devices != "auto" and not (on_gpu and DEVICE_LIST.fullmatch(devices)):
        raise ConfigError(
            f"trainer.devices={devices}: not a number of devices; give a whole number (DEVICES=2) or auto"
            + (", -1 (every GPU) or GPU indices such as 0,1" if on_gpu else "")
        )
    if isinstance(devices, list) and not on_gpu:
        raise ConfigError(
            f"trainer.devices={devices}: device indices are for GPUs; on the CPU give a number (DEVICES=2)"
        )
    if isinstance(devices, int):
        available, kind = available_devices(on_gpu)
        if devices < 1 or devices > available:
            raise ConfigError(f"trainer.devices={devices}: this machine has {available} {kind}; use 1 to {available}")
    if trainer.max_steps is None or trainer.max_steps < 1:
        raise ConfigError(
            f"trainer.max_steps={trainer.max_steps}: training is counted in optimizer steps; set a positive number"
        )


def check_ranges(run: RunConfig) -> None:
    """Numbers outside what they can mean: each would fail later with a traceback (a division by
    zero, a DataLoader's own error) or, worse, train something else than asked without a word."""
    data, o, trainer, r = run.loader, run.optimizer, run.trainer, run.options
    betas = list(o.betas)
    rules = [
        ("eval_every", r.eval_every, r.eval_every >= 1, "a positive number of optimizer steps"),
        ("save_every", r.save_every, r.save_every is None or r.save_every >= 1, "a positive number of steps"),
        (
            "save_every_minutes",
            r.save_every_minutes,
            r.save_every_minutes is None or r.save_every_minutes > 0,
            "a positive number of minutes, e.g. 30",
        ),
        ("keep_last", r.keep_last, r.keep_last >= 1, "at least 1"),
        ("max_skipped_steps", r.max_skipped_steps, r.max_skipped_steps >= 0, "0 or more"),
        ("trainer.log_every_n_steps", trainer.log_every_n_steps, (trainer.log_every_n_steps or 0) >= 1, "1 or more"),
        (
            "trainer.accumulate_grad_batches",
            trainer.accumulate_grad_batches,
            (trainer.accumulate_grad_batches or 0) >= 1,
            "1 or more micro-batches per optimizer step",
        ),
        ("data.batch_size", data.batch_size, data.batch_size >= 1, "1 or more sequences per micro-batch"),
        ("data.val_batches", data.val_batches, data.val_batches >= 1, "1 or more"),
        ("data.num_workers", data.num_workers, data.num_workers >= 0, "0 (load in the main process) or more"),
        ("model.optimizer.lr", o.lr, o.lr > 0, "a positive learning rate, e.g. 3e-4"),
        ("model.optimizer.min_lr_ratio", o.min_lr_ratio, 0 <= o.min_lr_ratio <= 1, "between 0 and 1, e.g. 0.1"),
        ("model.optimizer.warmup_steps", o.warmup_steps, o.warmup_steps >= 0, "0 or more steps"),
        ("model.optimizer.weight_decay", o.weight_decay, o.weight_decay >= 0, "0 or more, e.g. 0.1"),
        ("model.optimizer.betas", betas, len(betas) == 2 and all(0 <= b < 1 for b in betas), "two in [0, 1)"),
        ("model.optimizer.eps", o.eps, o.eps > 0, "a small positive number, e.g. 1e-8"),
    ]
    for name, value, ok, needed in rules:
        if not ok:
            raise ConfigError(f"{name}={value}: out of range; use {needed}")


def check_schedule(run: RunConfig) -> None:
    """A warm-up as long as the run leaves no step for the decay: said, not silently cut short."""
    warmup, steps = run.optimizer.warmup_steps, run.trainer.max_steps
    if warmup >= steps:
        ranks.say(
            f"warning: model.optimizer.warmup_steps={warmup} is not shorter than trainer.max_steps={steps}: the "
            f"learning rate warms up for {max(1, steps - 1)} steps and never decays; set warmup_steps below "
            f"max_steps, e.g. ARGS=--model.optimizer.warmup_steps={max(1, steps // 10)}"
        )


# what one checkpoint holds per parameter: fp32 weights and AdamW's two fp32 moments
CHECKPOINT_BYTES_PER_PARAM = 12
SMALL_FILES = 64 << 20  # config.yaml, metrics.csv, W&B's files, room to spare


def check_disk(run: RunConfig) -> None:
    """Room for a checkpoint on the run folder's disk, before anything is written: a disk that fills
    at the start leaves an empty config.yaml and W&B's errors by the hundred; later, a failed save."""
    if not ranks.is_first_process():
        return
    folder, keep_last = run.folder.absolute(), run.options.keep_last
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    one = count_params(run.model) * CHECKPOINT_BYTES_PER_PARAM
    gib = 1 << 30
    if free < one + SMALL_FILES:
        raise ConfigError(
            f"run={folder}: its disk has {free / gib:.1f} GiB free, and one checkpoint of this model takes about "
            f"{one / gib:.1f} GiB; free space there, or choose a RUN on a larger disk"
        )
    if free < (keep_last + 2) * one:  # the kept ones, the best, and the one being written
        print(
            f"warning: run={folder}: {free / gib:.1f} GiB free, room for {int(free // one)} checkpoints of "
            f"{one / gib:.1f} GiB; keep_last={keep_last} needs {keep_last + 2}: a later save may fail"
        )


def with_speed_options(run: RunConfig, on_gpu: bool) -> RunConfig:
    """What the config leaves to the hardware, filled in so that config.yaml says what ran: compile
    and torch's fused AdamW on a GPU. Not fused under fp16 (check_fused says why)."""
    fused = run.optimizer.fused
    if fused is None:
        fused = on_gpu and str(run.trainer.precision) != "16-mixed"
    return replace(
        run, compile=on_gpu if run.compile is None else run.compile, optimizer=replace(run.optimizer, fused=fused)
    )


def check_fused(run: RunConfig) -> None:
    """Under fp16 the grad scaler would hand torch's fused AdamW scaled gradients to clip, which
    Lightning refuses (DeepSpeed clips itself)."""
    trainer = run.trainer
    fp16 = str(trainer.precision) == "16-mixed"
    if run.optimizer.fused and fp16 and trainer.gradient_clip_val and not run.options.deepspeed:
        raise ConfigError(
            "model.optimizer.fused=true: torch's fused AdamW cannot have its gradients clipped under "
            "trainer.precision=16-mixed; use bf16-mixed, fused=false, or trainer.gradient_clip_val=0"
        )


def prepare_data(run: RunConfig) -> Path:
    """Prepare (or find) the data before any process group exists; the first process on each node
    does the work, the others find it through the datamodule's prepare_data barrier."""
    data = run.data
    if not ranks.is_first_on_node():
        return prepared_dir(data)
    folder = prepare(data)
    meta = load_meta(folder)
    block = run.model.block_size
    for split, info in meta["splits"].items():
        if info["tokens"] < block + 1:
            raise ConfigError(
                f"model.config.block_size={block}: the {split} split holds only {info['tokens']} tokens; "
                "use a smaller block_size or more text"
            )
    return folder


FLOAT8_RECIPES = ("tensorwise", "rowwise")
FLOAT8_CAPABILITY = (8, 9)  # float8 matmuls: H100, H200, L4 and newer


def check_float8(recipe: str | None, emulate: bool, on_gpu: bool) -> None:
    """Refuse, before the run starts, float8 that cannot run here."""
    if recipe is None:
        return
    if recipe not in FLOAT8_RECIPES:
        raise ConfigError(f"model.float8={recipe}: unknown; use tensorwise or rowwise (or null for none)")
    if emulate:
        return
    capability = torch.cuda.get_device_capability() if on_gpu else None
    if capability is None or capability < FLOAT8_CAPABILITY:
        have = f"compute capability {capability[0]}.{capability[1]}" if capability else "no GPU"
        raise ConfigError(
            f"model.float8={recipe}: float8 matmuls need a GPU of compute capability 8.9 or newer (H100, H200, "
            f"L4), and this run has {have}; drop it, or --model.float8_emulate=true to emulate them (slow)"
        )
