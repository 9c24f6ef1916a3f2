"""The typed configuration of a run, resolved: what config.yaml and every checkpoint record.

`RunConfig` has one constructor for the dict those hold (`from_dict`: a config.yaml read back, a
checkpoint's `llm_config`, or the parsed command line as a dict), and frozen parts: the
architecture (llm/model.py's ModelConfig), the optimizer and schedule, the data to prepare, the
loader, the trainer's settings and the run's own options. Resuming compares two of them field by
field (llm/checkpointing/resume.py); the tools read a checkpoint's through it.

Checkpoints hold the ModelConfig and OptimizerConfig dataclasses among their hyperparameters, and
every checkpoint is read with torch.load(weights_only=True), which accepts only the types
registered here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

import torch
import yaml

from llm.errors import ConfigError
from llm.model import ModelConfig
from llm.redact import scrub

EOT = "<|endoftext|>"  # the end-of-text token a trained BPE writes after every document

# Lightning's precisions a run takes (trainer.precision), and the dtype each computes its matmuls in:
# what MFU's peak is the peak of, an activation's size, and the dtype a frozen teacher is kept in
PRECISION_DTYPES = {
    "32-true": torch.float32,
    "bf16-mixed": torch.bfloat16,
    "16-mixed": torch.float16,
    "bf16-true": torch.bfloat16,
    "64-true": torch.float64,
}


def compute_dtype(precision) -> torch.dtype:
    """The dtype a Lightning precision computes in (float32 for one it does not know)."""
    return PRECISION_DTYPES.get(str(precision), torch.float32)


@dataclass
class OptimizerConfig:
    lr: float = 3e-4  # peak learning rate, reached at the end of warm-up
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1  # on matrices only; norms, biases and embeddings are not decayed
    betas: tuple[float, float] = field(default=(0.9, 0.95))
    eps: float = 1e-8
    fused: bool | None = None  # torch's fused AdamW kernel (one kernel for all parameters); None: on GPU only


@dataclass
class PrepareConfig:
    """What to prepare (llm/data/prepare.py): the data section's --data.<field> on the command line.

    Args:
        text: local text: a .txt, .jsonl or .parquet file, a folder or a glob (TEXT=); none: the embedded corpus
        hf: a Hugging Face Hub dataset, name[:config] (HF=), or a local dataset folder
        hf_split: the Hub split to read
        hf_streaming: stream the Hub dataset instead of downloading it whole
        hf_max_documents: read at most this many documents from the Hub dataset
        text_field: the column that holds the text (.jsonl, .parquet and Hub datasets)
        tokenizer: a tokenizer.json (TOKENIZER=); none: train a byte-level BPE on the train split
        vocab_size: vocabulary of the trained BPE
        eot_token: the token written after every document
        val_fraction: share of the text held out for validation
        split: "document" holds out whole documents, "tail" the end of each one; "auto" picks by document count
        cache_dir: where prepared data is kept, one folder per distinct input
        num_proc: processes for tokenization (default: all CPUs)
    """

    text: str | None = None
    hf: str | None = None
    hf_split: str = "train"
    hf_streaming: bool = False
    hf_max_documents: int | None = None
    text_field: str = "text"
    tokenizer: str | None = None
    vocab_size: int = 8192
    eot_token: str = EOT
    val_fraction: float = 0.1
    split: Literal["auto", "document", "tail"] = "auto"
    cache_dir: str = "data"
    num_proc: int | None = None

    @classmethod
    def from_data_config(cls, data: Mapping) -> PrepareConfig:
        """The preparation fields of a data config (which holds the loader's fields too)."""
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def first_difference(self, saved: PrepareConfig) -> str | None:
        """The first field in which this data differs from `saved` (a checkpoint's, written scrubbed of
        secrets), or None: where the cache lies and how it is prepared may differ, the data may not."""
        for f in fields(self):
            if f.name in ("cache_dir", "num_proc", "hf_streaming"):
                continue
            mine, theirs = getattr(self, f.name), getattr(saved, f.name)
            if mine != theirs and scrub(mine) != theirs:
                return f.name
        return None

    def check(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction={self.val_fraction} must lie between 0 and 1, e.g. 0.1")
        if self.tokenizer is None and not 256 < self.vocab_size <= 2**32:
            raise ConfigError(
                f"data.vocab_size={self.vocab_size}: a byte-level BPE needs more than 256 tokens, e.g. 8192"
            )


@dataclass(frozen=True)
class LoaderConfig:
    """How the prepared tokens are cut and sampled: the DataModule's own arguments."""

    block_size: int = 256
    batch_size: int = 16  # sequences per micro-batch per device
    num_workers: int = 0
    val_batches: int = 20
    seed: int = 1234  # of the training sample positions


@dataclass
class DistillConfig:
    """Knowledge distillation from a frozen teacher (llm/train/distill.py): `--distill.<field>`.
    The defaults are Hinton et al.'s soft targets (2015) at DistilBERT's temperature of 2 (2019).

    Args:
        teacher: a checkpoint of this project or a transformers folder (GPT-2 or Llama) to learn from
            (TEACHER=); none: train on the data alone
        alpha: weight of the teacher's term: loss = (1 - alpha) * CE + alpha * T^2 * KL(teacher || student)
        temperature: T, the softmax temperature both distributions are compared at
        until: the fraction of max_steps trained with the teacher; after it, CE alone (alpha 0) and the
            teacher is no longer run
        chunk_tokens: tokens whose logits are computed at once; both models' float32 logits are never
            held for a whole batch
        init: teacher_layers: start the student from the teacher's embeddings, final norm and every
            k-th block (their widths must match); none: the seed's initialisation
    """

    teacher: str | None = None
    alpha: float = 0.5
    temperature: float = 2.0
    until: float = 1.0
    chunk_tokens: int = 4096
    init: Literal["teacher_layers"] | None = None


# the classes a checkpoint's pickle holds (the module's hyperparameters)
torch.serialization.add_safe_globals([ModelConfig, OptimizerConfig, DistillConfig])


@dataclass(frozen=True)
class TrainerConfig:
    """The Lightning Trainer settings a run's figures depend on (the rest stays Lightning's)."""

    accelerator: str = "auto"
    devices: int | str = 1
    num_nodes: int = 1
    precision: str | None = None
    max_steps: int = -1
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = None
    log_every_n_steps: int = 50


@dataclass(frozen=True)
class RunOptions:
    """The run's own options, beside the model, data and trainer sections: each field is a top-level
    option of `python -m llm fit` (`--eval_every=50`), with the help written here.

    Args:
        experiment: experiment name: run folder prefix, W&B group
        run: run folder (RUN=); default runs/<experiment>-<time>
        resume: auto: continue from the newest complete checkpoint in --run, if any; or a path
        eval_every: validate every this many optimizer steps
        save_every: checkpoint every this many optimizer steps; default: eval_every
        save_every_minutes: checkpoint as well once this many minutes have passed since the last save
        keep_last: step checkpoints kept (the best one is kept as well)
        max_skipped_steps: stop when more optimizer steps than this in a row had a non-finite gradient
        deepspeed: DeepSpeed preset in configs/deepspeed/ (DS=), or a .yaml or .json; none: DDP; auto: the
            fastest that fits the device's memory, as make plan ranks them
        nvme_path: folder for ZeRO NVMe offload (NVME_PATH=)
        wandb_project: W&B project; default: WANDB_PROJECT, else llm
        wandb_entity: W&B entity (user or team); default: WANDB_ENTITY, else the API key's
        wandb_log_model: put the final checkpoint's weights in the run's W&B model artifact too
        collective_timeout: seconds a collective waits for the other processes before the run stops
        peak_flops: peak FLOP/s of one device for MFU; default: GPU datasheet, measured on CPU
        seed_everything: LightningCLI's own option, recorded here as the run resolved it
        tokens_per_step: tokens per optimizer step, all processes: the accumulation is derived from it for
            the world size the run gets (default: set trainer.accumulate_grad_batches by hand)
        memory_gib: GiB of memory of one device that deepspeed=auto and data.batch_size=auto plan for
            (default: the GPU's; on a CPU the host's, shared by its processes)
        eval_tasks: lm-eval benchmarks scored at each validation, comma-separated: task or group names, task
            YAML files, val_continuation (built from the run's validation split); logged as eval/<task>/<metric>
        eval_limit: examples per task at each validation (default: all of them)
        eval_fewshot: few-shot examples per question (default: each task's own)
    """

    experiment: str = "default"
    run: str | None = None
    resume: str | None = None
    eval_every: int = 100
    save_every: int | None = None
    save_every_minutes: float | None = None
    keep_last: int = 2
    max_skipped_steps: int = 5
    deepspeed: str | None = None
    nvme_path: str | None = None
    wandb_project: str | None = None
    wandb_entity: str | None = None
    wandb_log_model: bool = False
    collective_timeout: float = 600.0  # seconds: long enough for the slowest checkpoint save others wait for
    peak_flops: float | None = None
    seed_everything: int | bool | None = None
    tokens_per_step: int | None = None
    memory_gib: float | None = None
    eval_tasks: str | None = None
    eval_limit: int | None = None
    eval_fewshot: int | None = None


# the layout of what this version writes into a checkpoint (its `llm_format`): a later version that
# changes it can tell the two apart
CHECKPOINT_FORMAT = 2


def _fields_of(cls, values: Mapping) -> dict:
    """The values of `cls`'s fields in `values`; jsonargparse's own keys (`__path__`) are dropped,
    anything else unknown is a ValueError naming it."""
    known = {f.name for f in fields(cls)}
    unknown = {k for k in values if k not in known and not k.startswith("__")}
    if unknown:
        raise ValueError(f"{sorted(unknown)[0]}: no such field of {cls.__name__}")
    return {k: v for k, v in values.items() if k in known}


def model_config_of(values: Mapping) -> ModelConfig:
    """The architecture from a parsed config's model.config or a checkpoint's. ValueError names a
    field that does not fit."""
    return ModelConfig(**_fields_of(ModelConfig, values))


def datamodule_args(section):
    """The DataModule's arguments in a config's data section (a dict or a Namespace): LightningCLI's
    subclass form, {class_path, init_args}, or the flat form of the YAML files."""
    if isinstance(section, Mapping):
        return section.get("init_args", section)
    return section.init_args if "init_args" in section else section


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig
    optimizer: OptimizerConfig
    data: PrepareConfig
    loader: LoaderConfig
    trainer: TrainerConfig
    options: RunOptions
    init: str | None = None  # the transformers folder whose weights training starts from (model.init, INIT=)
    float8: str | None = None  # float8 training's recipe (model.float8)
    float8_emulate: bool = False
    distill: DistillConfig = field(default_factory=DistillConfig)
    compile: bool | None = None  # torch.compile the model (model.compile); None: resolved by the hardware
    activation_checkpointing: bool = False  # model.activation_checkpointing

    @classmethod
    def from_dict(cls, config: Mapping) -> RunConfig:
        """From a resolved config as a dict: config.yaml, a checkpoint's, or the parsed command line's."""
        model, data = config["model"], dict(datamodule_args(config["data"]))
        optimizer = _fields_of(OptimizerConfig, model.get("optimizer") or {})
        if "betas" in optimizer:
            optimizer["betas"] = tuple(optimizer["betas"])  # a list in YAML
        loader_fields = {f.name for f in fields(LoaderConfig)}
        trainer_fields = {f.name for f in fields(TrainerConfig)}
        return cls(
            model=model_config_of(model["config"]),
            optimizer=OptimizerConfig(**optimizer),
            data=PrepareConfig.from_data_config(data),
            loader=LoaderConfig(**{k: v for k, v in data.items() if k in loader_fields}),
            trainer=TrainerConfig(**{k: v for k, v in config["trainer"].items() if k in trainer_fields}),
            options=RunOptions(**{f.name: config.get(f.name, f.default) for f in fields(RunOptions)}),
            init=model.get("init"),
            float8=model.get("float8"),
            float8_emulate=bool(model.get("float8_emulate")),
            distill=DistillConfig(**_fields_of(DistillConfig, config.get("distill") or {})),
            compile=model.get("compile"),
            activation_checkpointing=bool(model.get("activation_checkpointing")),
        )

    @classmethod
    def from_yaml(cls, path: str | Path) -> RunConfig:
        """From a run's config.yaml."""
        return cls.from_dict(yaml.safe_load(Path(path).read_text()))

    @classmethod
    def from_checkpoint(cls, ckpt: Mapping) -> RunConfig:
        """From a checkpoint read whole or its header (llm/checkpointing/files.py)."""
        return cls.from_dict(ckpt["llm_config"] if "llm_config" in ckpt else ckpt["config"])

    @property
    def folder(self) -> Path:
        """The run folder, which llm.preflight.resolve decides (options.run)."""
        if not self.options.run:
            raise ValueError("the run folder is decided by llm.preflight.resolve before it is read")
        return Path(self.options.run)

    @property
    def world_size(self) -> int | None:
        return world_size_of(self.trainer.devices, self.trainer.num_nodes)


def device_count(devices) -> int | None:
    """trainer.devices as a number of processes per node, when it is one ("auto", "-1" and a list
    of GPU indices are not: Lightning resolves them)."""
    if isinstance(devices, str) and devices.strip().isdigit():
        return int(devices)
    return devices if isinstance(devices, int) and not isinstance(devices, bool) else None


def world_size_of(devices, num_nodes) -> int | None:
    """Processes of the job, when the config says how many."""
    count = device_count(devices)
    return count * num_nodes if count is not None and isinstance(num_nodes, int) else None
