"""Where documents come from: local files, a Hugging Face Hub dataset, or the embedded corpus.

`resolve_source` is cheap and checks the input exists (before any expensive work); `load_documents`
reads it with Hugging Face `datasets` into one `Dataset` with a single `text` column, one row per
document, in a deterministic order.
"""

from __future__ import annotations

import codecs
import collections
import glob
import hashlib
import json
import logging
import os
import sysconfig
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from llm import bars
from llm.errors import ConfigError

# file suffix -> the `datasets` builder that reads it
BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
TEXT_HINT = "give a .txt, .jsonl or .parquet file, a folder or a glob"
# a folder's .json files are its metadata (a dataset card's metadata.json), not data; named alone, one is
FOLDER_SKIPS = (".json",)


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
        found = sorted(p for p in path.rglob("*") if p.is_file())
        files = [p for p in found if p.suffix in BUILDERS and p.suffix not in FOLDER_SKIPS]
        if not files:
            raise ConfigError(f"data.text={spec}: the folder holds no .txt, .jsonl or .parquet file; {TEXT_HINT}")
        return files
    if path.is_file():
        return [path]
    if path.is_symlink():  # is_file() and is_dir() follow it, and found nothing at its end
        raise ConfigError(
            f"data.text={spec}: a symbolic link that leads to no file (its target is gone, or the links form a "
            f"loop); {TEXT_HINT}"
        )
    if path.exists():
        raise ConfigError(
            f"data.text={spec}: not a regular file (a FIFO, a socket or a device), and preparation reads a file "
            f"more than once; {TEXT_HINT}"
        )
    raise ConfigError(f"data.text={spec}: no such file or folder; {TEXT_HINT}")


def left_out(spec: str) -> str | None:
    """The files of a folder that are not data (not .txt, .jsonl or .parquet), in one line: how
    many of each suffix, and the first names; None when there are none."""
    path = Path(spec).expanduser()
    if any(ch in spec for ch in "*?[") or not path.is_dir():
        return None
    others = sorted(
        p for p in path.rglob("*") if p.is_file() and (p.suffix not in BUILDERS or p.suffix in FOLDER_SKIPS)
    )
    if not others:
        return None
    counts = collections.Counter(p.suffix or "(no suffix)" for p in others)
    kinds = ", ".join(f"{n} {suffix}" for suffix, n in counts.most_common())
    names = ", ".join(str(p.relative_to(path)) for p in others[:3]) + (", ..." if len(others) > 3 else "")
    files = f"{len(others):,} files that are not" if len(others) > 1 else "1 file that is not"
    verb = "are" if len(others) > 1 else "is"
    return f"warning: data.text={spec}: {files} .txt, .jsonl or .parquet {verb} left out ({kinds}: {names})"


SNIFF_BYTES = 1 << 16
# text in another encoding passes (Latin-1 prose has a few percent of its bytes above 127, replaced
# and counted by the preparation); the bytes of a PDF's streams, an image or a program do not
NOT_UTF8_SHARE = 0.25


def not_text(path: Path) -> str | None:
    """Why a file read as plain text is not text, from its first 64 KiB, or None: a NUL byte (no
    text has one; every binary format has many), or more than a quarter of it not UTF-8."""
    with open(path, "rb") as f:
        head = f.read(SNIFF_BYTES)
    if b"\0" in head:
        return f"NUL bytes in its first {len(head):,} bytes: a binary file"
    decoded = codecs.getincrementaldecoder("utf-8")(errors="replace").decode(head, final=False)
    bad = decoded.count("\ufffd") / max(1, len(decoded))
    if bad > NOT_UTF8_SHARE:
        return f"{bad:.0%} of its first {len(head):,} bytes are not UTF-8"
    return None


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
        for path in files:
            reason = BUILDERS.get(path.suffix, "text") == "text" and not_text(path)
            if reason:
                raise ConfigError(
                    f"data.text={text}: {path} is not text ({reason}); give text files (.txt, .jsonl or "
                    "Parquet with a text column), or move it out"
                )
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
            f"{where} has no column data.text_field={text_field} (columns: {', '.join(ds.column_names)}); "
            "set data.text_field to the column that holds the text"
        )
    return (
        ds.select_columns([text_field]).rename_column(text_field, "text")
        if text_field != "text"
        else ds.select_columns(["text"])
    )


