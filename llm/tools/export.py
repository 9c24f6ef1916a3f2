"""`make export`: a checkpoint as a Hugging Face transformers folder (the mapping is llm/hf.py)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llm.checkpoint import Checkpoint, Loaded
from llm.config import RunConfig
from llm.data.tokenizer import EOT
from llm.errors import ConfigError
from llm.hf import family, hf_config, to_hf
from llm.model import ModelConfig, count_params


def export(ckpt: str, out: str = "", dtype: str = "fp32", force: bool = False) -> None:
    """A transformers folder from a checkpoint: config.json, model.safetensors, the tokenizer,
    generation_config.json and a model card (README.md). AutoModelForCausalLM and AutoTokenizer load
    it with no code of this project.

    Args:
        ckpt: a checkpoint file or DeepSpeed folder (CKPT=)
        out: the folder to write (OUT=); an existing folder must be empty unless force
        dtype: fp32 or bf16, the weights' type in model.safetensors
        force: write into an existing, non-empty folder (FORCE=1)
    """
    from safetensors.torch import save_file
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    if dtype not in ("fp32", "bf16"):
        raise ConfigError(f"dtype={dtype}: use fp32 or bf16")
    if not out:
        raise ConfigError("out=: give the folder to write, e.g. OUT=runs/<name>/hf")
    target = Path(out)
    if target.exists() and not target.is_dir():
        raise ConfigError(f"out={out}: is a file, and a transformers model is a folder; choose a folder")
    if target.exists() and any(target.iterdir()) and not force:
        raise ConfigError(f"out={out}: exists and is not empty; choose another folder, or FORCE=1 to write into it")
    whole = Checkpoint(ckpt).read()  # once: a ZeRO folder is consolidated to fp32 on reading
    loaded = Loaded.from_contents(whole)
    c = loaded.model.config
    family(c, field=f"ckpt={ckpt}")  # refuses before anything is written
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    tensors = {k: v.to(torch_dtype) for k, v in to_hf(loaded.model.state_dict(), c, f"ckpt={ckpt}").items()}
    target.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    config = hf_config(c, loaded.eot_id, {"fp32": "float32", "bf16": "bfloat16"}[dtype])
    config.save_pretrained(str(target))
    eot = loaded.data_meta.get("eot_token", EOT)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=loaded.tokenizer, eos_token=eot, bos_token=eot, pad_token=eot)
    tokenizer.model_max_length = c.block_size
    tokenizer.save_pretrained(str(target))
    GenerationConfig(
        bos_token_id=loaded.eot_id, eos_token_id=loaded.eot_id, pad_token_id=loaded.eot_id
    ).save_pretrained(str(target))
    (target / "README.md").write_text(model_card(whole, c, config.architectures[0], dtype))
    print(f"wrote {target} ({config.architectures[0]}, {dtype})")


def model_card(ckpt: dict, c: ModelConfig, architecture: str, dtype: str) -> str:
    run = RunConfig.from_checkpoint(ckpt)
    world = ckpt.get("world_size") or 1
    per_step = run.trainer.accumulate_grad_batches * run.loader.batch_size * c.block_size * world
    step = ckpt.get("global_step", 0)
    summary = Path(run.options.run or ".") / "summary.json"
    val = json.loads(summary.read_text()).get("final_val_loss") if summary.is_file() else None
    shape = f"{c.n_layer} layers, {c.n_head} heads ({c.kv_heads} key/value), width {c.n_embd}, MLP {c.mlp_hidden}"
    return f"""# {Path(run.options.run or "model").name}

A decoder-only Transformer pretrained with this project's template, exported as `{architecture}`.

| | |
|---|---|
| architecture | {architecture}: {shape} |
| context | {c.block_size} tokens |
| vocabulary | {c.vocab_size} |
| parameters | {count_params(c):,} |
| tokens trained | {step * per_step:,} ({step:,} optimizer steps of {per_step:,} tokens) |
| final validation loss | {f"{val:.4f} nats per token" if val is not None else "not recorded"} |
| weights | model.safetensors, {dtype} |
| trained with | `{ckpt.get("command") or "not recorded"}` |

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model, tokenizer = AutoModelForCausalLM.from_pretrained("."), AutoTokenizer.from_pretrained(".")
print(tokenizer.decode(model.generate(**tokenizer("def ", return_tensors="pt"), max_new_tokens=40)[0]))
```
"""
