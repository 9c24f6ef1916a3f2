"""text -> tokenizer -> packed token shards + meta.json, cached by a hash of the inputs.

The result is a folder `<cache_dir>/<source>-<hash>/` holding `train.bin` and `val.bin` (every
document's tokens followed by an end-of-text token, back to back, as a flat `np.memmap` of uint16
when the vocabulary fits, else uint32), the `tokenizer.json` that made them and `meta.json`. The
folder appears in one rename once complete, so an interrupted preparation leaves nothing that a
later run could mistake for prepared data.
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import glob
import hashlib
import json
import math
import os
import shutil
import socket
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from llm import bars
from llm.config import PrepareConfig
from llm.data.lock import PreparationLock
from llm.data.sources import Source, left_out, load_documents, quiet_datasets, resolve_source
from llm.data.tokenizer import load_tokenizer, ordinary, train_bpe
from llm.errors import ConfigError
from llm.redact import scrub, scrub_name

FORMAT_VERSION = 3  # 2: text quoting the end-of-text token is encoded as text; 3: shard checksums
MIN_DOCUMENTS_FOR_DOCUMENT_SPLIT = 100  # fewer documents: each one's tail goes to validation


def cache_key(cfg: PrepareConfig, source: Source) -> str:
    tokenizer: dict = {"train_bpe": cfg.vocab_size}
    if cfg.tokenizer:
        tokenizer = {"sha256": hashlib.sha256(Path(cfg.tokenizer).expanduser().read_bytes()).hexdigest()}
    key = {
        "format": FORMAT_VERSION,
        "source": source.fingerprint(),
        "tokenizer": tokenizer,
        "text_field": cfg.text_field,
        "hf_split": cfg.hf_split,
        "hf_max_documents": cfg.hf_max_documents,
        "eot_token": cfg.eot_token,
        "val_fraction": cfg.val_fraction,
        "split": cfg.split,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def prepared_dir(cfg: PrepareConfig, source: Source | None = None) -> Path:
    source = source or resolve_source(cfg.text, cfg.hf)
    # the source's name is for people, the hash for uniqueness: the name is cut so that the folder
    # and its temporary sibling (with a host name and pid) stay within a file name's 255 bytes
    return Path(cfg.cache_dir) / f"{scrub_name(source.name)[:80]}-{cache_key(cfg, source)[:12]}"


def load_meta(folder: str | Path) -> dict:
    path = Path(folder) / "meta.json"
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"data.cache_dir: {path} is not valid JSON ({exc.__class__.__name__}); "
            f"remove the folder {path.parent} and the data is prepared again"
        ) from exc


def shard_checksum(path: Path) -> str:
    """SHA-256 of the whole file: a byte changed anywhere in a shard is found."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def _matches(path: Path, checksum: str) -> bool:
    return shard_checksum(path) == checksum


VERIFIED = ".verified"  # the (size, mtime) of each file when its checksum last matched: read once, not every run


