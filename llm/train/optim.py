"""The optimizer: AdamW with weight-decay groups, the one each strategy needs, and the learning-rate
schedule (linear warm-up, then cosine decay)."""

from __future__ import annotations

import os
import re

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, Strategy
from torch import nn

from llm.train.strategy import offloads_optimizer


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: weight matrices decay; norms, biases and embeddings do not."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():  # yields a tied matrix once
        if not p.requires_grad:
            continue
        dims = len(getattr(p, "ds_shape", p.shape))  # a ZeRO-3 shard is flat; ds_shape is the full shape
        (decay if dims >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float):
    """Linear warm-up from lr/warmup to lr, then cosine decay to lr * min_lr_ratio at total_steps."""
    warmup_steps = max(1, min(warmup_steps, total_steps - 1))
    warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0 / warmup_steps, total_iters=warmup_steps)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=max(1, total_steps - warmup_steps), eta_min=optimizer.defaults["lr"] * min_lr_ratio
    )
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_steps])


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
