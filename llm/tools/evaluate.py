"""Loss, perplexity and bits per byte of a checkpoint: on its run's validation split (all of it, or
the blocks the run validated on), or on any text, tokenized on the fly with the checkpoint's own
tokenizer and read as a stream, so that a large file never sits in memory at once."""

from __future__ import annotations

import json as jsonlib
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from llm import bars
from llm.checkpointing.files import Checkpoint, Loaded, choose_checkpoint
from llm.data.datamodule import TokenBlocks
from llm.data.prepare import load_meta, prepare
from llm.data.sources import resolve_source
from llm.data.tokenizer import ordinary
from llm.errors import ConfigError
from llm.observe.metrics import bits_per_byte
from llm.tools.loading import add_to_wandb_run, run_folder_data, transformers_folder

TEXT_CHUNK_BYTES = 1 << 20  # a plain-text file is read, and tokenized, about a MiB of lines at a time
# where a piece of text may end so that tokenizing the pieces gives the tokens of the whole: at a line
# break between two characters that are not white space (a run of spaces or newlines split in two
# would be pre-tokenized otherwise, e.g. an indentation after a line break)
SAFE_CUT = re.compile(r"(?<=\S\n)(?=\S)")


def safe_cut(text: str) -> int:
    """The last place in text where it can be cut (0: none; the whole of it waits for more)."""
    cut = 0
    for match in SAFE_CUT.finditer(text):
        cut = match.start()
    return cut


