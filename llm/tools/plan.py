"""Memory per GPU and per node for each ZeRO stage and offload, and the fastest preset that fits.

Model states (parameters, gradients, Adam moments) with mixed precision and Ψ parameters on N
data-parallel GPUs, per GPU, as in the ZeRO paper (Rajbhandari et al. 2020, section 5):
    stage 0 (DDP) 16Ψ   stage 1  4Ψ + 12Ψ/N   stage 2  2Ψ + 14Ψ/N   stage 3  16Ψ/N
Rows with offload use DeepSpeed's own estimators (estimate_zero2/3_model_states_mem_needs), which
also give the CPU memory per node those rows need.

Activations per GPU, bf16, for a micro batch of b sequences of s tokens, h wide, L layers, V
vocabulary (Korthikanti et al. 2022, eq. 1, with the attention matrix never stored, as
scaled_dot_product_attention's fused kernels do):
    without activation checkpointing  34·s·b·h·L
    with it                           2·s·b·h·L + 34·s·b·h   (block inputs, plus one block recomputed)
    plus the logits and their fp32 copy and gradient: 10·s·b·V
"""

from __future__ import annotations

import json as jsonlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml

from llm.config import model_config_of
from llm.errors import ConfigError
from llm.model import ModelConfig, Transformer, count_params
from llm.paths import configs
from llm.train.strategy import preset_names

GiB = 2**30
OVERHEAD_BYTES = 2 * GiB  # CUDA context, NCCL buffers, allocator fragmentation: a floor that always goes
OFFLOAD_COST = {None: 0, "cpu": 1, "nvme": 2}  # offload moves work onto PCIe and the CPU, NVMe onto the disk


def plan_rows() -> list[tuple[str, int, str | None, bool]]:
    """(preset, stage, offload device, parameters offloaded too) for plain DDP and every preset in
    configs/deepspeed/, read from the preset itself; fastest first."""
    rows = [("ddp", 0, None, False)]
    for name in preset_names():
        zero = (yaml.safe_load((configs("deepspeed") / f"{name}.yaml").read_text()) or {}).get("zero_optimization", {})
        devices = [(zero.get(k) or {}).get("device") for k in ("offload_optimizer", "offload_param")]
        optim, params = (d if d not in (None, "none") else None for d in devices)
        rows.append((name, zero.get("stage", 0), params or optim, params is not None))
    return sorted(rows, key=lambda r: (OFFLOAD_COST[r[2]], r[1]))


@dataclass
class Row:
    preset: str
    stage: int
    offload: str
    model_states_gib: float  # per GPU
    activations_gib: float  # per GPU
    total_gib: float  # per GPU, with OVERHEAD_BYTES
    cpu_per_node_gib: float  # for offload rows; the data loader and the rest come on top
    nvme_per_node_gib: float
    fits: bool


def zero_paper_bytes(stage: int, psi: int, n: int) -> float:
    """Model-state bytes per GPU with mixed-precision Adam (ZeRO paper)."""
    return {0: 16 * psi, 1: 4 * psi + 12 * psi / n, 2: 2 * psi + 14 * psi / n, 3: 16 * psi / n}[stage]


def activation_bytes(config: ModelConfig, micro_batch: int, seq_len: int, checkpointing: bool) -> float:
    sbh = seq_len * micro_batch * config.n_embd
    blocks = 2 * sbh * config.n_layer + 34 * sbh if checkpointing else 34 * sbh * config.n_layer
    return blocks + 10 * seq_len * micro_batch * config.vocab_size


def largest_layer_params(config: ModelConfig) -> int:
    with torch.device("meta"):
        model = Transformer(config)
    return max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())


def load_model_config(model: str) -> ModelConfig:
    path = Path(model) if model.endswith(".yaml") else configs("model") / f"{model}.yaml"
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in configs("model").glob("*.yaml")))
        raise ConfigError(f"model={model}: no such preset; use one of {names} (MODEL=)")
    fields = yaml.safe_load(path.read_text())
    if fields.get("vocab_size") is None:
        fields["vocab_size"] = 50304  # a preset that follows its tokenizer: plan for GPT-2's
    try:
        return model_config_of(fields)
    except ValueError as exc:
        raise ConfigError(f"model={model}: {exc}") from None


def plan(
    config: ModelConfig,
    gpus: int,
    nnodes: int,
    gpu_mem: float,
    cpu_mem: float | None = None,
    micro_batch: int = 8,
    seq_len: int | None = None,
    checkpointing: bool = False,
) -> list[Row]:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    psi = count_params(config)
    n = gpus * nnodes
    seq_len = seq_len or config.block_size
    activations = activation_bytes(config, micro_batch, seq_len, checkpointing)
    largest = largest_layer_params(config)
    rows = []
    for preset, stage, device, params_offloaded in plan_rows():
        cpu, nvme = 0.0, 0.0
        if device is None:
            states = zero_paper_bytes(stage, psi, n)
        elif stage < 3:
            cpu, states = estimate_zero2_model_states_mem_needs(psi, gpus, nnodes, cpu_offload=True)
        else:
            cpu, states, _ = estimate_zero3_model_states_mem_needs(
                psi, largest, gpus, nnodes, cpu_offload=True, cpu_offload_params=params_offloaded
            )
        if device == "nvme":  # the same states, on disk; the CPU keeps only staging buffers
            cpu, nvme = 0.0, cpu
        offload = f"optim{'+params' if params_offloaded else ''}→{device}" if device else None
        total = states + activations + OVERHEAD_BYTES
        fits = total <= gpu_mem * GiB and (cpu_mem is None or cpu <= cpu_mem * GiB)
        rows.append(
            Row(
                preset, stage, offload or "-", states / GiB, activations / GiB, total / GiB, cpu / GiB, nvme / GiB, fits
            )
        )
    return rows


