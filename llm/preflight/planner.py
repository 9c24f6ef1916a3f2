"""The memory a run needs on each device, per ZeRO stage and offload: what `make plan` tabulates,
what DS=auto and --data.batch_size=auto choose from, and what summary.json sets beside the peak
the run measured.

Model states (parameters, gradients, Adam moments) with mixed precision and Ψ parameters on N
data-parallel GPUs, per GPU, as in the ZeRO paper (Rajbhandari et al. 2020, section 5):
    stage 0 (DDP) 16Ψ   stage 1  4Ψ + 12Ψ/N   stage 2  2Ψ + 14Ψ/N   stage 3  16Ψ/N
(fp32 training holds the same 16 bytes a parameter: weights, gradients and two moments in fp32.)
Rows with offload use DeepSpeed's own estimators (estimate_zero2/3_model_states_mem_needs), which
also give the CPU memory per node those rows need.

Activations per GPU, bf16, for a micro batch of b sequences of s tokens, h wide, L layers, V
vocabulary (Korthikanti et al. 2022, eq. 1, with the attention matrix never stored, as
scaled_dot_product_attention's fused kernels do):
    without activation checkpointing  34·s·b·h·L
    with it                           2·s·b·h·L + 34·s·b·h   (block inputs, plus one block recomputed)
    plus the logits and their fp32 copy and gradient: 10·s·b·V
fp32 activations (32-true) take twice the bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import yaml

from llm.config import compute_dtype
from llm.model import ModelConfig, Transformer, count_params
from llm.paths import configs
from llm.preflight.presets import preset_names

GiB = 2**30
OVERHEAD_BYTES = 2 * GiB  # CUDA context, NCCL buffers, allocator fragmentation: a floor that always goes
OFFLOAD_COST = {None: 0, "cpu": 1, "nvme": 2}  # offload moves work onto PCIe and the CPU, NVMe onto the disk


def preset_shape(config: dict) -> tuple[int, str | None, bool]:
    """(stage, offload device, parameters offloaded too) of a DeepSpeed config."""
    zero = config.get("zero_optimization", {})
    devices = [(zero.get(k) or {}).get("device") for k in ("offload_optimizer", "offload_param")]
    optim, params = (d if d not in (None, "none") else None for d in devices)
    return zero.get("stage", 0), params or optim, params is not None


def plan_rows() -> list[tuple[str, int, str | None, bool]]:
    """(preset, stage, offload device, parameters offloaded too) for plain DDP and every preset in
    configs/deepspeed/, read from the preset itself; fastest first."""
    rows: list[tuple[str, int, str | None, bool]] = [("ddp", 0, None, False)]
    for name in preset_names():
        rows.append((name, *preset_shape(yaml.safe_load((configs("deepspeed") / f"{name}.yaml").read_text()) or {})))
    return sorted(rows, key=lambda r: (OFFLOAD_COST[r[2]], r[1]))


@dataclass
class Row:
    preset: str
    stage: int
    offload: str
    model_states_gib: float  # per GPU
    activations_gib: float  # per GPU
    total_gib: float  # per GPU, with the overhead
    cpu_per_node_gib: float  # for offload rows; the data loader and the rest come on top
    nvme_per_node_gib: float
    fits: bool

    def reason(self, memory_gib: float, overhead_gib: float) -> str:
        """The row as one line: why it was chosen."""
        return (
            f"model states {gib(self.model_states_gib)} + activations {gib(self.activations_gib)} + overhead "
            f"{gib(overhead_gib)} = {gib(self.total_gib)} GiB of {gib(memory_gib)} GiB per device"
        )


def gib(value: float) -> str:
    """GiB as a line shows them: two decimals, and three figures below one GiB (a small model's states)."""
    return f"{value:,.2f}" if value >= 1 else f"{value:.3g}"


def zero_paper_bytes(stage: int, psi: int, n: int) -> float:
    """Model-state bytes per GPU with mixed-precision Adam (ZeRO paper)."""
    return {0: 16 * psi, 1: 4 * psi + 12 * psi / n, 2: 2 * psi + 14 * psi / n, 3: 16 * psi / n}[stage]


def activation_bytes(
    config: ModelConfig, micro_batch: int, seq_len: int, checkpointing: bool, value_bytes: int = 2
) -> float:
    sbh = seq_len * micro_batch * config.n_embd
    blocks = 2 * sbh * config.n_layer + 34 * sbh if checkpointing else 34 * sbh * config.n_layer
    return blocks * value_bytes / 2 + 10 * seq_len * micro_batch * (config.vocab_size or 0)


def largest_layer_params(config: ModelConfig) -> int:
    with torch.device("meta"):
        model = Transformer(config)
    return max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())


