"""This project's Transformer <-> a Hugging Face `transformers` folder, both ways.

Two families map exactly: GPT-2 (learned positions, LayerNorm, tanh-GELU MLP, biases) to
`GPT2LMHeadModel`, and Llama (rotary positions, RMSNorm, SwiGLU, grouped-query attention) to
`LlamaForCausalLM`. The fused projections of this model are split (Llama's q/k/v and gate/up) or
transposed (GPT-2's Conv1D layers keep weights as in x out). A config that neither family can
express is refused with the field that stands in the way, never exported approximately.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from llm.errors import ConfigError, exception_line
from llm.model import ModelConfig, Transformer

GPT2_NEEDS = {"norm": "layernorm", "mlp": "gelu"}
LLAMA_NEEDS = {"norm": "rmsnorm", "mlp": "swiglu"}


def family(c: ModelConfig, field: str = "ckpt") -> str:
    """gpt2 or llama; ConfigError naming the field neither allows."""
    name, needs = ("gpt2", GPT2_NEEDS) if c.position == "learned" else ("llama", LLAMA_NEEDS)
    for key, value in needs.items():
        if getattr(c, key) != value:
            kind = "GPT2LMHeadModel" if name == "gpt2" else "LlamaForCausalLM"
            raise ConfigError(
                f"{field}: model.config.{key}={getattr(c, key)} with position={c.position} is neither GPT-2 nor "
                f"Llama; {kind} needs {key}={value}; such a model cannot be exported to transformers"
            )
    if name == "gpt2" and c.kv_heads != c.n_head:
        raise ConfigError(f"{field}: model.config.n_kv_head={c.n_kv_head}: GPT-2 has no grouped-query attention")
    if name == "gpt2" and not c.bias:
        raise ConfigError(f"{field}: model.config.bias=false: GPT2LMHeadModel always has biases")
    return name


def hf_config(c: ModelConfig, eot_id: int, dtype: str = "float32"):
    """The transformers config (GPT2Config or LlamaConfig) of the matching class; save_pretrained
    writes its config.json."""
    from transformers import GPT2Config, LlamaConfig

    common: dict[str, Any] = {"vocab_size": c.vocab_size, "tie_word_embeddings": c.tie_embeddings, "dtype": dtype}
    common |= {"bos_token_id": eot_id, "eos_token_id": eot_id, "initializer_range": c.init_std}
    if family(c) == "gpt2":
        return GPT2Config(
            architectures=["GPT2LMHeadModel"],
            n_positions=c.block_size,
            n_embd=c.n_embd,
            n_layer=c.n_layer,
            n_head=c.n_head,
            n_inner=c.intermediate_size,  # None: 4 x n_embd, as here
            activation_function="gelu_new",  # GPT-2's tanh approximation, as this model's MLP
            layer_norm_epsilon=c.norm_eps,
            resid_pdrop=c.dropout,
            embd_pdrop=c.dropout,
            attn_pdrop=c.dropout,
            **common,
        )
    common["rope_theta"] = c.rope_theta  # a key LlamaConfig reads, which its type hints lack
    return LlamaConfig(
        architectures=["LlamaForCausalLM"],
        max_position_embeddings=c.block_size,
        hidden_size=c.n_embd,
        intermediate_size=c.mlp_hidden,
        num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head,
        num_key_value_heads=c.kv_heads,
        head_dim=c.head_dim,
        hidden_act="silu",
        rms_norm_eps=c.norm_eps,
        attention_bias=c.bias,
        mlp_bias=c.bias,
        attention_dropout=c.dropout,
        **common,
    )


def weight_map(c: ModelConfig) -> tuple[list[tuple[str, str, bool]], list[tuple[str, list[str], list[int]]]]:
    """How the weights correspond: one-to-one pairs (ours, theirs, transposed), and our fused
    matrices with the transformers matrices they stack (ours, theirs in order, their row counts)."""
    pairs, fused = [], []
    H, K, Q, M = c.n_head, c.kv_heads, c.head_dim, c.mlp_hidden
    biases = ("weight", "bias") if c.bias else ("weight",)
    if family(c) == "gpt2":
        pairs += [
            ("tok_emb.weight", "transformer.wte.weight", False),
            ("pos_emb.weight", "transformer.wpe.weight", False),
        ]
        for i in range(c.n_layer):
            b, h = f"blocks.{i}.", f"transformer.h.{i}."
            for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
                pairs += [(f"{b}{ours}.{s}", f"{h}{theirs}.{s}", False) for s in ("weight", "bias")]
            for ours, theirs in (
                ("attn.qkv_proj", "attn.c_attn"),
                ("attn.out_proj", "attn.c_proj"),
                ("mlp.up_proj", "mlp.c_fc"),
                ("mlp.down_proj", "mlp.c_proj"),
            ):  # GPT-2's Conv1D keeps its weight as (in, out)
                pairs += [(f"{b}{ours}.{s}", f"{h}{theirs}.{s}", s == "weight") for s in ("weight", "bias")]
        pairs += [(f"norm.{s}", f"transformer.ln_f.{s}", False) for s in ("weight", "bias")]
    else:
        pairs.append(("tok_emb.weight", "model.embed_tokens.weight", False))
        for i in range(c.n_layer):
            b, h = f"blocks.{i}.", f"model.layers.{i}."
            pairs += [(f"{b}attn_norm.weight", f"{h}input_layernorm.weight", False)]
            pairs += [(f"{b}mlp_norm.weight", f"{h}post_attention_layernorm.weight", False)]
            for s in biases:
                pairs += [(f"{b}attn.out_proj.{s}", f"{h}self_attn.o_proj.{s}", False)]
                pairs += [(f"{b}mlp.down_proj.{s}", f"{h}mlp.down_proj.{s}", False)]
                qkv = [f"{h}self_attn.{x}_proj.{s}" for x in "qkv"]
                fused.append((f"{b}attn.qkv_proj.{s}", qkv, [H * Q, K * Q, K * Q]))
                fused.append((f"{b}mlp.up_proj.{s}", [f"{h}mlp.gate_proj.{s}", f"{h}mlp.up_proj.{s}"], [M, M]))
        pairs.append(("norm.weight", "model.norm.weight", False))
    if not c.tie_embeddings:
        pairs.append(("lm_head.weight", "lm_head.weight", False))
    return pairs, fused


def to_hf(state: dict, c: ModelConfig, field: str = "ckpt") -> dict:
    """This model's state dict (keys without 'model.') as the transformers class names its weights;
    a weight the map has no place for (an option added to the model, docs/extending.md) is refused."""
    pairs, fused = weight_map(c)
    mapped = {ours for ours, _, _ in pairs} | {ours for ours, _, _ in fused} | {"lm_head.weight"}  # tied: a copy
    if unmapped := sorted(set(state) - mapped):
        raise ConfigError(
            f"{field}: {len(unmapped)} weights ({', '.join(unmapped[:2])}{', ...' if len(unmapped) > 2 else ''}) "
            "have no place in the transformers "
            "model; teach llm/hf.py's weight_map the option that made them, or export a model without it"
        )
    out = {theirs: state[ours].t() if transposed else state[ours] for ours, theirs, transposed in pairs}
    for ours, theirs, rows in fused:
        out.update(zip(theirs, state[ours].split(rows), strict=True))
    return {k: v.contiguous() for k, v in out.items()}


def from_hf(state: dict, c: ModelConfig) -> dict:
    """A transformers state dict of either family as this model's: the inverse of to_hf."""
    pairs, fused = weight_map(c)
    out = {ours: state[theirs].t() if transposed else state[theirs] for ours, theirs, transposed in pairs}
    for ours, theirs, _ in fused:
        out[ours] = torch.cat([state[t] for t in theirs])
    if c.tie_embeddings:
        out["lm_head.weight"] = out["tok_emb.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def from_hf_config(config: dict, field: str = "init") -> ModelConfig:
    """The ModelConfig of a transformers config.json of either family."""
    try:
        return _model_config(config, field)
    except KeyError as exc:
        raise ConfigError(f"{field}: config.json lacks {exc}, which a {config.get('model_type')} config has") from None
    except (TypeError, ValueError) as exc:  # a field of the wrong type, or sizes that do not fit together
        raise ConfigError(f"{field}: config.json: {exc}") from None


def _model_config(config: dict, field: str) -> ModelConfig:
    kind = config.get("model_type")
    tied = config.get("tie_word_embeddings", True)
    if kind == "gpt2":
        return ModelConfig(
            vocab_size=config["vocab_size"],
            block_size=config["n_positions"],
            n_layer=config["n_layer"],
            n_head=config["n_head"],
            n_embd=config["n_embd"],
            intermediate_size=config.get("n_inner"),
            mlp="gelu",
            norm="layernorm",
            norm_eps=config.get("layer_norm_epsilon", 1e-5),
            position="learned",
            bias=True,
            tie_embeddings=tied,
        )
    if kind == "llama":
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        if head_dim * config["num_attention_heads"] != config["hidden_size"]:
            raise ConfigError(f"{field}: head_dim={head_dim} x heads differs from hidden_size; not supported here")
        # transformers 5 writes rope_parameters (rope_theta, rope_type), earlier releases rope_theta and rope_scaling
        rope = config.get("rope_parameters") or {}
        scaling = config.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if scaling:
            raise ConfigError(f"{field}: rope scaling {scaling} is not supported; only plain RoPE")
        return ModelConfig(
            vocab_size=config["vocab_size"],
            block_size=config["max_position_embeddings"],
            n_layer=config["num_hidden_layers"],
            n_head=config["num_attention_heads"],
            n_kv_head=config.get("num_key_value_heads") or config["num_attention_heads"],
            n_embd=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            mlp="swiglu",
            norm="rmsnorm",
            norm_eps=config.get("rms_norm_eps", 1e-6),
            position="rope",
            rope_theta=config.get("rope_theta") or rope.get("rope_theta", 10000.0),
            bias=bool(config.get("attention_bias", False)),
            tie_embeddings=tied,
        )
    raise ConfigError(f"{field}: model_type={kind} in config.json; only gpt2 and llama folders can be imported")


def read_config(folder: Path, field: str) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{field}={folder}: no config.json; give a Hugging Face model folder (GPT-2 or Llama)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{field}={folder}: config.json is not valid JSON ({exc}); fix it or export again") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{field}={folder}: config.json holds no JSON object; fix it or export again")
    return config