@torch.no_grad()
def evaluate(
    ckpt: str = "",
    text: str | None = None,
    hf: str | None = None,
    hf_split: str = "validation",
    text_field: str = "text",
    blocks: str = "all",
    batch_size: int = 8,
    max_batches: int | None = None,
    max_tokens: int | None = None,
    device: str = "auto",
    json: bool = False,
    wandb: bool = True,
    tasks: str | None = None,
    num_fewshot: int | None = None,
    limit: int | None = None,
    seed: int = 1234,
    out: str | None = None,
) -> dict:
    """Evaluate a checkpoint; print a table (or one JSON object) and add it to the run's W&B run.

    Args:
        ckpt: a checkpoint file or DeepSpeed folder (CKPT=); without text or hf, one in its run folder;
            a run folder: its newest checkpoint; none: the newest of any run under runs/
            (runs/<name>/checkpoints/), whose data it was trained on is evaluated. Or a transformers
            folder (make export's, quantized or not, or any GPT-2 or Llama) with text or hf
        text: local text to evaluate on: a .txt, .jsonl or .parquet file, a folder or a glob (TEXT=)
        hf: a Hugging Face dataset, name[:config] or a local dataset folder (HF=), streamed
        hf_split: the split of the hf dataset
        text_field: the column that holds the text (.jsonl, .parquet and hf)
        blocks: without text or hf: "all" blocks of the run's validation split, or "run": the blocks the
            run validated on, which reproduces the val/loss it logged at the checkpoint's step
        batch_size: sequences per forward pass
        max_batches: stop after this many batches (none: everything)
        max_tokens: stop once this many tokens are evaluated (none: everything); bounds the time a large
            TEXT= takes, which the first progress line estimates
        device: cpu, cuda, or auto
        json: print one JSON object instead of a table (--json=true)
        wandb: add the result (eval/ keys) to the W&B run of the run folder the checkpoint lies in
        tasks: benchmarks instead of the loss (TASKS=): lm-eval task or group names and task YAML files
            or folders of them, comma-separated (llm/benchmarks/)
        num_fewshot: examples shown before each question (none: each task's own, usually 0)
        limit: score at most this many examples per task (none: all of them)
        seed: of lm-eval's few-shot sampling and its other random choices
        out: the tasks' results JSON (OUT=), a new file; default: one in the run folder's eval/, else ./eval
    """
    if blocks not in ("all", "run"):
        raise ConfigError(f"blocks={blocks}: use all (the whole validation split) or run (the run's own blocks)")
    if (text or hf) and blocks == "run":
        raise ConfigError("blocks=run: the run's validation blocks exist only for its own data; drop TEXT=/HF=")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if tasks is not None:
        from llm.tools.benchmarks import evaluate_tasks  # lm-eval takes seconds to import: only for TASKS=

        return evaluate_tasks(ckpt, tasks, batch_size, device, num_fewshot, limit, seed, out, wandb)
    ckpt = choose_checkpoint(ckpt)
    if (Path(ckpt) / "config.json").is_file():
        if not (text or hf):
            raise ConfigError(
                f"ckpt={ckpt}: a transformers folder records no run's validation data; give TEXT= or HF= to "
                "evaluate on (the same for the checkpoint it came from, to compare)"
            )
        loaded, run_dir = transformers_folder(Path(ckpt), device), None
    else:
        checkpoint = Checkpoint(ckpt)
        loaded, run_dir = checkpoint.load(device), checkpoint.run_folder
    if run_dir is None and not (text or hf):
        # the data paths inside a checkpoint are followed only with the user's say: the run folder it
        # lies in is that say; a checkpoint from elsewhere could name any file to read
        raise ConfigError(
            f"ckpt={ckpt}: not in a run folder (runs/<name>/checkpoints/), so its own validation data is not "
            "used; give TEXT= or HF= to evaluate on"
        )
    T = loaded.model.config.block_size
    stream = None
    if text or hf:
        stream = TextStream(loaded, text, hf, hf_split, text_field)
        evaluated, batches, counts = stream.describe(), stream.batches(T, batch_size), stream.counts
    else:
        assert run_dir is not None  # refused above: a checkpoint's own data is read in its run folder only
        evaluated, batches, counts = validation_blocks(loaded, blocks, batch_size, ckpt, run_dir)
    if max_tokens is not None and max_tokens < 1:
        raise ConfigError(f"max_tokens={max_tokens}: out of range; use a positive number of tokens, e.g. 100000")
    loss_sum, count = 0.0, 0
    # a local text's progress is its bytes read, whose total is known; the others' their sequences
    by_bytes = stream is not None and stream.total_bytes is not None
    progress = _progress(evaluated, stream.total_bytes if stream else counts.blocks, by_bytes)
    for i, batch in enumerate(batches):
        if (max_batches and i >= max_batches) or (max_tokens and count >= max_tokens):
            break
        batch = batch.to(device)
        logits = loaded.model(batch[:, :-1])
        loss_sum += F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
        count += batch[:, 1:].numel()
        # a text's bytes evaluated so far: its tokens evaluated, at the bytes per token of what was read
        done = round(count * counts.bytes / max(1, counts.tokens)) if by_bytes else progress.n + batch.size(0)
        progress.update(min(done, progress.total or done) - progress.n)
        if i == 4:  # a first line soon, with the rate and the time left: the estimate, past the start's costs
            progress.refresh()
    progress.close()
    if count == 0:
        raise ConfigError(
            f"ckpt={ckpt}: {evaluated} holds fewer than one block of {T + 1} tokens; "
            "evaluate a model with a smaller block_size, or give more text"
        )
    loss = loss_sum / count
    result = {
        "checkpoint": str(ckpt),
        "step": loaded.step,
        "evaluated": evaluated,
        "tokens_evaluated": count,
        "loss": loss,
        "ppl": math.exp(min(loss, 50.0)),
        "bpb": bits_per_byte(loss, counts.tokens, counts.bytes),
        "tokens": counts.tokens,
        "bytes": counts.bytes,
    }
    if json:
        print(jsonlib.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:<17} {value:.4f}" if isinstance(value, float) else f"{key:<17} {value}")
    if wandb and run_dir is not None:
        values = {f"eval/{k}": v for k, v in result.items() if k in ("loss", "ppl", "bpb", "tokens_evaluated")}
        values |= {"eval/evaluated": result["evaluated"], "eval/step": result["step"]}
        described = {k: v for k, v in result.items() if k in ("checkpoint", "step", "evaluated")}
        add_to_wandb_run(loaded, values, run_dir, described)
    return result


@dataclass
class Counts:
    """Token and byte counts of what was evaluated, for bits per byte (tokens include end-of-text);
    a text stream's grow as it is read."""

    tokens: int = 0
    bytes: int = 0
    blocks: int | None = None  # the sequences to evaluate, where known before reading them


