"""DS=auto and --data.batch_size=auto: the run sized to the memory of the devices it gets, from
the planner (llm/preflight/planner.py), before anything is built.

DS=auto takes the fastest preset that fits (the first row of `make plan` that fits, at the
micro-batch given, or at the smallest one when the micro-batch is auto too); batch_size=auto
then takes the largest micro-batch that fits under that preset and makes whole micro-batches of
tokens_per_step, so that the optimizer step stays what the run states (the accumulation is
derived from it, llm/preflight/resolve.py). The memory a device has: --memory_gib, else the GPU's,
else on a CPU the host's memory shared by the processes on it.

Rank 0 decides and the other processes take its choice (a process's own view of free memory
could differ), through the launch agreement or, for the processes Lightning starts, LLM_AUTOSIZE.
"""

from __future__ import annotations

import json

import psutil
import torch

from llm import handoff, ranks
from llm.config import RunConfig, TrainerConfig, world_size_of
from llm.errors import ConfigError
from llm.launch.commands import available_devices
from llm.preflight.planner import OVERHEAD_BYTES, GiB, Row, model_sizes, plan_rows, preset_shape, row, value_bytes
from llm.preflight.presets import load_preset

# on a CPU, what a training process holds before its model is built: the interpreter, torch,
# Lightning and DeepSpeed (summary.json's memory_baseline_gib measured 0.56 GiB for `make train`)
CPU_OVERHEAD_BYTES = 1 * GiB


def wanted(run: RunConfig) -> bool:
    return run.options.deepspeed == "auto" or run.loader.batch_size == "auto"


def device_memory(memory_gib: float | None, on_gpu: bool, per_node: int) -> tuple[float, str]:
    """GiB of memory one device has, and where the figure came from."""
    if memory_gib is not None:
        if memory_gib <= 0:
            raise ConfigError(f"memory_gib={memory_gib}: out of range; use the GiB of one device, e.g. 80")
        return memory_gib, "--memory_gib"
    if on_gpu:
        return torch.cuda.get_device_properties(0).total_memory / GiB, torch.cuda.get_device_name(0)
    return psutil.virtual_memory().total / GiB / per_node, f"host memory / {per_node} processes"


def world_of(trainer: TrainerConfig, on_gpu: bool) -> tuple[int, int]:
    """(processes, nodes) the run will have."""
    nnodes = trainer.num_nodes or 1
    world = world_size_of(trainer.devices, nnodes)
    if world is None:  # devices: auto, as Lightning counts them
        world = available_devices(on_gpu)[0] * nnodes
    return world, nnodes


def micro_batches(run: RunConfig, world: int) -> list[int]:
    """The micro-batches that make whole micro-batch steps of tokens_per_step, smallest first."""
    tokens, block = run.options.tokens_per_step, run.model.block_size
    if tokens is None:
        raise ConfigError(
            "data.batch_size=auto: needs tokens_per_step, so that the optimizer step stays the same whatever "
            "micro-batch fits; add --tokens_per_step, e.g. 524288"
        )
    per_sequence = block * world
    if tokens < 1 or tokens % per_sequence:
        nearest = max(tokens // per_sequence, 1) * per_sequence
        raise ConfigError(
            f"tokens_per_step={tokens}: not a whole number of sequences of {block} tokens x {world} processes "
            f"({per_sequence:,} tokens); use tokens_per_step={nearest:,}"
        )
    sequences = tokens // per_sequence
    return [b for b in range(1, sequences + 1) if sequences % b == 0]


def decide(run: RunConfig, on_gpu: bool) -> dict:
    """{deepspeed, batch_size, line}: the preset and micro-batch this run takes, and why."""
    options, config, batch_size = run.options, run.model, run.loader.batch_size
    world, nnodes = world_of(run.trainer, on_gpu)
    memory, source = device_memory(options.memory_gib, on_gpu, max(world // nnodes, 1))
    overhead = OVERHEAD_BYTES if on_gpu else CPU_OVERHEAD_BYTES
    batches = micro_batches(run, world) if batch_size == "auto" else [batch_size]
    if options.deepspeed == "auto":
        shapes = plan_rows()
        if run.init or run.distill.teacher:  # ZeRO-3 is refused for both
            shapes = [s for s in shapes if s[1] < 3]
        if not options.nvme_path:  # NVMe offload only where the user named a disk for it
            shapes = [s for s in shapes if s[2] != "nvme"]
    elif options.deepspeed:
        shapes = [(options.deepspeed, *preset_shape(load_preset(options.deepspeed, options.nvme_path)))]
    else:
        shapes = [("ddp", 0, None, False)]
    cpu = psutil.virtual_memory().total / GiB  # offload's CPU memory per node
    sizes = model_sizes(config)

    def sized(shape, batch) -> Row:
        return row(
            config,
            shape,
            max(world // nnodes, 1),
            nnodes,
            memory,
            cpu,
            micro_batch=batch,
            checkpointing=run.activation_checkpointing,
            value_bytes=value_bytes(run.trainer.precision),
            overhead_bytes=overhead,
            **sizes,
        )

    shape = next((s for s in shapes if sized(s, batches[0]).fits), None)
    if shape is None:
        tried = sized(shapes[-1], batches[0])
        raise ConfigError(
            f"{'deepspeed' if options.deepspeed == 'auto' else 'data.batch_size'}=auto: nothing fits "
            f"{memory:,.2f} GiB per device ({source}) at a micro-batch of {batches[0]}; even {tried.preset} needs "
            f"{tried.total_gib:,.2f} GiB; use --model.activation_checkpointing=true, more devices, or more memory "
            "(--memory_gib)"
        )
    batch = max(b for b in batches if sized(shape, b).fits)
    chosen = sized(shape, batch)
    parts = []
    if options.deepspeed == "auto":
        parts.append(f"deepspeed=auto: {'none (DDP)' if shape[0] == 'ddp' else shape[0]}, the fastest preset that fits")
    if batch_size == "auto":
        parts.append(
            f"data.batch_size=auto: {batch}, the largest micro-batch that fits and makes whole steps of "
            f"tokens_per_step={options.tokens_per_step:,}"
        )
    line = "; ".join(parts) + f": {chosen.reason(memory, overhead / GiB)} ({source})"
    deepspeed = options.deepspeed if options.deepspeed != "auto" else (None if shape[0] == "ddp" else shape[0])
    return {"deepspeed": deepspeed, "batch_size": batch, "line": line}


def choose(run: RunConfig, on_gpu: bool, given: dict | None = None) -> dict | None:
    """{deepspeed, batch_size} for DS=auto and batch_size=auto: rank 0's choice (`given`, or
    LLM_AUTOSIZE), or this process's own when it is rank 0 (said, and handed on to the processes
    Lightning starts). None when the run asks for neither."""
    if not wanted(run):
        return None
    handed = handoff.received(handoff.AUTOSIZE)
    if given is None and handed and not ranks.is_first_process():
        given = json.loads(handed)
    choice = given or decide(run, on_gpu)
    if given is None:
        handoff.hand_on(handoff.AUTOSIZE, json.dumps(choice))
        ranks.say(choice["line"])
    return choice