def refuse_quantized(config: dict, folder: str | Path, field: str) -> None:
    """A quantized export (make export QUANT=) holds torchao's tensors, which inference reads but
    training cannot start from or distill with: refused before anything is prepared or loaded."""
    if "quantization_config" in config:
        method = config["quantization_config"].get("quant_method", "quantized")
        raise ConfigError(
            f"{field}={folder}: a quantized export ({method}), which only inference reads; give the unquantized "
            "one (make export without QUANT=)"
        )


def load_weights(folder: Path, field: str = "init") -> dict:
    """The state dict of a transformers folder: model.safetensors, its shards, or pytorch_model.bin
    (read weights-only)."""
    from safetensors.torch import load_file

    return _read_weights(Path(folder), field, load_file, lambda f: torch.load(f, map_location="cpu", weights_only=True))


def weight_shapes(folder: Path, field: str = "init") -> dict:
    """The folder's weights as meta tensors of their shapes: the headers only of safetensors files."""
    from safetensors import safe_open

    def headers(file):
        with safe_open(str(file), framework="pt") as f:
            return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}

    def pickled(file):
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        return {k: torch.empty(v.shape, device="meta") for k, v in state.items()}

    return _read_weights(Path(folder), field, headers, pickled)


def _read_weights(folder: Path, field: str, safetensors_file, pickle_file) -> dict:
    import pickle

    from safetensors import SafetensorError

    index = folder / "model.safetensors.index.json"
    try:
        if (folder / "model.safetensors").is_file():
            return safetensors_file(folder / "model.safetensors")
        if index.is_file():
            state = {}
            for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
                state.update(safetensors_file(folder / shard))
            return state
        if (folder / "pytorch_model.bin").is_file():
            state = pickle_file(folder / "pytorch_model.bin")
            if not isinstance(state, dict):
                raise ValueError("not a state dict")
            return state
    except pickle.UnpicklingError as exc:
        raise ConfigError(
            f"{field}={folder}: pytorch_model.bin holds objects other than tensors, refused unread "
            f"({exception_line(exc)}); use a folder with model.safetensors"
        ) from None
    except (SafetensorError, RuntimeError, OSError, EOFError, ValueError, KeyError) as exc:
        raise ConfigError(
            f"{field}={folder}: its weights cannot be read ({type(exc).__name__}: {exception_line(exc)}); "
            "the files may be truncated; download or export them again"
        ) from None
    raise ConfigError(f"{field}={folder}: no model.safetensors or pytorch_model.bin; give a transformers model folder")


