"""`make export`: a checkpoint as a Hugging Face transformers folder (the mapping is llm/hf.py)."""

from __future__ import annotations

import csv
import os
import shutil
import tempfile
from pathlib import Path

import torch

from llm.checkpointing.files import Checkpoint, Loaded, choose_checkpoint
from llm.config import RunConfig
from llm.data.tokenizer import EOT
from llm.errors import ConfigError
from llm.hf import family, hf_config, to_hf
from llm.model import ModelConfig, count_params
from llm.tools import quantize
from llm.tools.evaluate import validation_blocks


def export(ckpt: str, out: str = "", dtype: str = "fp32", force: bool = False, quant: str | None = None) -> None:
    """A transformers folder from a checkpoint: config.json, model.safetensors, the tokenizer,
    generation_config.json and a model card (README.md). AutoModelForCausalLM and AutoTokenizer load
    it with no code of this project.

    Args:
        ckpt: a checkpoint file or DeepSpeed folder, or a run folder: its newest (CKPT=)
        out: the folder to write (OUT=); an existing folder must be empty unless force
        dtype: fp32 or bf16, the weights' type in model.safetensors
        force: write into an existing, non-empty folder (FORCE=1)
        quant: int8, int4 or fp8 (QUANT=): the Transformer blocks' linear weights quantized by torchao,
            measured against the unquantized export on the run's validation blocks (llm/tools/quantize.py)
    """
    if dtype not in ("fp32", "bf16"):
        raise ConfigError(f"dtype={dtype}: use fp32 or bf16")
    if not out:
        raise ConfigError("out=: give the folder to write, e.g. OUT=runs/<name>/hf")
    target = Path(out)
    if target.exists() and not target.is_dir():
        raise ConfigError(f"out={out}: is a file, and a transformers model is a folder; choose a folder")
    if target.exists() and any(target.iterdir()) and not force:
        raise ConfigError(f"out={out}: exists and is not empty; choose another folder, or FORCE=1 to write into it")
    if quant is not None and quant not in quantize.QUANTS:
        raise ConfigError(f"quant={quant}: unknown; use int8, int4 or fp8")
    checkpoint = Checkpoint(choose_checkpoint(ckpt))
    whole = checkpoint.read()  # once: a ZeRO folder is consolidated to fp32 on reading
    loaded = Loaded.from_contents(whole)
    c = loaded.model.config
    name = family(c, field=f"ckpt={ckpt}")  # refuses before anything is written
    if quant is None:
        architecture = write_folder(target, loaded, dtype, f"ckpt={ckpt}")
        (target / "README.md").write_text(model_card(whole, c, architecture, dtype, run_dir=checkpoint.run_folder))
        print(f"wrote {target} ({architecture}, {dtype})")
        return
    quantize.check(quant, name, f"ckpt={ckpt}")
    # the blocks it is measured on, found before anything is written: data that is gone is one line.
    # A checkpoint's data paths are followed only inside its run folder (as make eval does)
    run_dir = checkpoint.run_folder
    blocks = validation_blocks(loaded, "run", 4, ckpt, run_dir) if run_dir else None
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".unquantized-", dir=target) as folder:
        plain = Path(folder)  # the unquantized export: what is quantized, and what it is measured against
        architecture = write_folder(plain, loaded, dtype, f"ckpt={ckpt}")
        quantize.quantize(plain, target, quant, c)
        as_umask_allows(target / "model.safetensors")
        for file in plain.iterdir():  # the tokenizer and generation settings, as the unquantized export has them
            if file.name not in ("model.safetensors", "config.json"):
                shutil.copy(file, target / file.name)
        measured = measure(plain, target, quant, blocks)
    (target / "README.md").write_text(model_card(whole, c, architecture, dtype, measured, run_dir))
    print(f"wrote {target} ({architecture}, {dtype}, {quant} by torchao)")
    print(quantized_lines(measured))


def write_folder(target: Path, loaded: Loaded, dtype: str, field: str) -> str:
    """The weights, config, tokenizer and generation settings; the architecture's class name."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    c = loaded.model.config
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    tensors = {k: v.to(torch_dtype) for k, v in to_hf(loaded.model.state_dict(), c, field).items()}
    target.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    as_umask_allows(target / "model.safetensors")
    config = hf_config(c, loaded.eot_id, {"fp32": "float32", "bf16": "bfloat16"}[dtype])
    config.save_pretrained(str(target))
    eot = loaded.data_meta.get("eot_token", EOT)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=loaded.tokenizer, eos_token=eot, bos_token=eot, pad_token=eot)
    tokenizer.model_max_length = c.block_size
    tokenizer.save_pretrained(str(target))
    GenerationConfig(
        bos_token_id=loaded.eot_id, eos_token_id=loaded.eot_id, pad_token_id=loaded.eot_id
    ).save_pretrained(str(target))
    return config.architectures[0]


def as_umask_allows(path: Path) -> None:
    """The weights file gets the permissions of the folder's other files (safetensors and
    transformers write it private, through a temporary file)."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def measure(plain: Path, target: Path, quant: str, blocks: tuple | None) -> dict:
    """The quantized model against the unquantized one on the blocks its run validated on
    (evaluate.validation_blocks); only the sizes without them."""
    sizes = {"quant": quant, "bytes": file_bytes(target), "bytes_unquantized": file_bytes(plain)}
    if blocks is None:
        return sizes
    what, batches, counts = blocks
    return {**sizes, **quantize.compare(plain, target, batches, counts.tokens, counts.bytes, quant), "evaluated": what}


