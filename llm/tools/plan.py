"""make plan: the memory of a run per ZeRO stage and offload, as a table, and the fastest preset that
fits. The formulas are llm/preflight/planner.py's (DS=auto and --data.batch_size=auto apply the same)."""

from __future__ import annotations

import json as jsonlib
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from llm.config import model_config_of
from llm.errors import ConfigError
from llm.model import ModelConfig, count_params
from llm.paths import configs
from llm.preflight.planner import OVERHEAD_BYTES, GiB, Row, plan, recommend


def load_model_config(model: str) -> ModelConfig:
    path = Path(model) if model.endswith(".yaml") else configs("model") / f"{model}.yaml"
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in configs("model").glob("*.yaml")))
        raise ConfigError(f"model.config={model}: no such preset; use one of {names} (MODEL=)")
    fields = yaml.safe_load(path.read_text())
    if fields.get("vocab_size") is None:
        fields["vocab_size"] = 50304  # a preset that follows its tokenizer: plan for GPT-2's
    try:
        return model_config_of(fields)
    except ValueError as exc:
        raise ConfigError(f"model.config={model}: {exc}") from None


@dataclass
class PlanModel:
    """the model, as training names it"""

    config: str = "gpt2-124m"  # a preset in configs/model/ or a .yaml path (MODEL=)
    activation_checkpointing: bool = False  # plan with each block recomputed in the backward pass


@dataclass
class PlanData:
    batch_size: int = 8  # sequences per device per micro-batch, the activations are planned for


@dataclass
class PlanTrainer:
    devices: int = 8  # devices per node (DEVICES=)
    num_nodes: int = 1  # nodes (NNODES=)


# the options of earlier releases, and training's names that replaced them (one name per concept)
RENAMED = {
    "model": "model.config",
    "gpus": "trainer.devices",
    "nnodes": "trainer.num_nodes",
    "micro_batch": "data.batch_size",
    "activation_checkpointing": "model.activation_checkpointing",
    "gpu_mem": "memory_gib",
}


def plan_main(
    model: PlanModel = PlanModel(),
    data: PlanData = PlanData(),
    trainer: PlanTrainer = PlanTrainer(),
    memory_gib: float = 80.0,
    cpu_mem: float | None = None,
    seq_len: int | None = None,
    json: bool = False,
) -> dict:
    """Plan the memory of a run per ZeRO stage and offload, and recommend the fastest preset that fits.
    The options are training's own (--trainer.devices, --data.batch_size, --memory_gib, ...).

    Args:
        model: the model (--model.config=, MODEL=) and whether blocks are recomputed
        data: the micro-batch per device
        trainer: devices per node (DEVICES=) and nodes (NNODES=)
        memory_gib: GiB of memory of one device (GPU_MEM=), as training's --memory_gib
        cpu_mem: GiB of CPU memory per node (CPU_MEM=); none: not checked
        seq_len: tokens per sequence (none: the model's block_size)
        json: print one JSON object instead of a table (--json=true), as make eval does
    """
    gpus, nnodes, micro_batch = trainer.devices, trainer.num_nodes, data.batch_size
    activation_checkpointing, gpu_mem = model.activation_checkpointing, memory_gib
    for name, value in (
        ("trainer.devices", gpus),
        ("trainer.num_nodes", nnodes),
        ("data.batch_size", micro_batch),
    ):
        if value < 1:
            raise ConfigError(f"{name}={value}: must be at least 1")
    if gpu_mem <= 0:
        raise ConfigError(f"memory_gib={gpu_mem}: give the GiB of memory of one GPU, e.g. 80")
    preset = model.config
    config = load_model_config(preset)
    rows = plan(
        config,
        gpus,
        nnodes,
        gpu_mem,
        cpu_mem,
        micro_batch=micro_batch,
        seq_len=seq_len,
        checkpointing=activation_checkpointing,
    )
    best = recommend(rows)
    result = {
        "model": preset,
        "params": count_params(config),
        "devices": gpus,
        "num_nodes": nnodes,
        "memory_gib": gpu_mem,
        "cpu_mem_gib": cpu_mem,
        "batch_size": micro_batch,
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
        f"{r['model']} ({r['params'] / 1e6:,.0f}M parameters) on {r['num_nodes']} x {r['devices']} GPUs "
        f"of {r['memory_gib']:g} GiB; micro batch {r['batch_size']} x {r['seq_len']} tokens, bf16, "
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
        "context and buffers. The formulas: python -c 'import llm.preflight.planner; help(llm.preflight.planner)'"
    )
    if best is None:
        console.print(
            "Nothing fits: plan and train with ARGS='--model.activation_checkpointing=true', a smaller "
            "--data.batch_size, or more GPUs."
        )
    else:
        console.print(
            f"recommended: DS={'' if best.preset == 'ddp' else best.preset}"
            f"{'  (plain DDP)' if best.preset == 'ddp' else ''}"
        )