def check_weights(folder: str | Path, config: ModelConfig, field: str = "init") -> None:
    """Every weight the architecture needs, of the shape it needs, before a run starts: read from
    the files' headers, so that a folder that does not fit is one line, not a failure at the
    first step after the run folder exists."""
    with torch.device("meta"):
        expected = Transformer(config).state_dict()
    try:
        theirs = from_hf(weight_shapes(Path(folder), field), config)
    except KeyError as exc:
        raise ConfigError(f"{field}={folder}: the weights lack {exc} that its config.json implies") from None
    for name, tensor in theirs.items():
        if name in expected and tuple(tensor.shape) != tuple(expected[name].shape):
            raise ConfigError(
                f"{field}={folder}: a weight for {name} has shape {tuple(tensor.shape)} where its config.json implies "
                f"{tuple(expected[name].shape)}; the folder's weights and config.json do not belong together"
            )


def load_pretrained(folder: str | Path, field: str = "init") -> tuple[ModelConfig, dict]:
    """A GPT-2 or Llama transformers folder as (ModelConfig, this model's state dict)."""
    config = from_hf_config(read_config(Path(folder), field), f"{field}={folder}")
    state = {k: v.float() for k, v in load_weights(Path(folder), field).items()}
    try:
        return config, from_hf(state, config)
    except KeyError as exc:
        raise ConfigError(f"{field}={folder}: the weights lack {exc} that its config.json implies") from exc
