"""Validation loss, perplexity and bits per byte of a checkpoint on its run's validation split."""

from __future__ import annotations

import json
import math

import numpy as np
import torch
import torch.nn.functional as F

from llm.checkpoint import load_for_inference
from llm.data.prepare import PrepareConfig, load_meta, prepare
from llm.errors import ConfigError
from llm.module import bits_per_byte


@torch.no_grad()
def evaluate(
    ckpt: str, batch_size: int = 8, max_batches: int | None = None, device: str = "auto", json_out: bool = False
) -> dict:
    """Evaluate a checkpoint on every block of its run's validation split (prepared again if missing).

    Args:
        ckpt: a checkpoint file or DeepSpeed folder (CKPT=)
        batch_size: sequences per forward pass
        max_batches: stop after this many batches (none: the whole split)
        device: cpu, cuda, or auto
        json_out: print one JSON object instead of lines
    """
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    loaded = load_for_inference(ckpt, device)
    cfg = PrepareConfig.from_data_config(loaded.config["data"])
    folder = prepare(cfg, log=lambda *_: None)  # verifies a cached folder, prepares a missing one
    meta = load_meta(folder)
    info = meta["splits"]["val"]
    tokens = np.memmap(folder / info["file"], dtype=meta["dtype"], mode="r")[: info["tokens"]]
    T = loaded.model.config.block_size
    starts = list(range(0, len(tokens) - T - 1, T))  # non-overlapping blocks, in order
    if not starts:
        raise ConfigError(
            f"ckpt={ckpt}: the validation split of its data ({folder}) holds {len(tokens)} tokens, fewer than "
            f"one block of {T + 1}; evaluate a model with a smaller block_size, or prepare more text"
        )
    if max_batches:
        starts = starts[: max_batches * batch_size]
    total, count = 0.0, 0
    for i in range(0, len(starts), batch_size):
        batch = torch.from_numpy(np.stack([tokens[s : s + T + 1] for s in starts[i : i + batch_size]]).astype(np.int64))
        batch = batch.to(device)
        logits = loaded.model(batch[:, :-1])
        total += F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
        count += batch[:, 1:].numel()
    loss = total / count
    result = {
        "checkpoint": str(ckpt),
        "step": loaded.step,
        "tokens_evaluated": count,
        "val_loss": loss,
        "val_ppl": math.exp(min(loss, 50.0)),
        "val_bpb": bits_per_byte(loss, info["tokens"], info["bytes"]),
        "unigram_val_entropy": meta["unigram_val_entropy"],
    }
    if json_out:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:<20} {value:.4f}" if isinstance(value, float) else f"{key:<20} {value}")
    return result
