"""The model as lm-eval's `LM`, registered as "llm-checkpoint": this project's Transformer and its
tokenizer, scoring lm-eval's three kinds of request (log-likelihood of a continuation, rolling
log-likelihood of a text, greedy generation up to a stop sequence).

With more than one process lm-eval gives each rank a share of every task's requests (as many on
each) and gathers the per-example scores to rank 0; this model then runs as many forward passes on
every rank as on the busiest, padding with one-token passes, because under ZeRO-3 each forward pass
gathers the partitioned weights with the other ranks and a rank that stopped early would leave them
waiting."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
import torch.distributed as dist
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tokenizers import Tokenizer

from llm import bars
from llm.checkpointing.files import Loaded
from llm.data.tokenizer import ordinary
from llm.model import KVCache, Transformer

LM_NAME = "llm-checkpoint"


@register_model(LM_NAME)
class CheckpointLM(LM):
    """A model as lm-eval's: requests scored in batches, longest first (as lm-eval's own models order
    them, so that a batch's padding is short and the first batch shows the peak memory), each context
    cut from the left to the model's block size.

    `rank` and `world_size`: this process's place in an initialised torch.distributed group (a
    training run's), or 0 and 1. `forward_context`: what each forward pass runs under (a training
    run's precision plugin's autocast)."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        eot_id: int,
        batch_size: int = 8,
        device: str | torch.device = "cpu",
        rank: int = 0,
        world_size: int = 1,
        forward_context: Callable[[], AbstractContextManager] = contextlib.nullcontext,
        progress: bool = True,
    ):
        super().__init__()
        self.model, self.eot, self.batch_size, self.where = model, eot_id, batch_size, torch.device(device)
        self.tokenizer = ordinary(tokenizer)  # a text that quotes <|endoftext|> is its characters
        self.block = model.config.block_size
        self._rank, self._world_size, self.forward_context = rank, world_size, forward_context
        self.forwards = 0  # forward passes run since the last pad_forwards
        self.progress = progress  # bars on the terminal (not inside a training run's output)

    @classmethod
    def of(cls, loaded: Loaded, batch_size: int = 8, device: str = "cpu") -> CheckpointLM:
        return cls(loaded.model, loaded.tokenizer, loaded.eot_id, batch_size, device)

    # --- lm-eval's collectives, over the training run's process group ------------------------------
    @property
    def device(self) -> torch.device:  # where lm-eval puts the tensors it all-gathers
        return self.where

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

    def gather_object(self, obj, dst: int = 0):
        if self.world_size == 1:
            return [obj]
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, obj)  # all of them, not gather_object: NCCL's needs no dst list
        return gathered if self.rank == dst else None

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """The model's logits, counted (pad_forwards)."""
        self.forwards += 1
        with self.forward_context():
            return self.model(tokens, cache=cache) if cache is not None else self.model(tokens)

    def pad_forwards(self) -> None:
        """As many forward passes on this rank as on the busiest: one-token passes for the difference."""
        if self.world_size > 1:
            counts = self.all_gather(torch.tensor(self.forwards, device=self.where))
            for _ in range(int(counts.max()) - self.forwards):
                self.forward(torch.full((1, 1), self.eot, device=self.where))
        self.forwards = 0

    # --- the three kinds of request --------------------------------------------------------------
    def tok_encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation tokenized together, as lm-eval's models do: the continuation's
        tokens are the whole's after the context's, with the context's trailing spaces moved to it
        (a space is a token's start in a byte-level BPE). An empty context is the end-of-text token."""
        if not context:
            return [self.eot], self.tok_encode(continuation)
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, head = self.tok_encode(context + continuation), self.tok_encode(context)
        return head, whole[len(head) :]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self.encode_pair(*request.args) for request in requests]
        return self.score(pairs, "log-likelihoods", disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """A whole text's log-likelihood, in disjoint windows of block_size predicted tokens (each
        with as much of the text before it as fits), the first predicted from the end-of-text token."""
        pairs, owner = [], []
        for i, request in enumerate(requests):
            (text,) = request.args
            windows = get_rolling_token_windows(self.tok_encode(text), self.eot, self.block, context_len=1)
            for window in map(make_disjoint_window, windows):
                pairs.append(window)
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self.score(pairs, "rolling log-likelihoods", disable_tqdm), strict=True):
            totals[i] += logprob
        return totals

    @torch.no_grad()
    def score(self, pairs: list[tuple[list[int], list[int]]], what: str, quiet: bool) -> list[tuple[float, bool]]:
        """(log-probability of the continuation, whether greedy decoding gives it) for each
        (context, continuation) of token ids."""
        # what the model reads (the last block_size tokens before the end) and how many it predicts
        rows = []
        for context, continuation in pairs:
            whole = (context + continuation)[-(self.block + 1) :]
            rows.append((whole, min(len(continuation), len(whole) - 1)))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        progress = bars.bar(desc=f"scoring {what}", total=len(rows), unit="req", disable=quiet or not self.progress)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            width = max(len(rows[i][0]) for i in batch) - 1
            # padded on the right: a causal model's earlier positions never see the padding
            tokens = torch.full((len(batch), width), self.eot, dtype=torch.long)
            for j, i in enumerate(batch):
                inputs = rows[i][0][:-1]
                tokens[j, : len(inputs)] = torch.tensor(inputs)
            logprobs = self.forward(tokens.to(self.where)).float().log_softmax(-1).cpu()
            for j, i in enumerate(batch):
                whole, n = rows[i]
                end = len(whole) - 1
                target = torch.tensor(whole[end + 1 - n :])
                predicted = logprobs[j, end - n : end]
                logprob = predicted.gather(-1, target[:, None]).sum().item()
                results[i] = (logprob, bool((predicted.argmax(-1) == target).all()))
            progress.update(len(batch))
        progress.close()
        self.pad_forwards()
        return results

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, each up to its task's stop sequences or max_gen_toks tokens (256 when
        the task gives none). One request at a time: the Transformer takes no padding mask."""
        answers = []
        progress = bars.bar(
            desc="generating", total=len(requests), unit="req", disable=disable_tqdm or not self.progress
        )
        for request in requests:
            context, options = request.args
            until = options.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            limit = int(options.get("max_gen_toks", 256))
            answers.append(self.greedy(self.tok_encode(context) or [self.eot], until, limit))
            progress.update(1)
        progress.close()
        self.pad_forwards()
        return answers

    def greedy(self, context: list[int], until: list[str], limit: int) -> str:
        """Up to `limit` tokens after `context`, cut before the first stop sequence (or end-of-text)."""
        keep = max(self.block - limit, self.block // 2)  # room for the answer in one block
        tokens = torch.tensor([context[-keep:]], device=self.where)
        new: list[int] = []
        cached = isinstance(self.model, Transformer)  # a transformers model (make export's) is run whole
        dtype = next(self.model.parameters()).dtype
        cache = KVCache(self.model.config, 1, self.block, self.where, dtype) if cached else None
        logits = self.forward(tokens, cache)[:, -1]
        for _ in range(limit):
            token = int(logits.argmax(-1))
            if token == self.eot:
                break
            new.append(token)
            text = self.tokenizer.decode(new)
            stops = [text.index(s) for s in until if s in text]
            if stops:
                return text[: min(stops)]
            step = torch.tensor([[token]], device=self.where)
            if cache is not None and cache.pos < self.block:
                logits = self.forward(step, cache)[:, -1]
            else:  # no cache, or a full one: the last block's worth again
                tokens = torch.cat([tokens, step], dim=1)[:, -self.block :]
                logits = self.forward(tokens)[:, -1]
                cache = None
        return self.tokenizer.decode(new)