def recommend(rows: list[Row]) -> Row | None:
    return next((row for row in rows if row.fits), None)


def plan_main(
    model: str = "gpt2-124m",
    gpus: int = 8,
    nnodes: int = 1,
    gpu_mem: float = 80.0,
    cpu_mem: float | None = None,
    micro_batch: int = 8,
    seq_len: int | None = None,
    activation_checkpointing: bool = False,
    json: bool = False,
) -> dict:
    """Plan the memory of a run per ZeRO stage and offload, and recommend the fastest preset that fits.

    Args:
        model: a preset in configs/model/ or a .yaml path (MODEL=)
        gpus: GPUs per node (GPUS=)
        nnodes: nodes (NNODES=)
        gpu_mem: GiB of memory per GPU (GPU_MEM=)
        cpu_mem: GiB of CPU memory per node (CPU_MEM=); none: not checked
        micro_batch: sequences per GPU per micro-batch the activations are planned for
        seq_len: tokens per sequence (none: the model's block_size)
        activation_checkpointing: plan with each block recomputed in the backward pass
        json: print one JSON object instead of a table (--json=true), as make eval does
    """
    for name, value in (("gpus", gpus), ("nnodes", nnodes), ("micro_batch", micro_batch)):
        if value < 1:
            raise ConfigError(f"{name}={value}: must be at least 1")
    if gpu_mem <= 0:
        raise ConfigError(f"gpu_mem={gpu_mem}: give the GiB of memory of one GPU, e.g. 80")
    config = load_model_config(model)
    rows = plan(config, gpus, nnodes, gpu_mem, cpu_mem, micro_batch, seq_len, activation_checkpointing)
    best = recommend(rows)
    result = {
        "model": model,
        "params": count_params(config),
        "gpus_per_node": gpus,
        "nnodes": nnodes,
        "gpu_mem_gib": gpu_mem,
        "cpu_mem_gib": cpu_mem,
        "micro_batch": micro_batch,
        "seq_len": seq_len or config.block_size,
        "activation_checkpointing": activation_checkpointing,
        "overhead_gib": OVERHEAD_BYTES / GiB,
        "rows": [asdict(r) for r in rows],
        "recommended": best.preset if best else None,
    }
    if json:
        print(jsonlib.dumps(result, indent=2))
    else:
        print_table(result, rows, best)
    return result


def print_table(result: dict, rows: list[Row], best: Row | None) -> None:
    from rich.console import Console
    from rich.table import Table

    r = result
    title = (
        f"{r['model']} ({r['params'] / 1e6:,.0f}M parameters) on {r['nnodes']} x {r['gpus_per_node']} GPUs "
        f"of {r['gpu_mem_gib']:g} GiB; micro batch {r['micro_batch']} x {r['seq_len']} tokens, bf16, "
        f"activation checkpointing {'on' if r['activation_checkpointing'] else 'off'}"
    )
    table = Table(title=title, title_justify="left")
    for column in ("DS=", "stage", "offload", "states", "activations", "total/GPU", "CPU/node", "NVMe/node", "fits"):
        table.add_column(column, justify="left" if column in ("DS=", "offload") else "right", no_wrap=True)
    for row in rows:
        table.add_row(
            "" if row.preset == "ddp" else row.preset,
            str(row.stage),
            row.offload,
            f"{row.model_states_gib:,.1f}",
            f"{row.activations_gib:,.1f}",
            f"{row.total_gib:,.1f}",
            f"{row.cpu_per_node_gib:,.1f}",
            f"{row.nvme_per_node_gib:,.1f}",
            "yes" if row.fits else "no",
        )
    # never narrower than the table: a terminal that is, or a pipe and a log, get every name whole
    console = Console(width=max(Console().width, Console(width=1000).measure(table).maximum))
    console.print(table)
    console.print(
        f"GiB per GPU: model states (params, grads, Adam) + activations + {r['overhead_gib']:g} GiB of CUDA "
        "context and buffers. The formulas: python -c 'import llm.tools.plan; help(llm.tools.plan)'"
    )
    if best is None:
        console.print(
            "Nothing fits: plan with --activation_checkpointing=true (train with "
            "ARGS='--model.activation_checkpointing=true'), a smaller --micro_batch, or more GPUs."
        )
    else:
        console.print(
            f"recommended: DS={'' if best.preset == 'ddp' else best.preset}"
            f"{'  (plain DDP)' if best.preset == 'ddp' else ''}"
        )
