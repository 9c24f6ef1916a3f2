"""Data preparation: round trips, end-of-text separation, dtypes, caching, the Hub loading path, the
preparation lock (tests/test_sampling.py: which blocks training reads)."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from llm.data.lock import PreparationLock
from llm.data.prepare import (
    PrepareConfig,
    load_meta,
    prepare,
    prepared_dir,
    shard_checksum,
    unigram_entropy,
    verify_prepared,
)
from llm.data.sources import stdlib_files
from llm.errors import ConfigError
from support import REPO, run_llm, word_tokenizer


def decoded_documents(folder: Path, split: str) -> list[str]:
    """The documents of a prepared split, decoded back to text, split at the end-of-text tokens."""
    meta = load_meta(folder)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ids = np.memmap(folder / f"{split}.bin", dtype=meta["dtype"], mode="r")[: meta["splits"][split]["tokens"]]
    eot = meta["eot_id"]
    assert ids[-1] == eot, "every document, the last included, ends with end-of-text"
    ends = np.flatnonzero(ids == eot)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tokenizer.decode(ids[s:e].tolist(), skip_special_tokens=False) for s, e in zip(starts, ends, strict=True)]


@pytest.fixture
def documents() -> list[str]:
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "naïve", "日本", "x = 1\n", "\t", "  "]
    return [" ".join(rng.choice(words, size=rng.integers(5, 40))) + f" doc {i}" for i in range(300)]


def test_jsonl_documents_decode_back_exactly_split_per_document(tmp_path, documents):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    folder = prepare(PrepareConfig(text=str(path), vocab_size=300, cache_dir=str(tmp_path / "cache")))
    meta = load_meta(folder)
    train, val = decoded_documents(folder, "train"), decoded_documents(folder, "val")
    assert meta["split_mode"] == "document"
    assert sorted(train + val) == sorted(documents)
    assert 0.05 < len(val) / len(documents) < 0.2  # val_fraction 0.1, by a hash of each document
    assert meta["splits"]["val"]["documents"] == len(val)


@pytest.mark.parametrize(
    "text, tokenizer, expected",
    [
        ("fixture_text", "fixture_tokenizer", {"vocab_size": 512, "eot_id": 0, "train": 1_210 + 1, "val": 138 + 1}),
        # nanoGPT's 90/10 split of this file with the GPT-2 tokenizer: 301,966 and 36,059 tokens, plus end-of-text
        pytest.param(
            "shakespeare",
            "gpt2_tokenizer",
            {"vocab_size": 50257, "eot_id": 50256, "train": 301_966 + 1, "val": 36_059 + 1},
            marks=pytest.mark.shared_data,
        ),
    ],
)
def test_text_file_tail_split_decodes_back_to_the_file(tmp_path, request, text, tokenizer, expected):
    text, tokenizer = request.getfixturevalue(text), request.getfixturevalue(tokenizer)
    folder = prepare(PrepareConfig(text=str(text), tokenizer=str(tokenizer), cache_dir=str(tmp_path)))
    meta = load_meta(folder)
    (train,), (val,) = decoded_documents(folder, "train"), decoded_documents(folder, "val")
    assert train + val == text.read_text()
    assert meta["split_mode"] == "tail"
    tokens = {split: meta["splits"][split]["tokens"] for split in ("train", "val")}
    assert 0.08 < tokens["val"] / (tokens["train"] + tokens["val"]) < 0.12  # val_fraction 0.1, cut at a line
    for split in ("train", "val"):
        assert tokens[split] == expected[split]
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == expected["vocab_size"]
    assert meta["eot_id"] == expected["eot_id"]


def test_end_of_text_separates_documents_and_appears_nowhere_else(tmp_path):
    docs = [f"document number {i} says hello" for i in range(120)]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    folder = prepare(PrepareConfig(text=str(path), vocab_size=300, cache_dir=str(tmp_path / "c")))
    meta = load_meta(folder)
    for split in ("train", "val"):
        ids = np.fromfile(folder / f"{split}.bin", dtype=meta["dtype"])
        assert (ids == meta["eot_id"]).sum() == meta["splits"][split]["documents"]


@pytest.mark.parametrize(
    "tokenizer", ["trained", "fixture_tokenizer", pytest.param("gpt2_tokenizer", marks=pytest.mark.shared_data)]
)
def test_a_document_quoting_end_of_text_is_text_not_a_boundary(tmp_path, tokenizer, request):
    # web text and code that handles tokenizers quote the token; it must not cut a document in two
    docs = [f"document {i} says hello" for i in range(110)]
    docs += [f"tokenizer.encode('<|endoftext|>') in document {i}, and <|endoftext|>again" for i in range(10)]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    choice = {"tokenizer": str(request.getfixturevalue(tokenizer))} if tokenizer != "trained" else {}
    folder = prepare(PrepareConfig(text=str(path), vocab_size=300, cache_dir=str(tmp_path / "c"), **choice))
    meta = load_meta(folder)
    for split in ("train", "val"):
        ids = np.fromfile(folder / f"{split}.bin", dtype=meta["dtype"])
        assert (ids == meta["eot_id"]).sum() == meta["splits"][split]["documents"]
    assert sorted(decoded_documents(folder, "train") + decoded_documents(folder, "val")) == sorted(docs)


def test_vocabulary_over_65535_is_stored_as_uint32(tmp_path):
    tokenizer = word_tokenizer(tmp_path / "tokenizer.json", 70_000)
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i}" for i in (1, 65_535, 65_536, 69_998) * 50))
    folder = prepare(PrepareConfig(text=str(text), tokenizer=str(tokenizer), cache_dir=str(tmp_path / "c")))
    meta = load_meta(folder)
    assert meta["dtype"] == "uint32"
    ids = np.fromfile(folder / "train.bin", dtype=np.uint32)
    assert {1, 65_535, 65_536, 69_998} <= set(ids.tolist())  # nothing wrapped around at 2^16


def test_same_inputs_are_prepared_once_and_changed_inputs_again(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    cfg = PrepareConfig(text=str(text), vocab_size=300, cache_dir=str(tmp_path / "c"))
    first = prepare(cfg)
    assert "reading 1 file: 100%" in capsys.readouterr().err  # one file, in the singular
    stamp = (first / "train.bin").stat().st_mtime_ns
    assert prepare(cfg) == first
    assert (first / "train.bin").stat().st_mtime_ns == stamp, "a cached preparation rewrote its shard"
    text.write_text("a different text entirely\n" * 200)
    second = prepare(cfg)
    assert second != first and first.is_dir()
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == sorted([first.name, second.name])  # no leftovers


def test_what_a_preparation_killed_outright_left_is_removed_by_the_next(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    cfg = PrepareConfig(text=str(text), vocab_size=300, cache_dir=str(tmp_path / "c"))
    left = tmp_path / "c" / f".tmp-{prepared_dir(cfg).name}-node-a-4242"  # kill -9 during its preparation
    (left / "work").mkdir(parents=True)
    (left / "work" / "copy.txt").write_text(text.read_text())
    folder = prepare(cfg)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [folder.name]


def test_unigram_entropy_of_a_known_distribution():
    assert unigram_entropy(np.array([0, 1, 2, 3] * 10), 8) == pytest.approx(np.log(4))
    assert unigram_entropy(np.array([5] * 10), 8) == 0.0


def test_embedded_corpus_is_the_standard_library():
    files = stdlib_files()
    assert len(files) > 500
    assert all(f.suffix == ".py" and "site-packages" not in f.parts for f in files)
    assert sum(f.stat().st_size for f in files) > 5e6


def test_empty_corpus_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    (tmp_path / "empty" / "b.txt").write_text("  \n\n")
    with pytest.raises(ConfigError, match=r"data.text=.*empty: holds no text"):
        prepare(PrepareConfig(text=str(tmp_path / "empty"), cache_dir=str(tmp_path / "c")))
    assert not any((tmp_path / "c").glob("*")), "a failed preparation left files behind"


@pytest.fixture
def parquet_dataset(tmp_path, documents) -> Path:
    """A dataset folder as the Hub serves them: parquet files with a text column and another one."""
    import datasets

    folder = tmp_path / "hub-like" / "data"
    folder.mkdir(parents=True)
    ds = datasets.Dataset.from_dict({"content": documents, "id": list(range(len(documents)))})
    ds.select(range(150)).to_parquet(str(folder / "train-00000-of-00002.parquet"))
    ds.select(range(150, 300)).to_parquet(str(folder / "train-00001-of-00002.parquet"))
    return folder.parent


@pytest.mark.parametrize("streaming", [False, True])
def test_hub_loading_path_reads_a_dataset_folder(tmp_path, parquet_dataset, documents, streaming):
    # the same datasets.load_dataset call that fetches name[:config] from the Hub, on local files
    cfg = PrepareConfig(
        hf=str(parquet_dataset),
        hf_streaming=streaming,
        hf_max_documents=200 if streaming else None,
        text_field="content",
        vocab_size=300,
        cache_dir=str(tmp_path / "c"),
    )
    folder = prepare(cfg)
    docs = decoded_documents(folder, "train") + decoded_documents(folder, "val")
    expected = documents[:200] if streaming else documents
    assert sorted(docs) == sorted(expected)
    assert load_meta(folder)["source"]["kind"] == "hf"


def test_local_parquet_and_a_missing_text_column(tmp_path, parquet_dataset, documents):
    files = str(parquet_dataset / "data" / "*.parquet")
    folder = prepare(PrepareConfig(text=files, text_field="content", vocab_size=300, cache_dir=str(tmp_path / "c")))
    assert sorted(decoded_documents(folder, "train") + decoded_documents(folder, "val")) == sorted(documents)
    with pytest.raises(ConfigError, match=r"has no column data.text_field=text \(columns: content, id\)"):
        prepare(PrepareConfig(text=files, vocab_size=300, cache_dir=str(tmp_path / "c")))


def test_preparation_in_a_file_shows_one_line_per_phase_and_no_download_of_local_files(tmp_path, fixture_text):
    """Output to a file or a pipe (not a terminal): each phase ends in one line, no carriage returns."""
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text(fixture_text.read_text())
    (folder / "b.txt").write_text("a second plain text document\n" * 50)
    (folder / "c.jsonl").write_text("".join(json.dumps({"text": f"json document {i}"}) + "\n" for i in range(30)))
    result = run_llm(
        "prepare",
        "--config",
        "configs/experiment/default.yaml",
        f"--data.text={folder}",
        "--data.vocab_size=300",
        f"--data.cache_dir={tmp_path / 'cache'}",
        env={"HF_DATASETS_CACHE": str(tmp_path / "hf-cache")},  # nothing cached from an earlier test
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    assert "\r" not in out and "\x1b" not in out and "\n\n" not in out, out
    phases = [line.split(": ")[0] for line in out.splitlines() if re.search(r": 100% \S+/\S+ \[00:0\d, ", line)]
    assert phases == ["reading 3 files", "training tokenizer (300 tokens)", "writing train.bin", "writing val.bin"], out
    assert re.search(r"^train: [\d,]+ tokens from 32 documents in ", out, re.M)  # the tokenizing phase's line
    for noise in ("Downloading", "Filter", "Generating", "splitting"):
        assert noise not in result.stderr, result.stderr[-3000:]
    prepared = next((tmp_path / "cache").iterdir())
    assert sorted(p.name for p in prepared.iterdir()) == ["meta.json", "tokenizer.json", "train.bin", "val.bin"]
    assert load_meta(prepared)["splits"]["train"]["documents"] == 2 + 30  # two text files, 30 JSON lines (tail split)


def test_preparation_on_a_long_host_name_and_a_long_file_name(tmp_path, monkeypatch):
    # cluster hosts are named like ip-10-0-12-34.ec2.internal; a node of a long domain reaches 60 characters
    monkeypatch.setattr("socket.gethostname", lambda: "node-0042.rack-17.pod-3.cluster.research-lab.example.org"[:60])
    text = tmp_path / ("a-corpus-file-with-a-rather-long-descriptive-name-" * 2 + ".txt")
    assert len(text.name) == 104
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    folder = prepare(PrepareConfig(text=str(text), vocab_size=300, cache_dir=str(tmp_path / "c")))
    assert load_meta(folder)["splits"]["train"]["tokens"] > 0
    assert [p.name for p in (tmp_path / "c").iterdir()] == [folder.name]  # nothing else left behind


# --- the preparation lock: one preparation per cache folder, and none that waits forever ----------------


def hold(lock: PreparationLock, who: str) -> PreparationLock:
    lock.me = who  # a holder on another host, as that host's process would write it
    return lock.__enter__()


def test_a_lock_left_on_another_host_is_taken_over_once_nobody_refreshes_it(tmp_path):
    out = tmp_path / "prepared"
    (tmp_path / f".lock-{out.name}").write_text("node-a 25295")  # prepare on node-a, then kill -9
    said = []
    started = time.monotonic()
    with PreparationLock(out, said.append, poll_seconds=0.05, stale_seconds=0.5) as lock:
        assert lock.held and (tmp_path / f".lock-{out.name}").read_text() == lock.me
    assert 0.5 <= time.monotonic() - started < 10
    assert said[0].startswith("waiting for node-a 25295 to prepare")
    assert said[1].startswith("taking over the preparation") and "node-a 25295" in said[1]
    assert not (tmp_path / f".lock-{out.name}").exists()


def test_a_lock_its_holder_on_another_host_refreshes_is_waited_for(tmp_path):
    out = tmp_path / "prepared"
    holder = hold(PreparationLock(out, print, heartbeat_seconds=0.05), "node-b 1 0000")
    waiter = PreparationLock(out, lambda line: None, poll_seconds=0.05, stale_seconds=0.5)
    acquired = threading.Event()
    thread = threading.Thread(target=lambda: (waiter.__enter__(), acquired.set()), daemon=True)
    thread.start()
    assert not acquired.wait(2.0), "a refreshed lock was taken over"  # four times the stale limit
    holder.__exit__(None, None, None)
    assert acquired.wait(5.0) and waiter.held
    waiter.__exit__(None, None, None)


def test_a_byte_changed_anywhere_in_a_large_shard_is_found(tmp_path):
    """Caches of gigabytes: 64 sampled pieces missed 19% of a 5 MB shard overwritten. The whole
    file is hashed, once: a later start trusts a file whose size and mtime have not changed."""
    folder = tmp_path / "prepared"
    folder.mkdir()
    tokens = np.arange(3_000_000, dtype=np.uint16)  # 6 MB
    for name in ("train", "val"):
        tokens.tofile(folder / f"{name}.bin")
    (folder / "tokenizer.json").write_text("{}")
    splits = {
        n: {"file": f"{n}.bin", "tokens": tokens.size, "checksum": shard_checksum(folder / f"{n}.bin")}
        for n in ("train", "val")
    }
    meta = {"splits": splits, "dtype": "uint16", "tokenizer_checksum": shard_checksum(folder / "tokenizer.json")}
    (folder / "meta.json").write_text(json.dumps(meta))
    verify_prepared(folder)
    assert set(json.loads((folder / ".verified").read_text())) == {"train.bin", "val.bin", "tokenizer.json"}
    size = (folder / "train.bin").stat().st_size
    with open(folder / "train.bin", "r+b") as f:  # between two of the pieces a sampled checksum reads
        f.seek((size - 65536) * 10 // 63 + 65536 + 10)
        f.write(b"\xff" * 1000)
    with pytest.raises(ConfigError, match="train.bin does not match its checksum in meta.json"):
        verify_prepared(folder)


@pytest.mark.long
@pytest.mark.slow
def test_a_disk_that_fills_during_preparation_is_one_line_and_keeps_nothing(tmp_path):
    """A real full disk: a 1 MiB tmpfs for the cache, in a mount namespace of the test's own."""
    import shutil
    import subprocess
    import sys

    if shutil.which("unshare") is None or subprocess.run(["unshare", "--mount", "true"]).returncode != 0:
        pytest.skip("needs unshare --mount (root): a small filesystem of the test's own")
    text, cache = tmp_path / "t.txt", tmp_path / "small"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 50_000)  # 2.2 MB
    cache.mkdir()
    prepare_args = f"--data.text={text} --data.cache_dir={cache}/c --data.vocab_size=300"
    script = (
        f"mount -t tmpfs -o size=1M tmpfs {cache} && {sys.executable} -m llm prepare "
        f"--config configs/experiment/default.yaml {prepare_args}; status=$?; find {cache} -mindepth 2; exit $status"
    )
    result = subprocess.run(["unshare", "--mount", "bash", "-c", script], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: data.cache_dir={cache}/c: the disk is full (No space left on device); free space there, or set "
        "data.cache_dir on a larger disk; nothing of this preparation was kept"
    )
    assert "Traceback" not in result.stderr
    assert not [line for line in result.stdout.splitlines() if line.startswith(str(cache))], "files were left"


