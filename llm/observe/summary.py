"""summary.json: what a run did and reached, written and printed at its end."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
from lightning.pytorch.strategies import DeepSpeedStrategy

from llm.checkpointing.run_info import RunInfo
from llm.checkpointing.saving import Checkpoints
from llm.model import count_params
from llm.observe.monitor import PerformanceMonitor, tokens_per_optimizer_step
from llm.preflight.planner import run_row
from llm.redact import scrub_text


def strategy_label(strategy) -> str:
    """ "deepspeed zero2", "ddp", "single_device": what ran, as the user chose it."""
    preset = getattr(strategy, "preset", None)  # RunDeepSpeedStrategy's, llm/train/strategy.py
    if preset:
        return f"deepspeed {preset}"
    name = type(strategy).__name__.removesuffix("Strategy")  # DDP, SingleDevice, FSDP, ...
    return {"DDP": "ddp", "SingleDevice": "single_device"}.get(name, name.lower())


def memory_figures(trainer: L.Trainer, datamodule, model, monitor: PerformanceMonitor) -> dict:
    """The planner's prediction for this run's own settings beside what it measured, per device
    (the largest over the ranks), both without what the process held before the model was built."""
    strategy = trainer.strategy
    deepspeed = strategy.config if isinstance(strategy, DeepSpeedStrategy) else None
    planned = run_row(
        model.config,
        deepspeed,
        trainer.world_size,
        trainer.num_nodes,
        datamodule.batch_size,
        model.activation_checkpointing,
        str(trainer.precision),
    )
    measured, baseline = monitor.memory_used or (None, None)
    return {
        "memory_planned_gib": round(planned.model_states_gib + planned.activations_gib, 4),
        "memory_measured_gib": None if measured is None else round(measured, 4),  # None: no step trained
        "memory_baseline_gib": None if baseline is None else round(baseline, 4),
    }


def write_summary(
    trainer: L.Trainer,
    datamodule,
    model,
    seconds: float,
    checkpoints: Checkpoints,
    info: RunInfo,
    monitor: PerformanceMonitor,
) -> dict:
    """summary.json: what the run did and reached; printed as well. Rank 0 writes it."""
    meta = datamodule.meta
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    tokens_per_step = tokens_per_optimizer_step(trainer, datamodule)
    session_tokens = (trainer.global_step - info.start_step) * tokens_per_step
    summary = {
        "steps": trainer.global_step,
        "tokens": trainer.global_step * tokens_per_step,
        "tokens_per_step": tokens_per_step,
        "accumulate_grad_batches": trainer.accumulate_grad_batches,
        "wall_seconds": round(seconds, 2),
        "tokens_per_second": round(session_tokens / info.train_seconds, 1) if info.train_seconds else 0.0,
        "final_train_loss": metrics.get("train/loss"),  # None when this session trained no step
        "final_val_loss": metrics.get("val/loss"),
        "unigram_val_entropy": meta["unigram_val_entropy"],
        "best_checkpoint": str(best) if (best := checkpoints.folder.best_path()) else None,
        "last_checkpoint": str(checkpoints.last_saved) if checkpoints.last_saved else info.resumed_from,
        "params": count_params(model.config),
        "world_size": trainer.world_size,
        "strategy": strategy_label(trainer.strategy),
        "precision": str(trainer.precision),
        "compile": model.compile_model,
        "float8": f"{model.float8}{' (emulated)' if model.float8_emulate else ''}, {len(model.float8_layers)} layers"
        if model.float8
        else None,
        "compile_seconds": round(monitor.compile_seconds, 2),
        # the longest save of this session: what SLURM's signal lead time (--signal) must exceed
        "save_seconds_max": round(
            max(checkpoints.save_seconds, default=0.0), 3
        ),  # included in wall_seconds, not in perf/ metrics
        **memory_figures(trainer, datamodule, model, monitor),
        "peak_flops": monitor.device_peak.flops,  # of one device: MFU's denominator
        "peak_flops_source": monitor.device_peak.source,
        "data": scrub_text(str(datamodule.folder)),
    }
    if trainer.is_global_zero:
        run_dir = Path(trainer.default_root_dir)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        width = max(len(k) for k in summary)
        print(f"\nsummary ({run_dir / 'summary.json'}):")
        for key, value in summary.items():
            if isinstance(value, float):
                shown = f"{value:.4f}" if key.endswith(("loss", "entropy")) else f"{value:,.1f}"
                shown = f"{value:.3g}" if key == "peak_flops" else shown
                shown = f"{value:.3f}" if key.endswith("_gib") else shown
            else:
                shown = f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else value
            print(f"  {key:<{width}}  {shown}")
    return summary
