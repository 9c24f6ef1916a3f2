"""Text from a checkpoint: temperature, top-k and top-p sampling with a KV cache."""

from __future__ import annotations

import torch

from llm.checkpointing.files import Checkpoint, choose_checkpoint
from llm.data.tokenizer import ordinary
from llm.errors import ConfigError
from llm.model import KVCache, Transformer


def next_token(
    logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None, generator: torch.Generator | None
) -> torch.Tensor:
    """One token id per row of logits (B, V), as (B, 1)."""
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the ones before it already reach top_p (the first one always stays)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)


@torch.no_grad()
def generate(
    model: Transformer,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eot_id: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Continue idx (B, T) by up to max_new_tokens tokens; stop early when every row has ended
    (eot_id). Each new token costs one position of attention thanks to the KV cache; when the
    cache is full, it restarts from the last half of the context."""
    model.eval()
    block = model.config.block_size
    dtype = next(model.parameters()).dtype

    def prefill(tokens):
        cache = KVCache(model.config, tokens.size(0), block, tokens.device, dtype)
        return cache, model(tokens, cache=cache)[:, -1]

    cache, logits = prefill(idx[:, -block:])
    done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    for _ in range(max_new_tokens):
        token = next_token(logits, temperature, top_k, top_p, generator)
        if eot_id is not None:
            token = token.masked_fill(done[:, None], eot_id)
            done |= token[:, 0] == eot_id
        idx = torch.cat([idx, token], dim=1)
        if done.all():
            break
        if cache.pos >= block:
            cache, logits = prefill(idx[:, -(block // 2) :])
        else:
            logits = model(token, cache=cache)[:, -1]
    return idx


def sample(
    ckpt: str = "",
    prompt: str = "",
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = 200,
    top_p: float | None = 0.95,
    num_samples: int = 1,
    seed: int = 1337,
    device: str = "auto",
) -> list[str]:
    """Generate text from a checkpoint and print it.

    Args:
        ckpt: a checkpoint written by training (CKPT=), e.g. runs/<name>/checkpoints/last.ckpt; a run
            folder: its newest checkpoint; none: the newest of any run under runs/
        prompt: the text to continue (PROMPT=); empty starts a new document
        max_new_tokens: tokens to generate per sample
        temperature: 0 is greedy; higher is more random
        top_k: sample among the k most likely tokens only (null: all)
        top_p: sample among the most likely tokens whose probabilities add up to p (null: all)
        num_samples: independent samples to print
        seed: random seed, for the same text again
        device: cpu, cuda, or auto
    """
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens}: generate at least 1 token")
    if top_p is not None and not 0 < top_p <= 1:
        raise ConfigError(f"top_p={top_p}: must lie in (0, 1], or null for no nucleus filtering")
    if num_samples < 1:
        raise ConfigError(f"num_samples={num_samples}: print at least 1 sample")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"top_k={top_k}: sample among at least 1 token, or null for all of them")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device}: no GPU is visible here; use cpu or auto")
    loaded = Checkpoint(choose_checkpoint(ckpt)).load(device)
    # a prompt quoting <|endoftext|> is text, as it is in the training data (ordinary), not a document end
    ids = ordinary(loaded.tokenizer).encode(prompt, add_special_tokens=False).ids if prompt else [loaded.eot_id]
    idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    out = generate(loaded.model, idx, max_new_tokens, temperature, top_k, top_p, loaded.eot_id, generator)
    texts = []
    for i, row in enumerate(out.tolist()):
        new = row[len(ids) :]
        if loaded.eot_id in new:
            new = new[: new.index(loaded.eot_id)]
        text = prompt + loaded.tokenizer.decode(new)
        texts.append(text)
        if num_samples > 1:
            print(f"--- sample {i + 1} ---")
        print(text)
    return texts
