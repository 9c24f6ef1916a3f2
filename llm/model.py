"""A decoder-only Transformer in plain PyTorch: one screen per component, no framework inside.

Covers the GPT-2 family (learned positions, LayerNorm, GELU MLP, biases, tied embeddings) and the
Llama family (rotary positions, RMSNorm, SwiGLU MLP, grouped-query attention, no biases) through
the switches of `ModelConfig`. Shapes in comments: B batch, T time, C n_embd, H heads, K kv heads,
Q head dim, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class ModelConfig:
    """Architecture of the Transformer. Every field is a YAML key in `configs/model/*.yaml`."""

    vocab_size: int | None = None  # None: taken from the tokenizer, rounded up to a multiple of 64
    block_size: int = 256  # context length in tokens
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None  # grouped-query attention: K key/value heads; None = n_head
    n_embd: int = 128
    intermediate_size: int | None = None  # MLP width; None: 4*n_embd (gelu), ~8/3*n_embd (swiglu)
    mlp: Literal["gelu", "swiglu"] = "gelu"
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    position: Literal["learned", "rope"] = "learned"
    rope_theta: float = 10000.0
    bias: bool = True  # biases in linear layers and LayerNorm
    dropout: float = 0.0
    tie_embeddings: bool = True  # output projection shares the token embedding matrix
    init_std: float = 0.02

    def __post_init__(self) -> None:
        # each message names the field, the value and the fix: the CLI prints it as the whole answer
        for name in ("block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive number")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} is a probability: use 0 (none) up to below 1, e.g. 0.1")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; choose n_embd a multiple of n_head"
            )
        if self.n_kv_head is not None and (self.n_kv_head < 1 or self.n_head % self.n_kv_head):
            raise ValueError(
                f"n_kv_head={self.n_kv_head} does not divide n_head={self.n_head}; "
                "choose a divisor of n_head (n_head for plain multi-head attention)"
            )
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} (n_embd/n_head) is odd; rotary positions need it even")
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ValueError(f"vocab_size={self.vocab_size} must be positive, or null to take the tokenizer's")

    # derived sizes are properties, not fields filled in later: an override of n_embd or n_head
    # must move them too
    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def mlp_hidden(self) -> int:
        if self.intermediate_size:
            return self.intermediate_size
        if self.mlp == "gelu":
            return 4 * self.n_embd
        return 256 * math.ceil(int(8 * self.n_embd / 3) / 256)  # Llama's rule: 2/3 of 4C, rounded up to 256


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32: the mean of squares underflows in bf16
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return x32.type_as(x) * self.weight


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


def rope_tables(head_dim: int, length: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles, each (length, head_dim/2)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :Q/2], x[..., Q/2:]) of x (B, heads, T, Q) by the angles for its T positions."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.type_as(x)


class KVCache:
    """Keys and values of every layer for incremental decoding, preallocated to `length` positions."""

    def __init__(self, config: ModelConfig, batch: int, length: int, device, dtype):
        shape = (batch, config.kv_heads, length, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.pos = 0  # positions filled so far

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, K, t, Q) at the current position; return all keys and values so far."""
        t = k.size(2)
        self.k[layer][:, :, self.pos : self.pos + t] = k
        self.v[layer][:, :, self.pos : self.pos + t] = v
        end = self.pos + t
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        # queries (H heads), keys and values (K heads each, fewer than H under grouped-query
        # attention) from one matmul: one large kernel rather than two smaller ones
        self.qkv_proj = nn.Linear(config.n_embd, (config.n_head + 2 * self.n_kv_head) * self.head_dim, bias=config.bias)
        self.out_proj = nn.Linear(config.n_head * self.head_dim, config.n_embd, bias=config.bias)
        self.out_proj.residual_projection = True  # scaled at init, see Transformer._init_weights
        self.dropout = config.dropout

    def forward(self, x, rope=None, cache: KVCache | None = None):
        B, T, _ = x.shape
        H, K, Q = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.qkv_proj(x).split([H * Q, K * Q, K * Q], dim=-1)
        q = q.view(B, T, H, Q).transpose(1, 2)  # (B, H, T, Q)
        k = k.view(B, T, K, Q).transpose(1, 2)  # (B, K, T, Q)
        v = v.view(B, T, K, Q).transpose(1, 2)  # (B, K, T, Q)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # a fresh sequence attends causally; one new token after the cache attends to everything before it
        is_causal = cache is None or cache.pos == 0
        if cache is not None:
            if T > 1 and cache.pos > 0:
                raise ValueError("the KV cache takes a prompt only while empty, then one token at a time")
            k, v = cache.update(self.layer, k, v)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=K != H,
        )  # (B, H, T, Q)
        y = y.transpose(1, 2).reshape(B, T, H * Q)
        return F.dropout(self.out_proj(y), self.dropout, self.training)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        hidden = config.mlp_hidden
        # SwiGLU needs a gate and an up projection; fused into one matmul of width 2*hidden
        self.up_proj = nn.Linear(config.n_embd, (2 if self.swiglu else 1) * hidden, bias=config.bias)
        self.down_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.down_proj.residual_projection = True
        self.dropout = config.dropout

    def forward(self, x):
        h = self.up_proj(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")  # GPT-2's GELU
        return F.dropout(self.down_proj(h), self.dropout, self.training)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = Attention(config, layer)
        self.mlp_norm = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, rope=None, cache: KVCache | None = None):
        x = x + self.attn(self.attn_norm(x), rope, cache)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    rope_cos: torch.Tensor  # (block_size, head_dim // 2) buffers, with position="rope"
    rope_sin: torch.Tensor

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.vocab_size is None:
            raise ValueError("ModelConfig.vocab_size must be set (the CLI sets it from the tokenizer)")
        self.config = config
        self.activation_checkpointing = False  # recompute each block in backward, set by the trainer
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd) if config.position == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if config.position == "rope":
            cos, sin = rope_tables(config.head_dim, config.block_size, config.rope_theta)
            # not persistent: derived from the config, so checkpoints stay free of them
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module, generator: torch.Generator | None = None) -> None:
        # GPT-2: N(0, 0.02) everywhere; projections that add into the residual stream are scaled by
        # 1/sqrt(2L) so that the stream's variance does not grow with depth (2 additions per block)
        std = self.config.init_std
        if isinstance(module, nn.Linear):
            if getattr(module, "residual_projection", False):
                std = std / math.sqrt(2 * self.config.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std, generator=generator)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std, generator=generator)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        hidden: bool = False,
    ) -> torch.Tensor:
        """Logits (B, T, V) for token ids idx (B, T); with targets (B, T), the mean next-token
        cross-entropy instead; with hidden=True, the final normalised hidden states (B, T, C) that
        the output layer reads (distillation computes the logits from them in chunks). With a cache,
        idx continues the cached sequence.

        The loss is computed here rather than by the caller so that torch.compile sees it with the
        output projection: compiled, the float32 logits of the whole batch (B·T·V·4 bytes: 3.3 GB
        for 16 x 1024 tokens of GPT-2) are never materialised."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than block_size={self.config.block_size}")
        x = self.tok_emb(idx)  # (B, T, C)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(start, start + T, device=idx.device))
        rope = None
        if self.config.position == "rope":
            rope = (self.rope_cos[start : start + T], self.rope_sin[start : start + T])
        x = self.drop(x)
        for block in self.blocks:
            if self.activation_checkpointing and self.training:
                x = checkpoint(block, x, rope, use_reentrant=False)
            else:
                x = block(x, rope, cache)
        if cache is not None:
            cache.pos += T
        x = self.norm(x)
        if hidden:
            return x
        logits = self.lm_head(x)  # (B, T, V)
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())  # softmax in fp32, also under bf16

    def num_params(self, exclude_position_embeddings: bool = False) -> int:
        """Parameters, a tied matrix counted once (parameters() yields each tensor once)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_position_embeddings and self.pos_emb is not None:
            n -= self.pos_emb.weight.numel()
        return n


def count_params(config: ModelConfig, exclude_position_embeddings: bool = False) -> int:
    """Parameter count of a config without allocating it (the model is built on the meta device)."""
    with torch.device("meta"):
        return Transformer(config).num_params(exclude_position_embeddings)


def flops_per_token(config: ModelConfig, seq_len: int | None = None) -> int:
    """Training FLOPs per token, forward and backward: 6N + 12·L·H·Q·T (PaLM, appendix B), N the
    parameters without position embeddings, a tied matrix once; T the sequence length."""
    T = seq_len or config.block_size
    n = count_params(config, exclude_position_embeddings=True)
    return 6 * n + 12 * config.n_layer * config.n_head * config.head_dim * T
