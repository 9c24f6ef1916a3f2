"""The references of `make bench`: the same model, data, optimizer, schedule, clipping and precision
as the project's trainer, in the plainest loops that run them, so that the difference in step time
is what the trainer (Lightning, callbacks, logging) costs.

- `raw_training_steps`: a plain PyTorch loop, eager or with the model compiled as the trainer
  compiles it (the Transformer with its loss).
- `deepspeed_engine_steps`: DeepSpeed's own engine with the same ZeRO config that the trainer
  hands to it through Lightning, driven by hand.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from llm.config import OptimizerConfig
from llm.model import Transformer
from llm.train.optim import adamw, param_groups, warmup_cosine


def raw_training_steps(
    model: Transformer,
    loader,
    optim: OptimizerConfig,
    precision: str,
    steps: int,
    device: torch.device,
    max_steps: int,
    accumulation: int = 1,
    clip: float = 1.0,
    compile: bool = False,
    on_step: Callable[[int], None] | None = None,
) -> None:
    """Train `steps` optimizer steps of `accumulation` micro-batches each; call on_step(step) after
    each one (the caller times it)."""
    model.to(device).train()
    if compile:
        model.compile()
    groups = param_groups(model, optim.weight_decay)
    optimizer = adamw(groups, optim.lr, optim.betas, optim.eps, device.type == "cuda", None, optim.fused)
    scheduler = warmup_cosine(optimizer, optim.warmup_steps, max_steps, optim.min_lr_ratio)
    # as Lightning's bf16-mixed does: the whole forward and loss under autocast, without its weight cache
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed", cache_enabled=False)
    batches = iter(loader)
    for step in range(steps):
        for _ in range(accumulation):
            batch = next(batches).to(device, non_blocking=True)
            with autocast:
                loss = model(batch[:, :-1], targets=batch[:, 1:])
            (loss / accumulation).backward()  # the mean over the micro-batches, as Lightning scales it
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if on_step is not None:
            on_step(step)


def engine_config(preset: dict, micro_batch: int, accumulation: int, precision: str, clip: float = 1.0) -> dict:
    """The DeepSpeed config the trainer's strategy hands to DeepSpeed for this preset: the preset, and
    the micro batch, accumulation, clipping and precision that Lightning fills in from the trainer."""
    config = {
        **preset,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": clip,
        "zero_allow_untested_optimizer": True,
    }
    if precision.startswith("bf16"):
        config["bf16"] = {"enabled": True}
    return config


def deepspeed_engine_steps(
    model: Transformer,
    loader,
    optim: OptimizerConfig,
    config: dict,
    steps: int,
    device: torch.device,
    max_steps: int,
    on_step: Callable[[int], None] | None = None,
) -> None:
    """Train `steps` optimizer steps with DeepSpeed's engine alone (the process group must exist), of
    the config's gradient_accumulation_steps micro-batches each: the engine steps the optimizer at
    the last of them."""
    import deepspeed

    groups = param_groups(model, optim.weight_decay)
    optimizer = adamw(groups, optim.lr, optim.betas, optim.eps, device.type == "cuda", config, optim.fused)
    scheduler = warmup_cosine(optimizer, optim.warmup_steps, max_steps, optim.min_lr_ratio)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config, dist_init_required=False
    )
    batches = iter(loader)
    for step in range(steps):
        for _ in range(engine.gradient_accumulation_steps()):
            batch = next(batches).to(engine.device, non_blocking=True)
            loss = engine(batch[:, :-1], targets=batch[:, 1:])
            engine.backward(loss)  # the engine scales the loss by the accumulation
            engine.step()
        if on_step is not None:
            on_step(step)
    engine.destroy()
