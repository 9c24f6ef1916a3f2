"""The reference for `make bench`: the same model, data, optimizer, schedule, clipping and precision
as the project's trainer, in the plainest PyTorch training loop, so that the difference in step
time is what the trainer (Lightning, callbacks, logging) costs."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from llm.model import Transformer
from llm.module import OptimizerConfig, param_groups, warmup_cosine


def raw_training_steps(
    model: Transformer,
    loader,
    optim: OptimizerConfig,
    precision: str,
    steps: int,
    device: torch.device,
    max_steps: int,
    clip: float = 1.0,
    on_step: Callable[[int], None] | None = None,
) -> None:
    """Train `steps` optimizer steps; call on_step(step) after each one (the caller times it)."""
    model.to(device).train()
    optimizer = torch.optim.AdamW(
        param_groups(model, optim.weight_decay),
        lr=optim.lr,
        betas=optim.betas,
        eps=optim.eps,
        fused=True if device.type == "cuda" else None,
    )
    scheduler = warmup_cosine(optimizer, optim.warmup_steps, max_steps, optim.min_lr_ratio)
    # as Lightning's bf16-mixed does: the whole forward and loss under autocast, without its weight cache
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed", cache_enabled=False)
    batches = iter(loader)
    for step in range(steps):
        batch = next(batches).to(device, non_blocking=True)
        with autocast:
            logits = model(batch[:, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if on_step is not None:
            on_step(step)
