"""The teacher of a distillation (`distill.teacher`), described without loading its weights: its
architecture, tokenizer and content digest, and every check a distillation's settings must pass
before a run starts. Loading it and the distillation loss are llm/train/distill.py's."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer

from llm.checkpointing.files import Checkpoint, safe_load
from llm.config import RunConfig
from llm.data.prepare import prepared_dir
from llm.errors import ConfigError
from llm.hf import from_hf_config, read_config, refuse_quantized
from llm.model import ModelConfig, Transformer
from llm.preflight.presets import load_preset

FIELD = "distill.teacher"


def is_folder(teacher: str) -> bool:
    """A transformers folder (config.json), rather than a checkpoint of this project."""
    return (Path(teacher) / "config.json").is_file()


def teacher_config(teacher: str) -> ModelConfig:
    """The teacher's architecture, read without its weights."""
    if is_folder(teacher):
        config = read_config(Path(teacher), FIELD)
        refuse_quantized(config, teacher, FIELD)
        return from_hf_config(config, f"{FIELD}={teacher}")
    return Checkpoint(teacher, FIELD).header().run_config.model


def teacher_tokenizer(teacher: str) -> Tokenizer:
    if is_folder(teacher):
        file = Path(teacher) / "tokenizer.json"
        if not file.is_file():
            raise ConfigError(f"{FIELD}={teacher}: the folder has no tokenizer.json; give a folder make export wrote")
        return Tokenizer.from_file(str(file))
    checkpoint = Checkpoint(teacher, FIELD)
    return Tokenizer.from_str(safe_load(checkpoint.client_state_file(), FIELD, mmap=True)["tokenizer_json"])


def tokenizer_file(run: RunConfig) -> str | None:
    """The tokenizer.json a transformers-folder teacher brings, which the student's data is cut by
    when TOKENIZER= names none (check() compares one it names); None otherwise."""
    teacher = run.distill.teacher
    if teacher and run.data.tokenizer is None and is_folder(teacher) and (Path(teacher) / "tokenizer.json").is_file():
        return str(Path(teacher) / "tokenizer.json")
    return None


def check(run: RunConfig) -> None:
    """Every distillation setting that cannot work, refused in one line before anything is loaded."""
    d = run.distill
    if d.teacher is not None and not d.teacher.strip():
        raise ConfigError(
            "distill.teacher is empty: give the teacher, e.g. make distill TEACHER=runs/<name>/checkpoints/best.ckpt"
        )
    if not d.teacher:
        if d.init:
            raise ConfigError(f"distill.init={d.init}: starts the student from a teacher; give distill.teacher too")
        return
    rules = [
        ("distill.alpha", d.alpha, 0 <= d.alpha <= 1, "between 0 (data only) and 1 (teacher only), e.g. 0.5"),
        ("distill.temperature", d.temperature, d.temperature > 0, "a positive temperature, e.g. 2.0"),
        ("distill.until", d.until, 0 < d.until <= 1, "a fraction of the run in (0, 1], e.g. 1.0"),
        ("distill.chunk_tokens", d.chunk_tokens, d.chunk_tokens >= 1, "1 or more tokens, e.g. 4096"),
    ]
    for name, value, ok, needed in rules:
        if not ok:
            raise ConfigError(f"{name}={value}: out of range; use {needed}")
    if not Path(d.teacher).exists():
        raise ConfigError(
            f"{FIELD}={d.teacher}: no such checkpoint or folder; give runs/<name>/checkpoints/best.ckpt "
            "or a transformers folder (make export)"
        )
    options = run.options
    if options.deepspeed and load_preset(options.deepspeed, options.nvme_path)["zero_optimization"]["stage"] == 3:
        raise ConfigError(
            f"deepspeed={options.deepspeed}: ZeRO-3 would partition the teacher, and its engine gathers only the "
            "parameters of the student it wraps; distill with zero1, zero2 or zero2_offload"
        )
    teacher = teacher_config(d.teacher)
    check_tokenizer(run, d.teacher)
    if d.init:
        if run.init:
            raise ConfigError(f"distill.init={d.init}: the student already starts from model.init={run.init}; drop one")
        check_same_shapes(run.model, teacher, d.teacher)


def check_tokenizer(run: RunConfig, teacher: str) -> None:
    """Teacher and student must number their tokens alike: the KL compares their distributions
    token id by token id."""
    data = run.data
    if data.tokenizer:
        if Tokenizer.from_file(data.tokenizer).get_vocab() != teacher_tokenizer(teacher).get_vocab():
            raise ConfigError(
                f"data.tokenizer={data.tokenizer}: not the tokenizer {FIELD}={teacher} was trained with; the "
                "student must use the teacher's tokenizer (drop TOKENIZER= for a transformers folder)"
            )
        return
    teacher_data = None if is_folder(teacher) else Checkpoint(teacher, FIELD).header().run_config.data
    if teacher_data == data:
        return  # the teacher's own data: the same prepared folder, the same BPE
    found = prepared_dir(teacher_data) if teacher_data else None
    hint = (
        f"TOKENIZER={found / 'tokenizer.json'}"
        if found and (found / "tokenizer.json").is_file()
        else ("TOKENIZER= the teacher's tokenizer.json (make export CKPT=<teacher> writes one)")
    )
    raise ConfigError(
        f"{FIELD}={teacher}: the student's data would train a new tokenizer, not the teacher's; give {hint}"
    )


def check_same_shapes(student: ModelConfig, teacher: ModelConfig, path: str) -> None:
    """--distill.init=teacher_layers copies tensors: every one the student has must have the
    teacher's shape, and the teacher at least as many blocks."""
    with torch.device("meta"):
        s, t = Transformer(student), Transformer(teacher)
    hint = "give the student the teacher's n_embd, n_head, mlp and vocabulary, or drop distill.init"
    if len(s.blocks) > len(t.blocks):
        raise ConfigError(
            f"distill.init=teacher_layers: the student has {len(s.blocks)} blocks and {FIELD}={path} only "
            f"{len(t.blocks)}; a student of at most {len(t.blocks)} blocks"
        )
    teacher_shapes = {k: v.shape for k, v in t.state_dict().items()}
    for name, tensor in s.state_dict().items():
        source = name if not name.startswith("blocks.") else "blocks.0." + name.split(".", 2)[2]
        if teacher_shapes.get(source) != tensor.shape:
            raise ConfigError(
                f"distill.init=teacher_layers: the student's {name} has shape {tuple(tensor.shape)}, the "
                f"teacher's {tuple(teacher_shapes.get(source, ()))}; {hint}"
            )