def verify_prepared(folder: Path) -> dict:
    """meta.json, and each shard and the tokenizer against it (size and checksum): one line naming
    what is wrong. A file is hashed whole the first time, and again whenever it has changed since."""
    meta = load_meta(folder)
    fix = f"remove the folder {folder} and the data is prepared again"
    try:
        splits, itemsize = meta["splits"], np.dtype(meta["dtype"]).itemsize
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"data.cache_dir: {folder}/meta.json lacks {exc}; {fix}") from exc
    try:
        verified = json.loads((folder / VERIFIED).read_text())
    except (OSError, ValueError):
        verified = {}
    checked = {}
    files = [(folder / info["file"], info.get("checksum")) for info in splits.values()]
    files.append((folder / meta.get("tokenizer", "tokenizer.json"), meta.get("tokenizer_checksum")))
    for info in splits.values():
        shard = folder / info["file"]
        expected = max(info["tokens"], 1) * itemsize
        size = shard.stat().st_size if shard.is_file() else None
        if size != expected:
            got = "is missing" if size is None else f"holds {size:,} bytes"
            raise ConfigError(f"data.cache_dir: {shard} {got}, meta.json says {expected:,}; {fix}")
    for path, checksum in files:
        if not checksum:
            continue  # a cache prepared before this file had one
        if not path.is_file():
            raise ConfigError(f"data.cache_dir: {path} is missing; {fix}")
        stamp = [path.stat().st_size, path.stat().st_mtime_ns]
        if verified.get(path.name) != stamp and not _matches(path, checksum):
            raise ConfigError(f"data.cache_dir: {path} does not match its checksum in meta.json; {fix}")
        checked[path.name] = stamp
    if checked != verified:
        with contextlib.suppress(OSError):  # a read-only cache is hashed again next time, nothing worse
            tmp = folder / f"{VERIFIED}.{os.getpid()}"
            tmp.write_text(json.dumps(checked))
            tmp.replace(folder / VERIFIED)
    return meta


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def _doc_is_val(texts: list[str], val_fraction: float) -> list[bool]:
    # by content: the same document always lands in the same split, duplicates included
    out = []
    for t in texts:
        h = int.from_bytes(hashlib.blake2b(t.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
        out.append(h / 2**64 < val_fraction)
    return out


def split_documents(docs, cfg: PrepareConfig, num_proc: int | None):
    """(train, val) datasets. Per document when there are enough of them, else each document's
    last `val_fraction` of characters goes to validation (one long text file: nanoGPT's 90/10)."""
    mode = cfg.split
    if mode == "auto":
        mode = "document" if len(docs) >= MIN_DOCUMENTS_FOR_DOCUMENT_SPLIT else "tail"
    if mode == "document":
        flagged = docs.map(
            lambda b: {"is_val": _doc_is_val(b["text"], cfg.val_fraction)},
            batched=True,
            num_proc=num_proc,
            desc="splitting",
        )
        train = flagged.filter(lambda b: [not v for v in b["is_val"]], batched=True, num_proc=num_proc)
        val = flagged.filter(lambda b: b["is_val"], batched=True, num_proc=num_proc)
        return train.remove_columns("is_val"), val.remove_columns("is_val"), mode

    def head(b):
        return {"text": [t[: int(len(t) * (1 - cfg.val_fraction))] for t in b["text"]]}

    def tail(b):
        return {"text": [t[int(len(t) * (1 - cfg.val_fraction)) :] for t in b["text"]]}

    return docs.map(head, batched=True), docs.map(tail, batched=True), mode


def _train_tokenizer(train, cfg: PrepareConfig):
    """A BPE on the train split under one bar: documents as the trainer reads them, then "merging"
    while it computes the merges (tokenizers' own bars are one per internal pass)."""
    with bars.bar(total=len(train), unit="doc", desc=f"training tokenizer ({cfg.vocab_size} tokens)") as bar:

        def texts():
            for batch in train.iter(batch_size=256):
                yield batch["text"]
                bar.update(len(batch["text"]))
            bar.set_postfix_str("merging")

        return train_bpe(texts(), cfg.vocab_size, num_texts=math.ceil(len(train) / 256), eot_token=cfg.eot_token)


def _tokenize(ds, tokenizer, eot_id: int, num_proc: int | None, cache_file: Path, fingerprint: str, desc: str):
    text_only = ordinary(tokenizer)  # `<|endoftext|>` quoted in a document is text, not a boundary

    def encode(batch):
        ids = [enc.ids + [eot_id] for enc in text_only.encode_batch(batch["text"], add_special_tokens=False)]
        return {"ids": ids, "n_tokens": [len(x) for x in ids], "n_bytes": [len(t.encode()) for t in batch["text"]]}

    # datasets' own bar on a terminal; in a file its redraws would pile up, and the line that
    # _prepare_into writes when the split is done says the same
    with contextlib.nullcontext() if sys.stderr.isatty() else quiet_datasets():
        return ds.map(
            encode,
            batched=True,
            batch_size=64,
            num_proc=num_proc,
            remove_columns=["text"],
            cache_file_name=str(cache_file),
            new_fingerprint=fingerprint,
            desc=desc,
        )


def _write_shard(ds, path: Path, dtype: np.dtype) -> tuple[int, int]:
    """Write every document's tokens back to back into one memmap; return (tokens, bytes)."""
    total = int(np.sum(ds["n_tokens"], dtype=np.int64))
    arr = np.memmap(path, dtype=dtype, mode="w+", shape=(max(total, 1),))
    pos = 0
    with bars.bar(total=total, unit="tok", unit_scale=True, desc=f"writing {path.name}") as bar:
        for table in ds.with_format("arrow").iter(batch_size=1024):
            flat = table["ids"].combine_chunks().flatten().to_numpy()
            arr[pos : pos + len(flat)] = flat
            pos += len(flat)
            bar.update(len(flat))
    arr.flush()
    return total, int(np.sum(ds["n_bytes"], dtype=np.int64))


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """Nats per token of `tokens` under their own unigram distribution."""
    counts = np.bincount(tokens, minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def disk_full(exc: BaseException) -> str | None:
    """The no-space error in an exception or what caused it (`datasets` wraps the OSError)."""
    seen = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            return os.strerror(cause.errno)
        cause = cause.__cause__ or cause.__context__
    return None


def prepare(cfg: PrepareConfig, log=print) -> Path:
    """Prepare the data once; return its folder. A second call with the same inputs reads nothing."""
    cfg.check()
    source = resolve_source(cfg.text, cfg.hf)
    if cfg.tokenizer:
        load_tokenizer(cfg.tokenizer, cfg.eot_token)  # fail on a bad tokenizer before reading any text
    out = prepared_dir(cfg, source)
    if (out / "meta.json").is_file():
        verify_prepared(out)
        log(f"prepared data: {out} (cached)")
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with PreparationLock(out, log):
        if (out / "meta.json").is_file():  # prepared by another process (another node) while this one waited
            log(f"prepared data: {out} (cached, prepared by another process)")
            return out
        skipped = left_out(cfg.text) if cfg.text else None
        if skipped:
            log(skipped)
        try:
            meta = _prepare_atomically(out, cfg, source, log)
        except Exception as exc:
            if not disk_full(exc):
                raise
            raise ConfigError(
                f"data.cache_dir={cfg.cache_dir}: the disk is full ({disk_full(exc)}); free space there, or set "
                "data.cache_dir on a larger disk; nothing of this preparation was kept"
            ) from None
    split = meta["splits"]
    log(
        f"prepared data: {out} (train {split['train']['tokens']:,} tokens, val {split['val']['tokens']:,} tokens, "
        f"{meta['seconds']:.0f} s)"
    )
    return out


def _prepare_atomically(out: Path, cfg: PrepareConfig, source: Source, log) -> dict:
    started = time.perf_counter()
    tmp = out.parent / f".tmp-{out.name}-{socket.gethostname()}-{os.getpid()}"  # unique across the nodes
    # what a preparation killed outright (kill -9, a node lost) left: this process holds the lock of
    # `out`, so no other one is writing into a folder of that name
    for stale in out.parent.glob(f".tmp-{glob.escape(out.name)}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir()
    try:
        _prepare_into(tmp, cfg, source, log)
        meta = load_meta(tmp)
        meta["seconds"] = round(time.perf_counter() - started, 1)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        for f in tmp.glob("*.arrow"):
            f.unlink()
        shutil.rmtree(tmp / "work", ignore_errors=True)
        tmp.rename(out)  # atomic: the folder exists only once complete
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def invalid_utf8_bytes(files) -> int:
    """Bytes of the plain-text files that are not UTF-8 (what the text reader replaces), counted
    by decoding them again in 1 MiB pieces."""
    count = 0

    def counting(error: UnicodeError) -> tuple[str, int]:
        nonlocal count
        assert isinstance(error, UnicodeDecodeError)  # registered for decoding only
        count += error.end - error.start
        return "\ufffd", error.end

    codecs.register_error("llm-count-invalid", counting)
    for path in files:
        if Path(path).suffix in (".jsonl", ".json", ".parquet"):
            continue
        decoder = codecs.getincrementaldecoder("utf-8")(errors="llm-count-invalid")
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                decoder.decode(chunk)
        decoder.decode(b"", final=True)
    return count


def _prepare_into(tmp: Path, cfg: PrepareConfig, source: Source, log) -> None:
    """The phases a user sees, one bar each: reading, tokenizer training (unless one is given),
    tokenizing and writing each split. Filtering and splitting are quick and show none."""
    work = tmp / "work"  # Arrow files made on the way; removed before the folder is published
    docs = load_documents(source, cfg.text_field, cfg.hf_split, cfg.hf_streaming, cfg.hf_max_documents, work)
    read = len(docs)
    with quiet_datasets():
        docs = docs.filter(lambda b: [isinstance(t, str) and bool(t.strip()) for t in b["text"]], batched=True)
    field = {"stdlib": "corpus", "local": f"data.text={cfg.text}", "hf": f"data.hf={cfg.hf}"}[source.kind]
    if len(docs) == 0:
        raise ConfigError(f"{field}: holds no text (0 non-empty documents); point it at files that contain text")
    if len(docs) < read and source.kind != "stdlib":
        log(
            f"warning: {field}: {read - len(docs):,} of {read:,} documents have no text in data.text_field="
            f"{cfg.text_field} (missing, empty or not a string) and are left out"
        )
    replaced = invalid_utf8_bytes(source.files) if source.kind == "local" else 0
    if replaced:
        log(f"warning: {field}: {replaced:,} bytes are not UTF-8; each run of them was read as U+FFFD")
    processes = min(cfg.num_proc or os.cpu_count() or 1, len(docs))
    num_proc = processes if processes > 1 else None
    with quiet_datasets():
        train, val, mode = split_documents(docs, cfg, num_proc)
    if len(train) == 0 or len(val) == 0:
        raise ConfigError(
            f"data.val_fraction={cfg.val_fraction}: leaves the {'train' if len(train) == 0 else 'val'} "
            f"split of {field} empty ({len(docs)} documents); change data.val_fraction"
        )
    log(f"documents: {len(docs):,} ({mode} split: {len(train):,} train, {len(val):,} val)")

    if cfg.tokenizer:
        tokenizer = load_tokenizer(cfg.tokenizer, cfg.eot_token)
    else:
        t0 = time.perf_counter()
        tokenizer = _train_tokenizer(train, cfg)
        seconds = time.perf_counter() - t0
        log(f"tokenizer: byte-level BPE, {cfg.vocab_size} tokens, trained on the train split in {seconds:.1f} s")
    tokenizer.save(str(tmp / "tokenizer.json"))
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    eot_id = tokenizer.token_to_id(cfg.eot_token)
    if eot_id is None:
        raise ConfigError(
            f"data.eot_token={cfg.eot_token}: not in the tokenizer's vocabulary; give the token it ends documents with"
        )
    dtype = token_dtype(vocab_size)

    # tokenizers parallelises inside encode_batch; with several processes each one runs single-threaded
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false" if num_proc else "true")
    splits = {}
    # datasets refuses a fingerprint over 64 characters: a hash of this preparation's own folder
    # (unique per host and process), whatever the length of the host or file name
    key = hashlib.sha256(tmp.name.encode()).hexdigest()[:32]
    for name, ds in (("train", train), ("val", val)):
        t0 = time.perf_counter()
        encoded = _tokenize(
            ds, tokenizer, eot_id, num_proc, tmp / f"{name}.arrow", f"{key}-{name}", f"tokenizing {name}"
        )
        tokens, n_bytes = _write_shard(encoded, tmp / f"{name}.bin", dtype)
        seconds = time.perf_counter() - t0
        splits[name] = {"file": f"{name}.bin", "tokens": tokens, "documents": len(ds), "bytes": n_bytes}
        splits[name]["checksum"] = shard_checksum(tmp / f"{name}.bin")
        rate = tokens / seconds
        log(f"{name}: {tokens:,} tokens from {len(ds):,} documents in {seconds:.1f} s ({rate:,.0f} tokens/s)")

    val_tokens = np.memmap(tmp / "val.bin", dtype=dtype, mode="r")[: splits["val"]["tokens"]]
    meta = {
        "format": FORMAT_VERSION,
        "source": scrub(
            {"kind": source.kind, "name": source.name, "text": cfg.text, "hf": cfg.hf, "files": len(source.files)}
        ),
        "config": scrub(asdict(cfg)),
        "input_hash": cache_key(cfg, source),
        "tokenizer": "tokenizer.json",
        "tokenizer_checksum": shard_checksum(tmp / "tokenizer.json"),
        "tokenizer_source": cfg.tokenizer or f"trained byte-level BPE, {cfg.vocab_size} tokens",
        "vocab_size": vocab_size,
        "eot_token": cfg.eot_token,
        "eot_id": eot_id,
        "dtype": dtype.name,
        "split_mode": mode,
        "splits": splits,
        "unigram_val_entropy": unigram_entropy(np.asarray(val_tokens), vocab_size),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
