"""A checkpoint and a run's folder of them: the one place that knows their layout.

`Checkpoint` is one checkpoint training wrote (llm/checkpointing/saving.py): a file, or a DeepSpeed ZeRO
folder of shards. It says whether it is complete, reads its header (config, step, world size)
without its tensors, verifies every file against its checksums, reads it whole once (a ZeRO folder
consolidated to fp32) and loads the plain Transformer, tokenizer and config for inference.
`CheckpointFolder` is a run's checkpoints/: the step names, which are complete, `last` and `best`.

    checkpoints/
      step-000200.ckpt   one per save, never overwritten: a file, or a DeepSpeed folder of shards
      step-000300.ckpt   the newest `keep_last` are kept, and the best one
      last.ckpt          -> step-000300.ckpt   (symbolic links, swapped by an atomic rename)
      best.ckpt          -> step-000200.ckpt
      best.json          the best validation loss and its step

A save is written under `<name>.partial` and renamed to its final name once every rank has
written its part: a step name without the suffix is a complete checkpoint, unless the disk lost a
file of it since (`Checkpoint.complete` looks).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import re
import shutil
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from llm import compat
from llm.config import RunConfig, model_config_of  # also registers the checkpoint's dataclasses for torch.load
from llm.errors import ConfigError, exception_line
from llm.model import Transformer

# what this project reads from rank 0's model-states file of a ZeRO checkpoint: what train.callbacks.RunInfo
# adds, and Lightning's step; the rest there is DeepSpeed's own (its partition, optimizer, ...)
CLIENT_KEYS = (
    "llm_config",
    "llm_format",
    "tokenizer_json",
    "data_meta",
    "global_step",
    "world_size",
    "command",
    "teacher_digest",
    "validation",
)
FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"  # torch reads it at every load
STEP_NAME = re.compile(r"^step-(\d+)\.ckpt$")
HINT = "give runs/<name>/checkpoints/last.ckpt (a file, or a DeepSpeed folder)"


@dataclass
class Loaded:
    """What inference needs from a checkpoint: the model, its tokenizer and the run's config."""

    model: Transformer
    tokenizer: Tokenizer
    eot_id: int
    config: dict  # the run's resolved config
    data_meta: dict
    step: int
    world_size: int = 1  # processes that trained it

    @classmethod
    def from_contents(cls, ckpt: dict, device: str = "cpu") -> Loaded:
        """From a checkpoint read whole (Checkpoint.read)."""
        config = ckpt["llm_config"]
        model = Transformer(model_config_of(config["model"]["config"]))
        model.load_state_dict({k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()})
        model.to(device).eval()
        meta = ckpt["data_meta"]
        step, world = ckpt.get("global_step", 0), ckpt.get("world_size") or 1
        return cls(model, Tokenizer.from_str(ckpt["tokenizer_json"]), meta["eot_id"], config, meta, step, world)

    @property
    def run_config(self) -> RunConfig:
        return RunConfig.from_dict(self.config)


@dataclass(frozen=True)
class Header:
    """What a checkpoint was trained with, read without its tensors."""

    config: dict  # the run's resolved config, as config.yaml holds it
    step: int
    world_size: int | None
    format: int  # CHECKPOINT_FORMAT of the version that wrote it
    teacher_digest: str | None = None  # a distillation's: its teacher's content_digest

    @property
    def run_config(self) -> RunConfig:
        return RunConfig.from_dict(self.config)


