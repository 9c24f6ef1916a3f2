"""Checkpoints for inference: the plain Transformer, its tokenizer and the run's config, from the
self-contained checkpoints that training writes (see run.RunInfo)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from llm.errors import ConfigError
from llm.model import ModelConfig, Transformer
from llm.module import LanguageModel  # noqa: F401  (allows the checkpoint's dataclasses in torch.load)


@dataclass
class Loaded:
    model: Transformer
    tokenizer: Tokenizer
    eot_id: int
    config: dict  # the run's resolved config
    step: int


def model_config_from(config: dict) -> ModelConfig:
    fields = {k: v for k, v in config["model"]["config"].items() if not k.startswith("__")}
    return ModelConfig(**fields)


def read_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"ckpt={path}: no such checkpoint; give a .ckpt file from a run's checkpoints/ folder")
    if path.is_dir():
        raise ConfigError(f"ckpt={path}: a folder; give a .ckpt file")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if "llm_config" not in ckpt:
        raise ConfigError(
            f"ckpt={path}: not a checkpoint of this project (no llm_config); give one from runs/<name>/checkpoints/"
        )
    return ckpt


def load_for_inference(path: str | Path, device: str = "cpu") -> Loaded:
    ckpt = read_checkpoint(path)
    config = ckpt["llm_config"]
    model = Transformer(model_config_from(config))
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    model.load_state_dict(state)
    model.to(device).eval()
    tokenizer = Tokenizer.from_str(ckpt["tokenizer_json"])
    eot_id = ckpt["data_meta"]["eot_id"]
    return Loaded(model, tokenizer, eot_id, config, ckpt.get("global_step", 0))
