"""Checkpoints outside training: the plain Transformer, its tokenizer and the run's config, from
the self-contained checkpoints training writes (see run.RunInfo), whether one file or a DeepSpeed
ZeRO folder of shards; and the conversion of such a folder into one fp32 file."""

from __future__ import annotations

import contextlib
import os
import pickle
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from llm.config import RunConfig, model_config_of  # also registers the checkpoint's dataclasses for torch.load
from llm.errors import ConfigError, exception_line
from llm.model import ModelConfig, Transformer

# what this project reads from rank 0's model-states file of a ZeRO checkpoint: what run.RunInfo
# adds, and Lightning's step; the rest there is DeepSpeed's own (its partition, optimizer, ...)
CLIENT_KEYS = ("llm_config", "llm_format", "tokenizer_json", "data_meta", "global_step", "world_size", "command")
FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"  # torch reads it at every load


@dataclass
class Loaded:
    model: Transformer
    tokenizer: Tokenizer
    eot_id: int
    config: dict  # the run's resolved config
    data_meta: dict
    step: int
    world_size: int = 1  # processes that trained it

    @property
    def run_config(self) -> RunConfig:
        return RunConfig.from_dict(self.config)


def model_config_from(config: dict) -> ModelConfig:
    return model_config_of(config["model"]["config"])


def is_sharded(path: Path) -> bool:
    return path.is_dir() and (path / "latest").is_file()


def is_complete(path: Path) -> bool:
    """A whole checkpoint file (torch.save writes a zip whose directory comes last), or a DeepSpeed
    checkpoint folder whose `latest` tag names a written step."""
    if path.is_file():
        return zipfile.is_zipfile(path)
    if path.is_dir() and (path / "latest").is_file():
        return (path / (path / "latest").read_text().strip()).is_dir()
    return False


def client_state_file(path: Path) -> Path:
    """Rank 0's model-states file of a ZeRO checkpoint folder: DeepSpeed's and Lightning's state."""
    tag = (path / "latest").read_text().strip()
    states = sorted((path / tag).glob("*model_states.pt"))  # rank 0's sorts first
    if not states:
        raise ConfigError(f"ckpt={path}: its tag folder {tag} holds no model states; the save did not finish")
    return states[0]


@contextlib.contextmanager
def weights_only_loads():
    """Every torch.load inside, DeepSpeed's own included (they pass weights_only=False), loads
    tensors and plain data only: a checkpoint from a user path never runs code when read."""
    if "deepspeed" in sys.modules:
        allow_deepspeed_types()
    previous = os.environ.get(FORCE_WEIGHTS_ONLY)
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[FORCE_WEIGHTS_ONLY]
        else:
            os.environ[FORCE_WEIGHTS_ONLY] = previous


def allow_deepspeed_types() -> None:
    """The plain-data classes DeepSpeed writes into its optimizer shards (its loss scaler, ZeRO's
    stage, a parameter's place in the flat buffer): loadable, none of them runs code when loaded."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    torch.serialization.add_safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address])


def safe_load(file: Path, field: str, mmap: bool = False) -> dict:
    """torch.load with weights_only=True; anything else in the file is one line, not a traceback."""
    try:
        with weights_only_loads():
            ckpt = torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        raise ConfigError(
            f"{field}={file}: holds objects other than tensors and plain data, refused unread "
            f"({exception_line(exc)}); use a checkpoint this project wrote"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise ConfigError(
            f"{field}={file}: not a readable checkpoint ({exception_line(exc)}); it may be truncated; "
            "give another one, e.g. runs/<name>/checkpoints/last.ckpt"
        ) from exc
    if not isinstance(ckpt, dict) or "llm_config" not in ckpt:
        raise ConfigError(f"{field}={file}: not a checkpoint of this project (no llm_config); give one of a run's")
    return ckpt


def _refuse_payload(file: Path, path: Path, field: str) -> None:
    """The objects of one file, through the memory map (no tensor read): a payload is refused unread."""
    try:
        with weights_only_loads():
            torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        raise ConfigError(
            f"{field}={path}: {file.name} holds objects other than tensors and plain data, refused unread "
            f"({exception_line(exc)}); use a checkpoint this project wrote"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError):
        pass  # not a readable zip: verify_checkpoint says so, with the reason


def verify_checkpoint(path: str | Path, field: str = "ckpt", objects_read: bool = False) -> None:
    """Every file of a checkpoint against the CRC-32s its zip records, which torch.load does not
    check: a changed byte would otherwise load, silently, as a changed weight. Reads it whole.
    `objects_read`: the caller has already loaded the (one-file) checkpoint weights-only."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*.pt") if p.is_file()) if path.is_dir() else [path]
    if path.is_dir():
        allow_deepspeed_types()
    for file in files:
        if not objects_read:
            _refuse_payload(file, path, field)
        try:
            with zipfile.ZipFile(file) as archive:
                damaged = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise ConfigError(
                f"{field}={path}: {file.name} is not a readable checkpoint ({exception_line(exc)}); it may be "
                "truncated; give another one, e.g. runs/<name>/checkpoints/last.ckpt"
            ) from None
        if damaged:
            raise ConfigError(
                f"{field}={path}: {damaged} in {file.name} does not match the checksum the save wrote; the file "
                "is damaged: give another checkpoint (an earlier step-<n>.ckpt)"
            )


