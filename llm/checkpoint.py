"""Checkpoints outside training: the plain Transformer, its tokenizer and the run's config, from
the self-contained checkpoints training writes (see run.RunInfo), whether one file or a DeepSpeed
ZeRO folder of shards; and the conversion of such a folder into one fp32 file."""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from llm.errors import ConfigError
from llm.model import ModelConfig, Transformer
from llm.module import LanguageModel  # noqa: F401  (allows the checkpoint's dataclasses in torch.load)

# what this project reads from rank 0's model-states file of a ZeRO checkpoint: what run.RunInfo
# adds, and Lightning's step; the rest there is DeepSpeed's own (its partition, optimizer, ...)
CLIENT_KEYS = ("llm_config", "tokenizer_json", "data_meta", "global_step")


@dataclass
class Loaded:
    model: Transformer
    tokenizer: Tokenizer
    eot_id: int
    config: dict  # the run's resolved config
    data_meta: dict
    step: int


def model_config_from(config: dict) -> ModelConfig:
    fields = {k: v for k, v in config["model"]["config"].items() if not k.startswith("__")}
    return ModelConfig(**fields)


def is_sharded(path: Path) -> bool:
    return path.is_dir() and (path / "latest").is_file()


def _read_sharded(path: Path) -> dict:
    """A ZeRO checkpoint folder, consolidated in memory by DeepSpeed's own zero_to_fp32."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag = (path / "latest").read_text().strip()
    states = sorted((path / tag).glob("*model_states.pt"))  # rank 0's sorts first
    client = torch.load(states[0], map_location="cpu", weights_only=False)
    ckpt = {k: client[k] for k in CLIENT_KEYS if k in client}
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed reports its progress on stdout
        ckpt["state_dict"] = get_fp32_state_dict_from_zero_checkpoint(str(path), tag)
    return ckpt


def read_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    hint = "give runs/<name>/checkpoints/last.ckpt (a file, or a DeepSpeed folder)"
    if not str(path) or not path.exists():
        raise ConfigError(f"ckpt={path}: no such checkpoint; {hint}")
    if path.is_dir() and not is_sharded(path):
        raise ConfigError(f"ckpt={path}: a folder that is no DeepSpeed checkpoint (no 'latest' file); {hint}")
    ckpt = _read_sharded(path) if path.is_dir() else torch.load(path, map_location="cpu", weights_only=True)
    if "llm_config" not in ckpt:
        raise ConfigError(f"ckpt={path}: not a checkpoint of this project (no llm_config); {hint}")
    return ckpt


def load_for_inference(path: str | Path, device: str = "cpu") -> Loaded:
    ckpt = read_checkpoint(path)
    config = ckpt["llm_config"]
    model = Transformer(model_config_from(config))
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    model.load_state_dict(state)
    model.to(device).eval()
    tokenizer = Tokenizer.from_str(ckpt["tokenizer_json"])
    meta = ckpt["data_meta"]
    return Loaded(model, tokenizer, meta["eot_id"], config, meta, ckpt.get("global_step", 0))


def export_fp32(ckpt: str, out: str) -> None:
    """Consolidate a sharded DeepSpeed checkpoint into one fp32 file (DeepSpeed's own conversion,
    through Lightning), loadable without DeepSpeed by `make sample`, `make eval` or torch.load.

    Args:
        ckpt: a DeepSpeed checkpoint folder, e.g. runs/<name>/checkpoints/last.ckpt (CKPT=)
        out: the file to write (OUT=); an existing file is not overwritten
    """
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    path, target = Path(ckpt), Path(out)
    if not is_sharded(path):
        raise ConfigError(f"ckpt={ckpt}: not a DeepSpeed checkpoint folder; a .ckpt file needs no conversion")
    if not out:
        raise ConfigError("out=: give the file to write, e.g. OUT=model-fp32.ckpt")
    if target.exists():
        raise ConfigError(f"out={out}: already exists; choose another name or remove it first")
    target.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.redirect_stdout(sys.stderr):
        convert_zero_checkpoint_to_fp32_state_dict(str(path), str(target))
    print(f"wrote {target}")
