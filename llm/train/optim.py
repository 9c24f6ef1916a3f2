"""The optimizer: AdamW with weight-decay groups, the one each strategy needs, and the learning-rate
schedule (linear warm-up, then cosine decay)."""

from __future__ import annotations

import math
import os
import re

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, Strategy
from torch import nn

from llm.preflight.presets import offloads_optimizer


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: weight matrices decay; norms, biases and embeddings do not."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():  # yields a tied matrix once
        if not p.requires_grad:
            continue
        dims = len(getattr(p, "ds_shape", p.shape))  # a ZeRO-3 shard is flat; ds_shape is the full shape
        (decay if dims >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class WarmupCosine:
    """The learning-rate factor of scheduler step k (0-based; the rate of optimizer step k + 1):
    linear from 1/warmup to 1 over `warmup` steps, then half a cosine down to `min_ratio` at `total`,
    where it stays. A callable object rather than a function, so that LambdaLR's state_dict keeps
    its fields in the checkpoint, and a resumed run with another max_steps moves its end (`retarget`)."""

    def __init__(self, warmup: int, total: int, min_ratio: float):
        self.warmup = max(1, min(warmup, total - 1))
        self.total, self.min_ratio = total, min_ratio
        self.start, self.start_factor = self.warmup, 1.0  # where the cosine starts, and from which factor

    def __call__(self, k: int) -> float:
        if k < self.warmup:
            return 1 / self.warmup + (1 - 1 / self.warmup) * k / self.warmup
        span = max(1, self.total - self.start)
        j = min(k - self.start, span)
        return self.min_ratio + (self.start_factor - self.min_ratio) * (1 + math.cos(math.pi * j / span)) / 2

    def retarget(self, total: int, step: int) -> None:
        """A resumed run with another max_steps: from `step`, the cosine goes on from the factor it
        has reached down to min_ratio at the new `total`, instead of jumping to another curve."""
        if total == self.total:
            return
        if step > self.start:
            self.start_factor, self.start = self(step), step
        self.total = total


def warmup_cosine(optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float):
    """torch's LambdaLR over WarmupCosine."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup_steps, total_steps, min_lr_ratio))


def make_optimizer(
    groups: list[dict], lr: float, betas, eps: float, strategy: Strategy, fused: bool | None = None
) -> torch.optim.Optimizer:
    """AdamW as the strategy needs it (see adamw)."""
    deepspeed_config = strategy.config if isinstance(strategy, DeepSpeedStrategy) else None
    return adamw(groups, lr, betas, eps, strategy.root_device.type == "cuda", deepspeed_config, fused)


def adamw(
    groups: list[dict], lr: float, betas, eps: float, on_gpu: bool, deepspeed_config: dict | None, fused: bool | None
) -> torch.optim.Optimizer:
    """DeepSpeed's CPU Adam when ZeRO offloads the optimizer (DeepSpeed rejects a torch optimizer
    there), its fused Adam for ZeRO on GPU, torch's AdamW otherwise, fused into one kernel when
    `fused` says so (None: on a GPU)."""
    if deepspeed_config is not None:
        plain_cuda_arch_list()  # DeepSpeed compiles the two optimizers below on first use
        if offloads_optimizer(deepspeed_config):
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(groups, lr=lr, betas=betas, eps=eps, adamw_mode=True)
        if on_gpu:
            from deepspeed.ops.adam import FusedAdam

            return FusedAdam(groups, lr=lr, betas=betas, eps=eps, adam_w_mode=True)
    fused = on_gpu if fused is None else fused
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)


def plain_cuda_arch_list() -> None:
    """DeepSpeed's op builder reads TORCH_CUDA_ARCH_LIST and fails on entries with a feature suffix
    such as "9.0a" (`invalid literal for int()`), which some containers set; its ops need only the
    plain capability, so the suffix is dropped for the builds of this process."""
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if arch:
        os.environ["TORCH_CUDA_ARCH_LIST"] = re.sub(r"(\d+\.\d+)[a-z]+", r"\1", arch)
