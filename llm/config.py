"""The typed configuration a run is built from, beside the architecture's (llm/model.py:ModelConfig).

Checkpoints hold these dataclasses among their hyperparameters, and every checkpoint is read with
torch.load(weights_only=True), which accepts only the types registered here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields

import torch

from llm.model import ModelConfig


@dataclass
class OptimizerConfig:
    lr: float = 3e-4  # peak learning rate, reached at the end of warm-up
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1  # on matrices only; norms, biases and embeddings are not decayed
    betas: tuple[float, float] = field(default=(0.9, 0.95))
    eps: float = 1e-8
    fused: bool | None = None  # torch's fused AdamW kernel (one kernel for all parameters); None: on GPU only


# the names a checkpoint's pickle holds: the present ones, and those of 0.1.0's flat package
torch.serialization.add_safe_globals([ModelConfig, OptimizerConfig, (OptimizerConfig, "llm.module.OptimizerConfig")])


# what a checkpoint's `llm_format` says its layout is; absent: 0.1.0's, whose learning-rate schedule
# (a SequentialLR) this version cannot continue, though its weights still load for sample, eval, export
CHECKPOINT_FORMAT = 2
LEGACY_MODEL_KEYS = {"reference"}  # 0.1.0 kept a preset's published parameter count in ModelConfig


def model_config_of(values: Mapping) -> ModelConfig:
    """The architecture from a parsed config's model.config or a checkpoint's: jsonargparse's own
    keys (`__path__`) and 0.1.0's `reference` dropped. ValueError names a field that does not fit."""
    known = {f.name for f in fields(ModelConfig)}
    unknown = set(values) - known - LEGACY_MODEL_KEYS
    unknown = {k for k in unknown if not k.startswith("__")}
    if unknown:
        raise ValueError(f"{sorted(unknown)[0]}: no such field of the architecture")
    return ModelConfig(**{k: v for k, v in values.items() if k in known})
