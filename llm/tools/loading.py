"""What the tools load beside a checkpoint file: a transformers folder as a model called like the
Transformer, the data a run folder's config.yaml names, and the run's W&B runs that results go to."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any, cast

import torch

from llm.checkpointing.files import Loaded
from llm.config import PrepareConfig, RunConfig
from llm.errors import ConfigError
from llm.hf import from_hf_config, read_config
from llm.model import ModelConfig, Transformer
from llm.redact import scrub
from llm.tools.quantize import import_torchao
from llm.wandb_settings import wandb_entity, wandb_mode, wandb_project


class Logits(torch.nn.Module):
    """A transformers causal LM called as this project's Transformer is: tokens in, logits out."""

    def __init__(self, model, config: ModelConfig):
        super().__init__()
        self.model, self.config = model, config

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx).logits


def transformers_folder(folder: Path, device: str) -> Loaded:
    """A GPT-2 or Llama transformers folder (quantized by torchao or not), for evaluation."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    config = read_config(folder, "ckpt")
    architecture = from_hf_config(config, f"ckpt={folder}")  # GPT-2 or Llama, as a ModelConfig
    if "quantization_config" in config:
        import_torchao()
    if not (folder / "tokenizer.json").is_file():
        raise ConfigError(f"ckpt={folder}: no tokenizer.json; evaluate a folder make export wrote")
    with contextlib.redirect_stdout(sys.stderr):  # transformers' loading bar is not the result
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        model = model.to(device).eval()  # type: ignore[arg-type]  # transformers' wrapped `to` is typed for itself
    eot = config.get("eos_token_id")
    if not isinstance(eot, int):
        raise ConfigError(f"ckpt={folder}: config.json names no eos_token_id; evaluate a folder make export wrote")
    logits = cast(Transformer, Logits(model, architecture))  # called as the Transformer is: tokens in, logits out
    return Loaded(logits, Tokenizer.from_file(str(folder / "tokenizer.json")), eot, {}, {}, 0)


def run_folder_data(theirs: PrepareConfig, run_dir: Path, ckpt: str) -> PrepareConfig:
    """The data a checkpoint's run trained on, as the run folder's config.yaml (which the user's own
    training wrote) names it: the paths inside a checkpoint are never followed, as a checkpoint
    copied into a run folder could name any file to read and any folder to write into. The two must
    agree but for where the cache lies and how it is prepared."""
    ours = RunConfig.from_yaml(run_dir / "config.yaml").data
    name = ours.first_difference(theirs)
    if name:
        raise ConfigError(
            f"ckpt={ckpt}: its data.{name} ({getattr(theirs, name)}) is not its run folder's "
            f"({getattr(ours, name)}, {run_dir / 'config.yaml'}), so it is not that run's checkpoint; give "
            "TEXT= or HF= to evaluate on"
        )
    return ours


def add_to_wandb_run(loaded: Loaded, values: dict, run_dir: Path, described: dict) -> None:
    """The values (eval/ keys) in the summary of the W&B run of the run folder the checkpoint lies
    in, where its curves are, and as a W&B run of its own beside it: job_type eval, in the training
    run's group, `described` as its config (offline without an API key; kept in <run>/eval/wandb/)."""
    id_file = run_dir / "wandb" / "run_id"
    if not id_file.is_file():
        return
    import wandb

    where: dict[str, Any] = {
        "project": wandb_project(loaded.config.get("wandb_project")),
        "entity": wandb_entity(loaded.config.get("wandb_entity")),
        "mode": wandb_mode(),
    }
    # a Settings object per run: wandb.init writes the run's id into the one it is given
    quiet: dict[str, Any] = {"silent": True, "console": "off"}
    training = wandb.init(
        id=id_file.read_text().strip(), resume="allow", dir=str(run_dir), settings=wandb.Settings(**quiet), **where
    )
    training.summary.update(values)
    training.finish()
    (run_dir / "eval").mkdir(exist_ok=True)
    evaluation = wandb.init(
        dir=str(run_dir / "eval"),
        name=f"{run_dir.name}-eval-step{described['step']}",
        group=loaded.config.get("experiment"),
        job_type="eval",
        config=scrub(described),
        settings=wandb.Settings(**quiet),
        **where,
    )
    evaluation.summary.update(values)
    evaluation.finish()