def row(
    config: ModelConfig,
    shape: tuple[str, int, str | None, bool],
    gpus: int,
    nnodes: int,
    gpu_mem: float,
    cpu_mem: float | None = None,
    micro_batch: int = 8,
    seq_len: int | None = None,
    checkpointing: bool = False,
    value_bytes: int = 2,
    overhead_bytes: float = OVERHEAD_BYTES,
    psi: int | None = None,
    largest: int | None = None,
) -> Row:
    """The memory of one preset (`shape`: an entry of plan_rows) per device and per node. `psi` and
    `largest` (parameters, and those of the largest layer) are counted here unless given: a caller
    that sizes many rows of one model counts them once (`model_sizes`)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    preset, stage, device, params_offloaded = shape
    psi = psi or count_params(config)
    activations = activation_bytes(config, micro_batch, seq_len or config.block_size, checkpointing, value_bytes)
    cpu, nvme = 0.0, 0.0
    if device is None:
        states = zero_paper_bytes(stage, psi, gpus * nnodes)
    elif stage < 3:
        cpu, states = estimate_zero2_model_states_mem_needs(psi, gpus, nnodes, cpu_offload=True)
    else:
        cpu, states, _ = estimate_zero3_model_states_mem_needs(
            psi,
            largest or largest_layer_params(config),
            gpus,
            nnodes,
            cpu_offload=True,
            cpu_offload_params=params_offloaded,
        )
    if device == "nvme":  # the same states, on disk; the CPU keeps only staging buffers
        cpu, nvme = 0.0, cpu
    offload = f"optim{'+params' if params_offloaded else ''}→{device}" if device else None
    total = states + activations + overhead_bytes
    fits = total <= gpu_mem * GiB and (cpu_mem is None or cpu <= cpu_mem * GiB)
    return Row(preset, stage, offload or "-", states / GiB, activations / GiB, total / GiB, cpu / GiB, nvme / GiB, fits)


def plan(
    config: ModelConfig, gpus: int, nnodes: int, gpu_mem: float, cpu_mem: float | None = None, **kwargs
) -> list[Row]:
    """Every preset's row, fastest first (keyword arguments: those of `row`)."""
    sizes = model_sizes(config)
    return [row(config, shape, gpus, nnodes, gpu_mem, cpu_mem, **sizes, **kwargs) for shape in plan_rows()]


def model_sizes(config: ModelConfig) -> dict:
    """`row`'s psi and largest, counted once."""
    return {"psi": count_params(config), "largest": largest_layer_params(config)}


def value_bytes(precision: str | None) -> int:
    """Bytes of one activation under a Lightning precision (None: a GPU's default, bf16-mixed)."""
    return compute_dtype(precision or "bf16-mixed").itemsize


def run_row(
    config: ModelConfig,
    deepspeed: dict | None,
    world: int,
    nnodes: int,
    micro_batch: int,
    checkpointing: bool,
    precision: str,
    memory_gib: float = float("inf"),
    overhead_bytes: float = 0.0,
) -> Row:
    """The row of a run's own settings: its DeepSpeed config (None: DDP or one device), its world
    size, micro-batch, activation checkpointing and precision."""
    shape = ("ddp", 0, None, False) if deepspeed is None else ("deepspeed", *preset_shape(deepspeed))
    return row(
        config,
        shape,
        max(world // max(nnodes, 1), 1),
        max(nnodes, 1),
        memory_gib,
        micro_batch=micro_batch,
        checkpointing=checkpointing,
        value_bytes=value_bytes(precision),
        overhead_bytes=overhead_bytes,
    )


def recommend(rows: list[Row]) -> Row | None:
    return next((r for r in rows if r.fits), None)
