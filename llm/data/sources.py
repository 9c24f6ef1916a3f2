"""Where documents come from: local files, a Hugging Face Hub dataset, or the embedded corpus.

`resolve_source` is cheap and checks the input exists (before any expensive work); `load_documents`
reads it with Hugging Face `datasets` into one `Dataset` with a single `text` column, one row per
document, in a deterministic order.
"""

from __future__ import annotations

import glob
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from llm.errors import ConfigError

# file suffix -> the `datasets` builder that reads it
BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
TEXT_HINT = "give a .txt, .jsonl or .parquet file, a folder or a glob"


@dataclass
class Source:
    kind: str  # "stdlib" | "local" | "hf"
    name: str  # short name for the prepared folder
    files: list[Path] = field(default_factory=list)  # stdlib and local sources
    hf_name: str | None = None
    hf_config: str | None = None

    def fingerprint(self) -> dict:
        """What identifies these inputs: paths with size and modification time (as make does), or
        the Hub name; part of the cache key of prepared data."""
        files = [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in self.files]
        return {"kind": self.kind, "files": files, "hf_name": self.hf_name, "hf_config": self.hf_config}


def stdlib_files() -> list[Path]:
    """The embedded default corpus: the `.py` sources of the running Python's standard library."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    return sorted(p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts))


def _local_files(spec: str) -> list[Path]:
    path = Path(spec).expanduser()
    if any(ch in spec for ch in "*?["):
        matches = [Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True)]
        files = sorted(p for p in matches if p.is_file())
        if not files:
            raise ConfigError(f"data.text={spec}: the glob matches no file; {TEXT_HINT}")
        return files
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in BUILDERS)
        if not files:
            raise ConfigError(f"data.text={spec}: the folder holds no .txt, .jsonl or .parquet file; {TEXT_HINT}")
        return files
    if path.is_file():
        return [path]
    raise ConfigError(f"data.text={spec}: no such file or folder; {TEXT_HINT}")


def _may_hold_text(path: Path) -> bool:
    """False only when the file certainly holds no text: empty, or a plain-text file of whitespace.
    Reads no further than the first character that is not blank."""
    if BUILDERS.get(path.suffix, "text") != "text":
        return path.stat().st_size > 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return True
    return False


def resolve_source(text: str | None, hf: str | None) -> Source:
    """Check that the input exists and say what it is; reads no document."""
    if text and hf:
        raise ConfigError(f"data.text={text} and data.hf={hf} are both set; give one source (TEXT= or HF=)")
    if hf:
        name, _, config = hf.partition(":")
        local = Path(name).expanduser()
        files = sorted(p for p in local.rglob("*") if p.is_file()) if local.is_dir() else []
        return Source("hf", name.rstrip("/").split("/")[-1], files=files, hf_name=name, hf_config=config or None)
    if text:
        files = _local_files(text)
        if not any(_may_hold_text(f) for f in files):
            raise ConfigError(
                f"data.text={text}: holds no text (every file is empty or blank); point it at files that contain text"
            )
        stem = Path(text.rstrip("/")).stem if len(files) > 1 else files[0].stem
        return Source("local", stem.replace("*", "") or "text", files=files)
    return Source("stdlib", "stdlib", files=stdlib_files())


def _text_column(ds, text_field: str, where: str):
    if text_field not in ds.column_names:
        raise ConfigError(
            f"{where}: has no column data.text_field={text_field} (columns: {', '.join(ds.column_names)}); "
            "set data.text_field to the column that holds the text"
        )
    return (
        ds.select_columns([text_field]).rename_column(text_field, "text")
        if text_field != "text"
        else ds.select_columns(["text"])
    )


def load_documents(
    source: Source,
    text_field: str = "text",
    hf_split: str = "train",
    hf_streaming: bool = False,
    hf_max_documents: int | None = None,
):
    """All documents of the source as a `datasets.Dataset` with one column, `text`."""
    import datasets

    if source.kind == "hf":
        return _load_hub(source, text_field, hf_split, hf_streaming, hf_max_documents)
    parts = []
    # one builder per file type; a plain-text file is one document ("sample_by=document")
    for builder in dict.fromkeys(BUILDERS.get(f.suffix, "text") for f in source.files):
        files = [str(f) for f in source.files if BUILDERS.get(f.suffix, "text") == builder]
        kwargs = {"sample_by": "document", "encoding_errors": "replace"} if builder == "text" else {}
        ds = datasets.load_dataset(builder, data_files=files, split="train", **kwargs)
        where = "data.text" if source.kind == "local" else "corpus"
        parts.append(_text_column(ds, text_field if builder != "text" else "text", where))
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _load_hub(source: Source, text_field: str, split: str, streaming: bool, max_documents: int | None):
    import datasets

    spec = source.hf_name + (f":{source.hf_config}" if source.hf_config else "")
    try:
        ds = datasets.load_dataset(source.hf_name, source.hf_config, split=split, streaming=streaming)
    except Exception as exc:  # the Hub answers in many ways; the user needs the first line of it
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"data.hf={spec}: could not load split {split!r} ({reason}); check the name and config, "
            "the network, or HF_TOKEN for a gated dataset"
        ) from exc
    if streaming:
        rows = ds.take(max_documents) if max_documents else ds
        if text_field not in (rows.column_names or [text_field]):
            _text_column(rows, text_field, f"data.hf={spec}")

        def generate():
            for row in rows:
                yield {"text": row[text_field]}

        return datasets.Dataset.from_generator(generate)
    if max_documents:
        ds = ds.select(range(min(max_documents, len(ds))))
    return _text_column(ds, text_field, f"data.hf={spec}")