def read_header(path: str | Path, field: str = "ckpt") -> dict:
    """What a checkpoint was trained with, without reading its tensors: its resolved config, step
    and world size."""
    path = Path(path)
    if path.is_dir() and not is_sharded(path):
        raise ConfigError(f"{field}={path}: a folder that is no DeepSpeed checkpoint (no 'latest' file)")
    ckpt = safe_load(client_state_file(path) if path.is_dir() else path, field, mmap=True)
    return {
        "config": ckpt["llm_config"],
        "step": ckpt.get("global_step", 0),
        "world_size": ckpt.get("world_size"),
        "format": ckpt.get("llm_format", 1),
    }


def _read_sharded(path: Path) -> dict:
    """A ZeRO checkpoint folder, consolidated in memory by DeepSpeed's own zero_to_fp32."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    client = safe_load(client_state_file(path), "ckpt")
    ckpt = {k: client[k] for k in CLIENT_KEYS if k in client}
    tag = (path / "latest").read_text().strip()
    allow_deepspeed_types()
    with contextlib.redirect_stdout(sys.stderr), weights_only_loads():  # DeepSpeed reports progress on stdout
        ckpt["state_dict"] = get_fp32_state_dict_from_zero_checkpoint(str(path), tag)
    return ckpt


def run_folder_of(path: str | Path) -> Path | None:
    """The run folder a checkpoint lies in (runs/<name>/checkpoints/<ckpt>), or None. Where the
    checkpoint is, not the `run` its config names: a checkpoint's paths are data, never followed."""
    parent = Path(path).resolve().parent
    if parent.name == "checkpoints" and (parent.parent / "config.yaml").is_file():
        return parent.parent
    return None


def read_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    hint = "give runs/<name>/checkpoints/last.ckpt (a file, or a DeepSpeed folder)"
    if not str(path) or not path.exists():
        raise ConfigError(f"ckpt={path}: no such checkpoint; {hint}")
    if path.is_dir() and not is_sharded(path):
        raise ConfigError(f"ckpt={path}: a folder that is no DeepSpeed checkpoint (no 'latest' file); {hint}")
    if path.is_dir():
        verify_checkpoint(path)  # every shard: a payload refused unread, a damaged file named
        return _read_sharded(path)
    ckpt = safe_load(path, "ckpt")  # refuses a payload unread
    verify_checkpoint(path, objects_read=True)  # the zip's checksums: its objects were just read
    return ckpt


def load_for_inference(path: str | Path, device: str = "cpu") -> Loaded:
    return loaded_from(read_checkpoint(path), device)


def loaded_from(ckpt: dict, device: str = "cpu") -> Loaded:
    """The model, tokenizer and config of a checkpoint already read (read_checkpoint)."""
    config = ckpt["llm_config"]
    model = Transformer(model_config_from(config))
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    model.load_state_dict(state)
    model.to(device).eval()
    tokenizer = Tokenizer.from_str(ckpt["tokenizer_json"])
    meta = ckpt["data_meta"]
    step, world = ckpt.get("global_step", 0), ckpt.get("world_size") or 1
    return Loaded(model, tokenizer, meta["eot_id"], config, meta, step, world)


def export_fp32(ckpt: str, out: str) -> None:
    """Consolidate a sharded DeepSpeed checkpoint into one fp32 file (DeepSpeed's own conversion,
    through Lightning), loadable without DeepSpeed by `make sample`, `make eval` or torch.load.

    Args:
        ckpt: a DeepSpeed checkpoint folder, e.g. runs/<name>/checkpoints/last.ckpt (CKPT=)
        out: the file to write (OUT=); an existing file is not overwritten
    """
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    path, target = Path(ckpt), Path(out)
    if not is_sharded(path):
        raise ConfigError(f"ckpt={ckpt}: not a DeepSpeed checkpoint folder; a .ckpt file needs no conversion")
    if not out:
        raise ConfigError("out=: give the file to write, e.g. OUT=model-fp32.ckpt")
    if target.exists():
        raise ConfigError(f"out={out}: already exists; choose another name or remove it first")
    safe_load(client_state_file(path), "ckpt")  # not a folder of this project's runs: one line
    verify_checkpoint(path)  # every shard: a payload refused unread, a damaged file named
    target.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.redirect_stdout(sys.stderr), weights_only_loads():
        convert_zero_checkpoint_to_fp32_state_dict(str(path), str(target))
    print(f"wrote {target}")