def validation_blocks(loaded: Loaded, blocks: str, batch_size: int, ckpt: str, run_dir: Path):
    run = loaded.run_config
    data = run_folder_data(run.data, run_dir, ckpt)
    folder = prepare(data, log=lambda *_: None)  # verifies a cached folder, prepares a missing one
    meta = load_meta(folder)
    info = meta["splits"]["val"]
    counts = Counts()
    counts.tokens, counts.bytes = info["tokens"], info["bytes"]
    T = loaded.model.config.block_size
    path, dtype = folder / info["file"], meta["dtype"]
    if info["tokens"] < T + 1:
        raise ConfigError(
            f"ckpt={ckpt}: the validation split of its data ({folder}) holds {info['tokens']} tokens, fewer than "
            f"one block of {T + 1}; evaluate a model with a smaller block_size, or prepare more text"
        )
    if blocks == "run":  # as the datamodule placed them: val_batches x batch x processes, spread evenly
        n = run.loader.val_batches * run.loader.batch_size * loaded.world_size
        dataset = TokenBlocks(path, dtype, info["tokens"], T, offsets="spread", length=n)
        what, counts.blocks = f"the run's {n} validation blocks (those of its val/loss)", n
        return what, _batched((dataset[i] for i in range(n)), batch_size), counts
    tokens = np.memmap(path, dtype=dtype, mode="r")[: info["tokens"]]
    starts = range(0, len(tokens) - T - 1, T)  # non-overlapping blocks, in order
    rows = (torch.from_numpy(tokens[s : s + T + 1].astype(np.int64)) for s in starts)
    counts.blocks = len(starts)
    return f"the whole validation split, {len(starts)} blocks", _batched(rows, batch_size), counts


class TextStream:
    """Documents of local files or a Hub dataset, tokenized as training data is (end-of-text after
    each), cut into non-overlapping blocks of block_size + 1 tokens."""

    def __init__(self, loaded: Loaded, text: str | None, hf: str | None, hf_split: str, text_field: str):
        self.source = resolve_source(text, hf)
        self.tokenizer, self.eot = ordinary(loaded.tokenizer), loaded.eot_id
        self.hf_split, self.text_field, self.documents = hf_split, text_field, 0
        self.counts = Counts()
        # the plain-text files' bytes are what the progress counts (a .jsonl's or .parquet's are not text)
        plain = self.source.kind != "hf" and all(
            p.suffix not in (".jsonl", ".json", ".parquet") for p in self.source.files
        )
        self.total_bytes = sum(p.stat().st_size for p in self.source.files) if plain else None

    def describe(self) -> str:
        if self.source.kind == "hf":
            return f"hf={self.source.name} ({self.hf_split})"
        return f"text={self.source.name} ({len(self.source.files)} file(s))"

    def texts(self) -> Iterator[str | None]:
        """Pieces of text, each a whole document or part of one; None ends a document."""
        import datasets

        if self.source.kind == "hf":
            spec = self.source.hf_name
            ds = datasets.load_dataset(spec, self.source.hf_config, split=self.hf_split, streaming=True)
            for row in ds:
                yield row[self.text_field]
                yield None
            return
        for path in self.source.files:
            if path.suffix in (".jsonl", ".json", ".parquet"):
                builder = "parquet" if path.suffix == ".parquet" else "json"
                for row in datasets.load_dataset(builder, data_files=str(path), split="train", streaming=True):
                    yield row[self.text_field]
                    yield None
                continue
            with open(path, encoding="utf-8", errors="replace") as f:  # a plain-text file is one document
                carry = ""
                while lines := f.readlines(TEXT_CHUNK_BYTES):
                    text = carry + "".join(lines)
                    cut = safe_cut(text)
                    yield text[:cut]
                    carry = text[cut:]
                yield carry
            yield None

    def tokens_stream(self) -> Iterator[int]:
        for piece in self.texts():
            if piece is None:
                self.documents += 1
                self.counts.tokens += 1
                yield self.eot
                continue
            ids = self.tokenizer.encode(piece).ids
            self.counts.tokens += len(ids)
            self.counts.bytes += len(piece.encode("utf-8"))
            yield from ids

    def batches(self, T: int, batch_size: int) -> Iterator[torch.Tensor]:
        def rows():
            buffer: list[int] = []
            for token in self.tokens_stream():
                buffer.append(token)
                if len(buffer) == T + 1:
                    yield torch.tensor(buffer)
                    buffer = buffer[-1:]  # the next block predicts from the last token on

        return _batched(rows(), batch_size)


def _batched(rows, batch_size: int) -> Iterator[torch.Tensor]:
    batch = []
    for row in rows:
        batch.append(row)
        if len(batch) == batch_size:
            yield torch.stack(batch)
            batch = []
    if batch:
        yield torch.stack(batch)


def _progress(what: str, total: int | None, by_bytes: bool):
    """Progress on stderr, in lines where it is no terminal: sequences, or a local text's bytes."""
    unit = {"unit": "B", "unit_scale": True, "unit_divisor": 1024} if by_bytes else {"unit": "seq"}
    return bars.bar(desc=f"evaluating {what}", total=total, **unit)