def test_a_long_run_without_white_space_is_cut_into_words_the_bpe_can_train_on():
    from llm.data.tokenizer import MAX_WORD_CHARS, train_bpe

    line = "".join(chr(97 + (i * 7919) % 26) for i in range(200_000))  # 200 KB of letters, no space
    tok = train_bpe(["def f(x):\n    return x\n", line], 300)
    pieces = [piece for piece, _ in tok.pre_tokenizer.pre_tokenize_str(line[:1000])]
    assert max(len(p) for p in pieces) == MAX_WORD_CHARS and "".join(pieces) == line[:1000]
    text = "def f(x):\n    return x  # " + line[:300]
    assert tok.decode(tok.encode(text).ids) == text
    # ordinary words keep their leading space, as GPT-2's pre-tokenizer has it
    assert [p for p, _ in tok.pre_tokenizer.pre_tokenize_str("def hello")] == ["def", "Ġhello"]


def test_a_bar_in_a_file_writes_a_line_when_its_count_moves_and_none_else():
    import io

    from llm.bars import Lines

    out = io.StringIO()
    with Lines(total=3, desc="phase", unit="doc", file=out, mininterval=0) as bar:
        bar.update(1)
        bar.set_postfix_str("merging")  # no count moved: no line
        bar.update(2)
    lines = out.getvalue().split("\n")
    assert [line.split(" [")[0] for line in lines] == ["phase:  33% 1/3", "phase: 100% 3/3", ""], lines
