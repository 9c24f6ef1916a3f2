"""The typed configuration a run is built from, beside the architecture's (llm/model.py:ModelConfig).

Checkpoints hold these dataclasses among their hyperparameters, and every checkpoint is read with
torch.load(weights_only=True), which accepts only the types registered here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
