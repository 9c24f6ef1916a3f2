"""QUANT= of `make export`: the exported folder's linear weights quantized by torchao, through
transformers' TorchAoConfig, and measured against the unquantized export on the run's validation
blocks (mean KL divergence of the next-token distributions, top-1 agreement, bits per byte).

    int8  weight-only int8, one scale per output row (torchao's Int8WeightOnlyConfig); CPU and GPU
    int4  weight-only int4, one scale per group of 128 inputs (fewer where the width is not a multiple
          of 128; IntxWeightOnlyConfig); CPU and GPU.
          torchao keeps each int4 value in a byte on this path, so the file is no smaller than
          int8's: the gain is none until a packed int4 kernel serves it
    fp8   float8 weights and activations, one scale per row (Float8DynamicActivationFloat8WeightConfig);
          only on a GPU of compute capability 8.9 or newer (H100, H200, L4, RTX 40xx)

Only the Transformer blocks' nn.Linear weights are quantized; the token embedding and the output
layer (one matrix when tied) keep the export's dtype, as transformers' TorchAoConfig does by
default. The Llama family only: transformers' GPT-2 computes its projections with Conv1D modules,
which torchao does not quantize, so a quantized GPT-2 folder would hold nothing quantized.
The folder loads with AutoModelForCausalLM.from_pretrained wherever torchao is installed.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from llm import compat
from llm.errors import ConfigError
from llm.model import ModelConfig
from llm.observe.metrics import bits_per_byte

QUANTS = ("int8", "int4", "fp8")
INT4_GROUP = 128  # inputs per int4 scale: the group size GPTQ, AWQ and torchao's int4 use
FP8_CAPABILITY = (8, 9)
# nats per token: a mean KL below this is the rounding of float64 sums over a vocabulary, not a difference
KL_RESOLUTION = 1e-12


def check(quant: str, family: str, field: str) -> None:
    """Refuse, before anything is written, what cannot be quantized here (a known `quant`)."""
    if family != "llama":
        raise ConfigError(
            f"quant={quant}: {field} is a GPT-2, whose transformers class computes its projections with Conv1D, "
            "which torchao does not quantize; export it without QUANT=, or quantize a Llama-family model"
        )
    if quant == "fp8":
        if not torch.cuda.is_available():
            raise ConfigError("quant=fp8: float8 needs a GPU of compute capability 8.9 or newer; use int8 or int4 here")
        capability = torch.cuda.get_device_capability()
        if capability < FP8_CAPABILITY:
            raise ConfigError(
                f"quant=fp8: this GPU has compute capability {capability[0]}.{capability[1]} and float8 needs 8.9 "
                "or newer (H100, H200, L4); use int8 or int4"
            )
    try:
        import_torchao()
    except ImportError:
        raise ConfigError(f"quant={quant}: needs torchao; make install installs it (pip install torchao)") from None


def import_torchao() -> None:
    compat.quiet_torchao()
    import torchao.quantization  # noqa: F401


def int4_group(c: ModelConfig) -> int:
    """INT4_GROUP, or the largest power of two below it that divides every linear layer's inputs."""
    group = INT4_GROUP
    while c.n_embd % group or c.mlp_hidden % group:
        group //= 2
    return group


def torchao_config(quant: str, c: ModelConfig):
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Int8WeightOnlyConfig,
        IntxWeightOnlyConfig,
    )
    from torchao.quantization.granularity import PerGroup, PerRow

    if quant == "int8":
        return Int8WeightOnlyConfig(granularity=PerRow())
    if quant == "int4":
        int4 = torch.int4  # type: ignore[attr-defined]  # in torch, not in its type stubs
        return IntxWeightOnlyConfig(weight_dtype=int4, granularity=PerGroup(int4_group(c)))
    return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())


def load(folder: Path, quant: str | None = None, c: ModelConfig | None = None):
    """A transformers folder as a model in eval mode: as saved, or quantized on loading."""
    from transformers import AutoModelForCausalLM, TorchAoConfig

    if quant and c is None:
        raise ValueError("quantizing on loading needs the model's config")
    options = {"quantization_config": TorchAoConfig(torchao_config(quant, c))} if quant and c else {}
    with contextlib.redirect_stdout(sys.stderr):  # transformers' loading bar is not the command's output
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **options)
    return model.eval()


def quantize(plain: Path, target: Path, quant: str, c: ModelConfig) -> None:
    """The unquantized export in `plain`, quantized into `target`: model.safetensors and config.json
    (which records the quantization, so that loading needs no settings)."""
    model = load(plain, quant, c)
    model.save_pretrained(str(target), safe_serialization=True)


@torch.no_grad()
def compare(plain: Path, target: Path, batches, tokens: int, nbytes: int, quant: str) -> dict:
    """The quantized model against the unquantized one on the same blocks: the mean KL divergence
    KL(p_plain ‖ p_quantized) per token in nats, the share of tokens whose most likely next token
    is the same, and bits per byte of each (tokens and bytes: of the text the blocks are cut from)."""
    device = "cuda" if quant == "fp8" else "cpu"  # float8's matmuls run on a GPU only
    reference, quantized = load(plain).to(device), load(target).to(device)
    kl = agree = loss_plain = loss_quantized = 0.0
    count = 0
    for batch in batches:
        x, y = batch[:, :-1].to(device), batch[:, 1:].to(device).flatten()
        # float64: a KL of 1e-8 is a difference of the order of float32's rounding of the log-probabilities
        p = reference(x).logits.double().log_softmax(-1).flatten(0, 1)
        q = quantized(x).logits.double().log_softmax(-1).flatten(0, 1)
        kl += F.kl_div(q, p, log_target=True, reduction="sum").item()  # sum of p·(log p - log q)
        agree += (p.argmax(-1) == q.argmax(-1)).sum().item()
        loss_plain += F.nll_loss(p, y, reduction="sum").item()
        loss_quantized += F.nll_loss(q, y, reduction="sum").item()
        count += y.numel()
    return {
        "kl": max(kl / count, 0.0),  # a KL is never negative: below 0 is float64's rounding of 0
        "top1_agreement": agree / count,
        "bpb_unquantized": bits_per_byte(loss_plain / count, tokens, nbytes),
        "bpb": bits_per_byte(loss_quantized / count, tokens, nbytes),
        "tokens_compared": count,
    }
