"""DeepSpeed presets (configs/deepspeed/*.yaml, or a user's .json or .yaml): which there are, each
one read and checked, NVMe offload paths filled in, and what a preset says about the run (whether it
offloads the optimizer). The strategy that runs a preset is llm/train/strategy.py."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import yaml

from llm.errors import ConfigError, exception_line
from llm.paths import configs

# the trainer and data configs own these; a preset that sets them would make two sources of truth
OWNED_ELSEWHERE = {
    "train_micro_batch_size_per_gpu": "data.batch_size",
    "train_batch_size": "data.batch_size and trainer.accumulate_grad_batches",
    "gradient_accumulation_steps": "trainer.accumulate_grad_batches",
    "gradient_clipping": "trainer.gradient_clip_val",
    "fp16": "trainer.precision",
    "bf16": "trainer.precision",
    "optimizer": "model.optimizer",
    "scheduler": "model.optimizer",
}


def preset_names() -> list[str]:
    return sorted(p.stem for p in configs("deepspeed").glob("*.yaml"))


def load_preset(name: str, nvme_path: str | None = None) -> dict:
    """The DeepSpeed config of a preset name (or a .json or .yaml path), checked; NVMe paths filled in."""
    path = Path(name) if name.endswith((".json", ".yaml", ".yml")) else configs("deepspeed") / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"deepspeed={name}: no such preset; use one of {', '.join(preset_names())} (DS=), "
            "or a path to a DeepSpeed .json or .yaml"
        )
    try:
        config = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        kind = path.suffix[1:].upper()
        raise ConfigError(f"deepspeed={name}: {path} is not valid {kind} ({exception_line(exc, 400)})") from exc
    if not isinstance(config, dict):
        raise ConfigError(f"deepspeed={name}: {path} holds no DeepSpeed config (a mapping with zero_optimization)")
    for key, owner in OWNED_ELSEWHERE.items():
        if key in config:
            raise ConfigError(f"deepspeed={name}: sets {key}, which comes from {owner}; remove it from {path}")
    zero = config.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    if zero.get("offload_param") and stage < 3:
        raise ConfigError(
            f"deepspeed={name}: offload_param (parameter offload) needs ZeRO stage 3, "
            f"the preset has stage {stage}; use zero3_offload, or offload_optimizer only"
        )
    for section in ("offload_optimizer", "offload_param"):
        offload = zero.get(section) or {}
        if offload.get("device") == "nvme":
            offload["nvme_path"] = check_nvme_path(nvme_path or offload.get("nvme_path"), name)
    return config


def check_nvme_path(path: str | None, preset: str) -> str:
    if not path:
        raise ConfigError(
            f"nvme_path=: preset {preset} offloads to NVMe; set NVME_PATH= to a folder on a fast local disk"
        )
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"nvme_path={path}: no such folder; create it on a fast local disk or choose another")
    try:
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise ConfigError(f"nvme_path={path}: not writable ({exc.strerror}); choose a folder you can write to") from exc
    return str(folder.resolve())


def offloads_optimizer(config: dict) -> bool:
    device = (config.get("zero_optimization", {}).get("offload_optimizer") or {}).get("device")
    return device in ("cpu", "nvme")