def file_bytes(folder: Path) -> int:
    return (folder / "model.safetensors").stat().st_size


def quantized_lines(m: dict) -> str:
    lines = [f"size: {m['bytes'] / 2**20:.2f} MiB, {m['bytes'] / m['bytes_unquantized']:.2f} of the unquantized"]
    if "kl" in m:
        lines += [
            f"against the unquantized export on {m['evaluated']} ({m['tokens_compared']:,} tokens):",
            f"  mean KL divergence {kl_text(m['kl'])} nats per token, top-1 agreement {m['top1_agreement']:.2%}",
            f"  bits per byte {m['bpb_unquantized']:.4f} -> {m['bpb']:.4f}",
        ]
    else:
        lines.append("not measured against the unquantized export: the checkpoint lies outside a run folder")
    return "\n".join(lines)


def kl_text(kl: float) -> str:
    """A KL as measured, or "below" the resolution of its float64 sums (rounding, not a measurement)."""
    return f"below {quantize.KL_RESOLUTION:.0e}" if kl < quantize.KL_RESOLUTION else f"{kl:.3g}"


def validation_of(ckpt: dict, run_dir: Path | None) -> tuple[int, float] | None:
    """(step, validation loss) of the checkpoint exported: its own step's, from the metrics.csv of the
    run folder it lies in (a checkpoint is written before the validation of its step), else the
    latest validation it recorded itself; None where neither has one."""
    step = ckpt.get("global_step", 0)
    metrics = run_dir / "metrics.csv" if run_dir else None
    if metrics and metrics.is_file():
        with open(metrics, newline="") as f:
            for row in csv.DictReader(f):
                if row.get("step") == str(step) and row.get("val/loss"):
                    return step, float(row["val/loss"])
    recorded = ckpt.get("validation")  # train.callbacks.RunInfo
    return (recorded["step"], recorded["loss"]) if recorded else None


def model_card(
    ckpt: dict,
    c: ModelConfig,
    architecture: str,
    dtype: str,
    quantized: dict | None = None,
    run_dir: Path | None = None,
) -> str:
    run = RunConfig.from_checkpoint(ckpt)
    world = ckpt.get("world_size") or 1
    per_step = run.trainer.accumulate_grad_batches * run.loader.batch_size * c.block_size * world
    step = ckpt.get("global_step", 0)
    validated = validation_of(ckpt, run_dir)
    if validated is None:
        val = "not recorded"
    elif validated[0] == step:
        val = f"{validated[1]:.4f} nats per token, at this checkpoint's step"
    else:
        val = f"{validated[1]:.4f} nats per token, at step {validated[0]:,} (the latest validation before it)"
    shape = f"{c.n_layer} layers, {c.n_head} heads ({c.kv_heads} key/value), width {c.n_embd}, MLP {c.mlp_hidden}"
    weights = f"model.safetensors, {dtype}"
    if quantized:
        weights += (
            f"; the blocks' linear weights {quantized['quant']} (torchao, loads where torchao is installed), "
            f"the embedding and output layer {dtype}"
        )
    measured = "\n".join(f"    {line}" for line in quantized_lines(quantized).splitlines()) if quantized else ""
    measured = f"\nQuantization, as measured at export:\n\n{measured}\n" if quantized else ""
    return f"""# {Path(run.options.run or "model").name}

A decoder-only Transformer pretrained with this project's template, exported as `{architecture}`.

| | |
|---|---|
| architecture | {architecture}: {shape} |
| context | {c.block_size} tokens |
| vocabulary | {c.vocab_size} |
| parameters | {count_params(c):,} |
| tokens trained | {step * per_step:,} ({step:,} optimizer steps of {per_step:,} tokens) |
| validation loss | {val} |
| weights | {weights} |
| trained with | `{ckpt.get("command") or "not recorded"}` |
{measured}
```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model, tokenizer = AutoModelForCausalLM.from_pretrained("."), AutoTokenizer.from_pretrained(".")
print(tokenizer.decode(model.generate(**tokenizer("def ", return_tensors="pt"), max_new_tokens=40)[0]))
```
"""
