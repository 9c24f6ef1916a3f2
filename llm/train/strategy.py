"""The distribution strategy: DDP, or DeepSpeed ZeRO from a preset in configs/deepspeed/.

A preset (YAML, so that each setting can say why it is what it is; a DeepSpeed .json works too)
holds only what is DeepSpeed's own (stage, offload, buckets, overlap); micro batch,
gradient accumulation, clipping and precision come from the trainer and data configs, which
Lightning's DeepSpeedStrategy writes into the DeepSpeed config. On a GPU the strategy is
Lightning's as it is; on CPU, `CPUDeepSpeedStrategy` lets the same ZeRO engine run over gloo.
"""

from __future__ import annotations

import argparse
import atexit
import os
import time
from datetime import timedelta
from pathlib import Path

import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, Strategy

from llm.compat import DEEPSPEED_SHM, DEEPSPEED_SHM_PREFIX, deepspeed_shm_buffer
from llm.launch.collectives import DEFAULT_TIMEOUT, STARTUP_TIMEOUT
from llm.preflight.presets import load_preset


def remove_stale_shm_buffers(min_age: float = 60.0) -> list[Path]:
    """Remove this user's DeepSpeed all-reduce buffers that no live process maps (left by a run that
    was killed); one younger than `min_age` seconds may be in the making, not yet mapped, and stays."""
    buffers = list(DEEPSPEED_SHM.glob(f"{DEEPSPEED_SHM_PREFIX}_{os.getuid()}_*"))
    if not buffers:
        return []
    mapped: set[str] = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:  # the process ended, or is not ours to read
            continue
        mapped.update(line.split(None, 5)[-1] for line in text.splitlines() if DEEPSPEED_SHM_PREFIX in line)
    removed = []
    for path in buffers:
        try:
            if str(path) not in mapped and time.time() - path.stat().st_mtime > min_age:
                path.unlink()
                removed.append(path)
        except OSError:
            continue
    return removed


class RunDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeedStrategy (Lightning 2.6, DeepSpeed 0.19) with two corrections.

    - The loss is divided by the accumulation once. Lightning's loop divides each micro-batch's loss
      by accumulate_grad_batches and DeepSpeed's engine.backward divided it by
      gradient_accumulation_steps again: the gradients came out 1/accumulation of DDP's, which
      clipping and Adam's epsilon then treated differently (one process accumulating 2 validated
      5.8161 where two processes validated 5.8231 after 4 steps, its gradient norms exactly half).
    - Weight decay stays per parameter group after a load. DeepSpeed's ZeRO-3 universal load gives
      every group the first group's settings, so biases and norms were decayed after a resume.
    """

    preset = ""  # the preset it was built from (configs/deepspeed/<preset>.yaml), for the run's labels

    def backward(self, closure_loss, optimizer, *args, **kwargs):
        return super().backward(closure_loss, optimizer, *args, scale_wrt_gas=False, **kwargs)

    def load_checkpoint(self, checkpoint_path, weights_only=None):
        decay = [group.get("weight_decay") for group in self._param_groups()]  # configuration, not state
        state = super().load_checkpoint(checkpoint_path, weights_only)
        for group, weight_decay in zip(self._param_groups(), decay, strict=True):
            group["weight_decay"] = weight_decay
        return state

    def _param_groups(self) -> list[dict]:
        optimizer = self.deepspeed_engine.optimizer  # DeepSpeed's ZeRO optimizer wraps torch's
        return getattr(optimizer, "optimizer", optimizer).param_groups


class CPUDeepSpeedStrategy(RunDeepSpeedStrategy):
    """Lightning's DeepSpeedStrategy with the three places that assume CUDA relaxed, so the real ZeRO
    engine runs on CPU processes over gloo (tests, and anyone without a GPU). Two of them are private
    methods of Lightning 2.6 (`_init_deepspeed_distributed`, `_setup_model_and_optimizer`), which
    tests/test_compat.py checks are still there."""

    strategy_name = "deepspeed_cpu"

    def setup_environment(self) -> None:
        # DeepSpeedStrategy refuses any accelerator but CUDA here; the rest is DDP's setup
        super(DeepSpeedStrategy, self).setup_environment()

    def setup_distributed(self) -> None:
        # as DeepSpeedStrategy does, less the check of device indices that CPU devices do not have
        from lightning.fabric.utilities.seed import reset_seed

        reset_seed()
        self.set_world_ranks()
        if self.local_rank == 0:
            remove_stale_shm_buffers()
        self._init_deepspeed_distributed()
        if "LOCAL_SIZE" in os.environ:  # DeepSpeed made its buffer: remove it when this process ends
            atexit.register(deepspeed_shm_buffer(self.global_rank).unlink, missing_ok=True)

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        import deepspeed

        # a CPU device has no index; DeepSpeed takes the local rank as the device rank instead
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank),
            config=self.config,
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, ds_optimizer


def build_strategy(
    preset: str | None,
    nvme_path: str | None,
    batch_size: int,
    on_gpu: bool,
    world_size: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    load_universal: bool = False,
    precision: str | None = None,
    compiled: bool = False,
) -> Strategy | str:
    """ "auto" for one device, DDP for several, a DeepSpeed strategy with a preset. The processes
    meet while they start with at least STARTUP_TIMEOUT seconds to spare (ranks started one after
    another, each importing torch on a busy node); from the first step, every collective times out
    after `timeout` seconds (llm/launch/collectives.py)."""
    timeout = max(timeout, STARTUP_TIMEOUT)
    if not preset:
        return DDPStrategy(timeout=timedelta(seconds=timeout)) if world_size and world_size > 1 else "auto"
    config = load_preset(preset, nvme_path)
    # Lightning derives the rest (accumulation, clipping, precision) from the trainer
    config["train_micro_batch_size_per_gpu"] = batch_size
    zero = config.get("zero_optimization")
    if zero and (world_size == 1 or (compiled and zero.get("stage") in (1, 2))):
        # nothing to overlap, and overlapping adds a synchronisation at each reduction (a 20% cost
        # measured on one H200, configs/deepspeed/zero2.yaml): one process reduces nothing, and under
        # ZeRO-1/2 a whole-model compile hands DeepSpeed every gradient at once, at the end of the
        # backward pass (ZeRO-3's per-module hooks break a compiled model into one graph per module)
        zero["overlap_comm"] = False
    if precision in ("bf16-mixed", "bf16-true") and "bf16" not in config:
        # said, not left to the release's default (it changed between releases): a non-finite
        # gradient skips the step, which llm/train/guards.py counts
        config["bf16"] = {"enabled": True, "check_grad_overflow": True}
    if precision in ("bf16-mixed", "bf16-true") and zero and zero.get("stage") in (2, 3):
        # the micro-batches' gradients summed in float32, as without DeepSpeed, not in the model's
        # bf16 (DeepSpeed's default), whose 8 bits of mantissa lose the small terms of a long sum.
        # Not under ZeRO-1: there DeepSpeed 0.19 answers fp32 by swapping its ZeRO optimizer for
        # BF16_Optimizer, another optimizer with another checkpoint layout
        config.setdefault("data_types", {})["grad_accum_dtype"] = "fp32"
    if load_universal:  # resuming from a universal checkpoint (llm/checkpointing/universal.py)
        config.setdefault("checkpoint", {})["load_universal"] = True
    if on_gpu:
        strategy = RunDeepSpeedStrategy(config=config, timeout=timedelta(seconds=timeout))
    else:
        strategy = CPUDeepSpeedStrategy(config=config, process_group_backend="gloo", timeout=timedelta(seconds=timeout))
    strategy.preset = Path(preset).stem
    return strategy


def _post_order(module: torch.nn.Module):
    for child in module.children():
        yield from _post_order(child)
    yield module


def reinit_partitioned(model: torch.nn.Module, init_fn) -> None:
    """Under ZeRO-3 each module's parameters are partitioned as soon as the module is built, so an
    initialisation applied afterwards would touch empty shards. Gather one module at a time (never
    the whole model), initialise on rank 0, and let DeepSpeed scatter the result: the weights equal
    those of the same seed without ZeRO."""
    import deepspeed

    for module in _post_order(model):  # the order of nn.Module.apply, so the random draws match
        params = list(module.parameters(recurse=False))
        if params:
            with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                init_fn(module)