@contextmanager
def quiet_datasets():
    """`datasets`' own progress bars off: over local files they say "Downloading data" where
    nothing is downloaded, and name internal passes (Filter, Generating split) a user never asked for;
    preparation shows one bar per phase of its own instead."""
    import datasets

    was_enabled = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def load_documents(
    source: Source,
    text_field: str = "text",
    hf_split: str = "train",
    hf_streaming: bool = False,
    hf_max_documents: int | None = None,
    work_dir: str | Path | None = None,
):
    """All documents of the source as a `datasets.Dataset` with one column, `text`. Local files are
    read under one "reading" bar (bytes, with their rate); `work_dir` holds the Arrow files made
    on the way (the preparation's own temporary folder, so nothing stale is ever reused)."""
    import datasets

    if source.kind == "hf":
        return _load_hub(source, text_field, hf_split, hf_streaming, hf_max_documents)
    where = "data.text" if source.kind == "local" else "corpus"
    total = sum(f.stat().st_size for f in source.files)
    parts = []
    count = f"{len(source.files):,} file{'s' * (len(source.files) != 1)}"
    bar = bars.bar(total=total, unit="B", unit_scale=True, desc=f"reading {count}")
    with quiet_datasets(), bar:
        # one reader per file type; a plain-text file is one document
        for builder in dict.fromkeys(BUILDERS.get(f.suffix, "text") for f in source.files):
            files = [f for f in source.files if BUILDERS.get(f.suffix, "text") == builder]
            if builder == "text":
                ds = datasets.Dataset.from_generator(
                    _read_text_files,
                    gen_kwargs={"files": files, "bar": bar},
                    cache_dir=str(work_dir) if work_dir else None,
                    fingerprint=hashlib.sha256(json.dumps(source.fingerprint()).encode()).hexdigest(),
                )
            else:
                ds = _load_files(builder, files, where)
                named = f"{where}: {files[0]}" if len(files) == 1 else f"{where}: its {len(files)} {builder} files"
                ds = _text_column(ds, text_field, named)
                bar.update(sum(f.stat().st_size for f in files))
            parts.append(ds)
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _load_files(builder: str, files: list[Path], where: str):
    """A JSON Lines or Parquet reader over the files; a file it cannot read is named in one line."""
    import datasets

    library = logging.getLogger("datasets")  # its reader logs the failure, traceback-like, before raising it
    level = library.level
    library.setLevel(logging.CRITICAL)
    try:
        return datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train")
    except datasets.exceptions.DatasetGenerationError as exc:
        cause = exc.__cause__ or exc
        bad = first_bad_json_line(files) if builder == "json" else None
        if bad:
            raise ConfigError(f"{where}: {bad}; fix or remove that line") from None
        text = " ".join(str(cause).split())[:200]
        named = files[0] if len(files) == 1 else next((f for f in files if str(f) in text), None)
        what = f"{named} " if named else f"one of its {len(files)} {builder} file(s) "
        raise ConfigError(
            f"{where}: {what}cannot be read as {builder} ({type(cause).__name__}: {text}); fix or remove it"
        ) from None
    finally:
        library.setLevel(level)


def first_bad_json_line(files: list[Path]) -> str | None:
    """`<file>:<line> is not a JSON object (<reason>)` for the first line of JSON Lines that is
    not one, or None: the reader's own error names neither the file nor the line."""
    for path in files:
        if path.suffix != ".jsonl":
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    return f"{path}:{number} is not JSON ({exc.msg} at column {exc.colno})"
                if not isinstance(row, dict):
                    return f"{path}:{number} is not a JSON object (a {type(row).__name__})"
    return None


def _read_text_files(files: list[Path], bar):
    # what datasets' text builder does with sample_by="document": universal newlines, and bytes
    # that are not UTF-8 replaced by U+FFFD (counted and reported by the preparation)
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            yield {"text": f.read()}
        bar.update(path.stat().st_size)


def _load_hub(source: Source, text_field: str, split: str, streaming: bool, max_documents: int | None):
    import datasets

    spec = f"{source.hf_name}" + (f":{source.hf_config}" if source.hf_config else "")
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
