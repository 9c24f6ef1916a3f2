"""The Transformer: shapes, causality, attention against a written-out reference, KV cache, presets."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from llm.model import KVCache, ModelConfig, Transformer, count_params, flops_per_token

PRESETS = Path(__file__).resolve().parents[1] / "configs" / "model"

GPT2 = dict(vocab_size=101, block_size=32, n_layer=2, n_head=4, n_embd=32)
LLAMA = dict(GPT2, position="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False, n_kv_head=2)


@pytest.fixture(params=["gpt2", "llama"])
def config(request) -> ModelConfig:
    return ModelConfig(**(GPT2 if request.param == "gpt2" else LLAMA))


def test_output_shape(config):
    model = Transformer(config)
    logits = model(torch.randint(0, config.vocab_size, (3, 17)))
    assert logits.shape == (3, 17, config.vocab_size)


def test_changing_a_token_never_changes_earlier_logits(config):
    torch.manual_seed(0)
    model = Transformer(config).eval()
    idx = torch.randint(0, config.vocab_size, (1, 20))
    base = model(idx)
    for t in (0, 7, 19):
        changed = idx.clone()
        changed[0, t] = (changed[0, t] + 1) % config.vocab_size
        out = model(changed)
        assert torch.equal(out[0, :t], base[0, :t]), f"logits before position {t} moved"
        assert not torch.allclose(out[0, t], base[0, t]), f"position {t} itself did not move"


def reference_attention(attn, x):
    """Multi-head attention written out: softmax(QK^T / sqrt(d) + causal mask) V, each key/value
    head shared by n_head / n_kv_head query heads."""
    B, T, C = x.shape
    H, K, Q = attn.n_head, attn.n_kv_head, attn.head_dim
    w, b = attn.qkv_proj.weight, attn.qkv_proj.bias  # rows: H query heads, then K key heads, then K value heads
    q = (x @ w[: H * Q].T + b[: H * Q]).view(B, T, H, Q).transpose(1, 2)
    k = (x @ w[H * Q : (H + K) * Q].T + b[H * Q : (H + K) * Q]).view(B, T, K, Q).transpose(1, 2)
    v = (x @ w[(H + K) * Q :].T + b[(H + K) * Q :]).view(B, T, K, Q).transpose(1, 2)
    k, v = k.repeat_interleave(H // K, dim=1), v.repeat_interleave(H // K, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(Q)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C)
    return y @ attn.out_proj.weight.T + attn.out_proj.bias


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_attention_equals_written_out_multi_head_attention(n_kv_head):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**dict(GPT2, n_kv_head=n_kv_head))).eval()
    attn = model.blocks[0].attn
    assert attn.qkv_proj.out_features == (4 + 2 * n_kv_head) * 8
    x = torch.randn(2, 11, 32)
    torch.testing.assert_close(attn(x), reference_attention(attn, x), atol=1e-5, rtol=1e-5)


def test_kv_cache_gives_the_logits_of_a_full_forward(config):
    torch.manual_seed(0)
    model = Transformer(config).eval()
    idx = torch.randint(0, config.vocab_size, (2, 12))
    full = model(idx)
    cache = KVCache(config, 2, config.block_size, "cpu", torch.float32)
    steps = [model(idx[:, :5], cache=cache)] + [model(idx[:, t : t + 1], cache=cache) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_tied_embeddings_share_one_matrix_and_count_once():
    tied = Transformer(ModelConfig(**GPT2))
    untied = Transformer(ModelConfig(**dict(GPT2, tie_embeddings=False)))
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert untied.num_params() - tied.num_params() == 101 * 32


def test_residual_projections_are_scaled_at_init():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, n_layer=8, n_embd=256, n_head=4, block_size=16))
    plain = model.blocks[0].attn.qkv_proj.weight.std().item()
    scaled = model.blocks[0].attn.out_proj.weight.std().item()
    assert plain == pytest.approx(0.02, rel=0.05)
    assert scaled == pytest.approx(0.02 / math.sqrt(2 * 8), rel=0.05)


def test_flops_per_token_is_6n_plus_attention():
    config = ModelConfig(**GPT2)  # learned positions: 32 x 32 position parameters are excluded
    model = Transformer(config)
    n = model.num_params() - 32 * 32
    assert flops_per_token(model.config) == 6 * n + 12 * 2 * 4 * 8 * 32
    assert flops_per_token(model.config, seq_len=8) == 6 * n + 12 * 2 * 4 * 8 * 8


def counted(forward, count: list[int]):
    def wrapper(*args, **kwargs):
        count[0] += 1
        return forward(*args, **kwargs)

    return wrapper


def test_activation_checkpointing_recomputes_each_block_and_keeps_the_gradients(config):
    torch.manual_seed(0)
    idx, targets = torch.randint(0, config.vocab_size, (2, 2, 8))
    grads, calls = {}, {}
    for checkpointing in (False, True):
        torch.manual_seed(1)
        model = Transformer(config)
        model.activation_checkpointing = checkpointing
        count = [0]
        for block in model.blocks:  # count the calls of forward itself: module hooks skip the recomputation
            block.forward = counted(block.forward, count)
        model(idx, targets=targets).backward()
        grads[checkpointing] = {n: p.grad for n, p in model.named_parameters()}
        calls[checkpointing] = count[0]
    assert calls == {False: config.n_layer, True: 2 * config.n_layer}  # forward, then again in backward
    assert all(g is not None for g in grads[True].values())
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, rtol=0, atol=0, msg=name)


PRESET_FILES = sorted(PRESETS.glob("*.yaml"))


def reference_of(path: Path) -> dict | None:
    """The published model a preset reproduces, from its `# reference: {...}` line: a comment, so that
    it stays out of the architecture (and so out of checkpoints and the resume comparison)."""
    for line in path.read_text().splitlines():
        if line.startswith("# reference:"):
            return yaml.safe_load(line.removeprefix("# reference:"))
    return None


@pytest.mark.parametrize("path", PRESET_FILES, ids=lambda p: p.stem)
def test_every_preset_builds_and_reproduces_its_reference(path):
    # a preset's reference is the published model it reproduces (Hugging Face's GPT-2 checkpoints,
    # Meta's Llama 3.2 1B and Llama 2 7B): its exact parameter count at the published vocabulary
    fields = yaml.safe_load(path.read_text())
    config = ModelConfig(**dict(fields, vocab_size=fields["vocab_size"] or 8192))
    with torch.device("meta"):
        Transformer(config)  # builds
    # the published count, or for a preset of this project's own (tiny) the count written out below
    reference = reference_of(path) or {"name": "tiny", "params": 1_858_304, "vocab_size": 8192}
    published = ModelConfig(**dict(fields, vocab_size=reference["vocab_size"]))
    assert count_params(published) == reference["params"], reference["name"]


def test_the_presets_with_a_reference_are_the_published_models():
    references = {p.stem: reference_of(p) for p in PRESET_FILES}
    assert {k for k, v in references.items() if v} >= {"gpt2-124m", "gpt2-1.5b", "llama-1b", "llama-7b"}
    assert references["gpt2-124m"]["params"] == 124_439_808  # GPT-2 small, as Hugging Face's checkpoint counts


def test_tiny_preset_is_1_9_million_parameters_with_the_default_tokenizer():
    fields = yaml.safe_load((PRESETS / "tiny.yaml").read_text())
    assert fields["vocab_size"] is None  # follows the tokenizer
    assert {k: fields[k] for k in ("n_layer", "n_embd", "block_size")} == {
        "n_layer": 4,
        "n_embd": 128,
        "block_size": 128,
    }
    # 4 blocks of 12 x 128² + 13 x 128 parameters, an 8192 x 128 tied embedding, 128 x 128 positions, a final norm
    block = 12 * 128 * 128 + 13 * 128
    assert count_params(ModelConfig(**dict(fields, vocab_size=8192))) == 4 * block + 8192 * 128 + 128 * 128 + 2 * 128


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(n_embd=100, n_head=3), "n_embd=100 is not divisible by n_head=3"),
        (dict(n_head=4, n_kv_head=3), "n_kv_head=3 does not divide n_head=4"),
        (dict(vocab_size=0), "vocab_size=0 must be positive"),
    ],
)
def test_bad_config_names_the_field_and_value(fields, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**fields)


def test_derived_sizes_follow_overrides():
    # the MLP width and key/value heads are derived at use, so n_embd=256 moves the MLP to 1024
    assert ModelConfig(n_embd=256).mlp_hidden == 1024
    assert ModelConfig(n_embd=256, n_head=8).kv_heads == 8
    assert ModelConfig(n_embd=4096, mlp="swiglu").mlp_hidden == 11008  # Llama 7B's width


def test_cross_entropy_at_init_is_near_uniform():
    # GPT-2 initialisation: the first loss is close to ln(V), the model starts from no preference
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**dict(GPT2, vocab_size=1000)))
    idx, targets = torch.randint(0, 1000, (2, 4, 32))
    loss = F.cross_entropy(model(idx).flatten(0, 1), targets.flatten())
    assert loss.item() == pytest.approx(math.log(1000), abs=0.1)


def test_loss_from_forward_is_the_cross_entropy_of_the_logits(config):
    torch.manual_seed(0)
    model = Transformer(config)
    idx, targets = torch.randint(0, config.vocab_size, (2, 3, 16))
    expected = F.cross_entropy(model(idx).flatten(0, 1), targets.flatten())
    torch.testing.assert_close(model(idx, targets=targets), expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the softmax stays in fp32 under bf16
        assert model(idx, targets=targets).dtype == torch.float32