def content_digest(path: str, field: str) -> str:
    """What identifies a model's contents (a distillation's teacher, which a resume must find
    unchanged): a checkpoint's `Checkpoint.digest`, or a transformers folder's config and weights,
    hashed."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        return Checkpoint(path, field).digest()
    digest = hashlib.sha256()
    for file in sorted([folder / "config.json", *folder.glob("*.safetensors"), *folder.glob("*.bin")]):
        digest.update(file.name.encode() + b"\0")
        with open(file, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()[:16]


class Checkpoint:
    """One checkpoint: a file (torch.save's zip) or a DeepSpeed ZeRO folder of shards whose `latest`
    names its tag. `field` is the setting that named it, for the one-line errors (ckpt, resume)."""

    def __init__(self, path: str | Path, field: str = "ckpt"):
        self.path, self.field = Path(path), field

    def __str__(self) -> str:
        return str(self.path)

    @property
    def sharded(self) -> bool:
        return self.path.is_dir() and (self.path / "latest").is_file()

    @property
    def complete(self) -> bool:
        """A whole file (torch.save writes a zip whose directory comes last), or a DeepSpeed folder
        whose `latest` tag names a written step."""
        if self.path.is_file():
            return zipfile.is_zipfile(self.path)
        if self.sharded:
            return (self.path / self._tag()).is_dir()
        return False

    @property
    def run_folder(self) -> Path | None:
        """The run folder it lies in (runs/<name>/checkpoints/<ckpt>), or None. Where the checkpoint
        is, not the `run` its config names: a checkpoint's paths are data, never followed."""
        parent = self.path.resolve().parent
        if parent.name == "checkpoints" and (parent.parent / "config.yaml").is_file():
            return parent.parent
        return None

    def _tag(self) -> str:
        return (self.path / "latest").read_text().strip()

    def _check_exists(self) -> None:
        if not str(self.path) or not self.path.exists():
            raise ConfigError(f"{self.field}={self.path}: no such checkpoint; {HINT}")
        if self.path.is_dir() and not self.sharded:
            raise ConfigError(
                f"{self.field}={self.path}: a folder that is no DeepSpeed checkpoint (no 'latest' file); {HINT}"
            )

    def client_state_file(self) -> Path:
        """The file with this project's keys: the checkpoint itself, or rank 0's model-states file
        of a ZeRO folder (DeepSpeed's and Lightning's state)."""
        if not self.path.is_dir():
            return self.path
        tag = self._tag()
        states = sorted((self.path / tag).glob("*model_states.pt"))  # rank 0's sorts first
        if not states:
            raise ConfigError(
                f"{self.field}={self.path}: its tag folder {tag} holds no model states; the save did not finish"
            )
        return states[0]

    def header(self) -> Header:
        """Its config, step and world size, through the memory map: no tensor is read."""
        self._check_exists()
        ckpt = safe_load(self.client_state_file(), self.field, mmap=True)
        return Header(
            ckpt["llm_config"],
            ckpt.get("global_step", 0),
            ckpt.get("world_size"),
            ckpt.get("llm_format", 1),
            ckpt.get("teacher_digest"),
        )

    def digest(self) -> str:
        """What identifies its contents, from the CRC-32 and size of every member of its zip files
        (their central directories: no tensor is read): another checkpoint, or this one changed,
        has another digest."""
        self._check_exists()
        files = sorted(p for p in self.path.rglob("*.pt") if p.is_file()) if self.path.is_dir() else [self.path]
        digest = hashlib.sha256()
        for file in files:
            with zipfile.ZipFile(file) as archive:
                for info in archive.infolist():
                    digest.update(f"{info.filename} {info.CRC} {info.file_size}\n".encode())
        return digest.hexdigest()[:16]

    def verify(self, objects_read: bool = False) -> None:
        """Every file against the CRC-32s its zip records, which torch.load does not check: a changed
        byte would otherwise load, silently, as a changed weight. Reads it whole. `objects_read`: the
        caller has already loaded the (one-file) checkpoint weights-only."""
        path, field = self.path, self.field
        files = sorted(p for p in path.rglob("*.pt") if p.is_file()) if path.is_dir() else [path]
        if path.is_dir():
            compat.allow_deepspeed_types()
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

    def read(self) -> dict:
        """The whole checkpoint, verified, as one dict: a ZeRO folder is consolidated to fp32 in
        memory by DeepSpeed's own zero_to_fp32. Read it once and hand the dict on."""
        self._check_exists()
        if not self.sharded:
            ckpt = safe_load(self.path, self.field)  # refuses a payload unread
            self.verify(objects_read=True)  # the zip's checksums: its objects were just read
            return ckpt
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        self.verify()  # every shard: a payload refused unread, a damaged file named
        client = safe_load(self.client_state_file(), self.field)
        ckpt = {k: client[k] for k in CLIENT_KEYS if k in client}
        with contextlib.redirect_stdout(sys.stderr), weights_only_loads():  # DeepSpeed reports progress on stdout
            ckpt["state_dict"] = get_fp32_state_dict_from_zero_checkpoint(str(self.path), self._tag())
        return ckpt

    def load(self, device: str = "cpu") -> Loaded:
        """The model, tokenizer and config, for inference."""
        return Loaded.from_contents(self.read(), device)


class CheckpointFolder:
    """A run's checkpoints/ folder (the layout at the top of this file)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def last(self) -> Path:
        return self.path / "last.ckpt"

    def step_path(self, step: int) -> Path:
        return self.path / f"step-{step:06d}.ckpt"

    @staticmethod
    def step_of(path: Path) -> int | None:
        match = STEP_NAME.match(path.name)
        return int(match.group(1)) if match else None

    def steps(self) -> list[Path]:
        """The step checkpoints, oldest first."""
        found = [p for p in self.path.glob("step-*.ckpt") if self.step_of(p) is not None]
        return sorted(found, key=lambda p: self.step_of(p) or 0)

    def newest_complete(self, field: str = "resume") -> Checkpoint | None:
        """The complete checkpoint of the highest step: what RESUME=auto continues from."""
        for path in reversed(self.steps()):
            checkpoint = Checkpoint(path, field)
            if checkpoint.complete:
                return checkpoint
        return None

    def best(self) -> dict | None:
        """The record of the best checkpoint: its step and validation loss (best.json). best.ckpt is
        a link to the same step, for people and tools that open a path."""
        path = self.path / "best.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def best_path(self) -> Path | None:
        best = self.best()
        return self.step_path(best["step"]) if best else None

    def mark_last(self, path: Path) -> None:
        _point(self.last, path.name)

    def mark_best(self, path: Path, record: dict) -> None:
        _point(self.path / "best.ckpt", path.name)
        tmp = self.path / "best.json.new"
        tmp.write_text(json.dumps(record) + "\n")
        os.replace(tmp, self.path / "best.json")

    def prune(self, keep_last: int, keep: Path | None) -> None:
        """Remove all but the newest `keep_last` step checkpoints, and `keep` (the best)."""
        for path in self.steps()[:-keep_last]:
            if keep is None or path.name != keep.name:
                remove(path)
                remove(path.with_name(path.name + ".universal"))  # its re-partitioned form, if any


RUNS = Path("runs")  # where the run folders are, by default (RunOptions.run)


def choose_checkpoint(ckpt: str, field: str = "ckpt") -> str:
    """What CKPT= means: a checkpoint as given; a run folder, its newest complete checkpoint; nothing,
    the newest complete checkpoint of any run under runs/. A choice made here is said in one line."""
    if ckpt and not (Path(ckpt) / "checkpoints").is_dir():
        return ckpt
    if ckpt:
        found, where = CheckpointFolder(Path(ckpt) / "checkpoints").newest_complete(field), f"run {ckpt}"
    else:
        candidates = [CheckpointFolder(folder).newest_complete(field) for folder in RUNS.glob("*/checkpoints")]
        found = max(filter(None, candidates), key=lambda c: c.path.stat().st_mtime, default=None)
        where = "the newest under runs/"
    if found is None:
        what = f"no complete checkpoint in {ckpt}/checkpoints" if ckpt else "none given, and no run under runs/ has one"
        raise ConfigError(f"{field}={ckpt}: {what}; train one (make train), or {HINT}")
    print(f"{field}: {found.path} ({where}{'' if ckpt else '; CKPT= to choose'})", file=sys.stderr)
    return str(found.path)


def remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def _point(link: Path, target: str) -> None:
    """Make `link` a symbolic link to `target` (a name in the same folder), atomically."""
    tmp = link.with_name(link.name + ".new")
    remove(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, link)


@contextlib.contextmanager
def weights_only_loads():
    """Every torch.load inside, DeepSpeed's own included (they pass weights_only=False), loads
    tensors and plain data only: a checkpoint from a user path never runs code when read."""
    if "deepspeed" in sys.modules:
        compat.allow_deepspeed_types()
    previous = os.environ.get(FORCE_WEIGHTS_ONLY)
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[FORCE_WEIGHTS_ONLY]
        else:
            os.environ[FORCE_WEIGHTS_ONLY] = previous


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
        pass  # not a readable zip: Checkpoint.verify says so, with the reason


def export_fp32(ckpt: str, out: str) -> None:
    """Consolidate a sharded DeepSpeed checkpoint into one fp32 file (DeepSpeed's own conversion,
    through Lightning), loadable without DeepSpeed by `make sample`, `make eval` or torch.load.

    Args:
        ckpt: a DeepSpeed checkpoint folder, e.g. runs/<name>/checkpoints/last.ckpt (CKPT=)
        out: the file to write (OUT=); an existing file is not overwritten
    """
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    checkpoint, target = Checkpoint(choose_checkpoint(ckpt)), Path(out)
    if not checkpoint.sharded:
        raise ConfigError(f"ckpt={ckpt}: not a DeepSpeed checkpoint folder; a .ckpt file needs no conversion")
    if not out:
        raise ConfigError("out=: give the file to write, e.g. OUT=model-fp32.ckpt")
    if target.exists():
        raise ConfigError(f"out={out}: already exists; choose another name or remove it first")
    checkpoint.header()  # not a folder of this project's runs: one line
    checkpoint.verify()  # every shard: a payload refused unread, a damaged file named
    target.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.redirect_stdout(sys.stderr), weights_only_loads():
        convert_zero_checkpoint_to_fp32_state_dict(ckpt, str(target))
    print(f"wrote {target}")
