"""Export to and import from Hugging Face transformers: a GPT-2-style and a Llama-style model give
the same logits, greedy text and token ids there as here, and come back with the same weights."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import assert_refused, corpus_fit, run_llm, wandb_records
from llm.checkpoint import load_for_inference
from llm.errors import ConfigError
from llm.generate import generate
from llm.hf import load_pretrained, to_hf
from llm.model import ModelConfig, Transformer

LLAMA = [
    "--model.config.mlp=swiglu",
    "--model.config.norm=rmsnorm",
    "--model.config.position=rope",
    "--model.config.bias=false",
    "--model.config.n_kv_head=1",
    "--model.config.tie_embeddings=false",
]
FAMILIES = {"gpt2": [], "llama": LLAMA}


def fit_args(corpus: Path, run: Path, cache: Path, *extra: str) -> list[str]:
    return corpus_fit(corpus, run, cache, "--trainer.max_steps=2", "--eval_every=2", *extra)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, code_corpus, data_cache):
    """family -> (checkpoint, exported folder), trained 2 steps and exported once."""
    made = {}

    def get(name: str):
        if name not in made:
            root = tmp_path_factory.mktemp(name)
            result = run_llm(*fit_args(code_corpus, root / "run", data_cache, *FAMILIES[name]))
            assert result.returncode == 0, result.stderr[-3000:]
            ckpt, out = root / "run" / "checkpoints" / "last.ckpt", root / "hf"
            result = run_llm("export", f"--ckpt={ckpt}", f"--out={out}")
            assert result.returncode == 0, result.stderr[-3000:]
            made[name] = ckpt, out
        return made[name]

    return get


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_transformers_loads_the_export_and_computes_the_same(exported, name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt, out = exported(name)
    ours = load_for_inference(ckpt)
    theirs = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(theirs).__name__ == {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}[name]
    idx = torch.randint(0, ours.tokenizer.get_vocab_size(), (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(idx).logits, ours.model(idx), rtol=0, atol=1e-4)
    prompt = idx[:1, :8]
    mine = generate(ours.model, prompt, 20, temperature=0)
    hf = theirs.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=ours.eot_id)
    assert hf.tolist() == mine.tolist()

    tokenizer = AutoTokenizer.from_pretrained(out)
    text = "def parse(self, data):\n    return json.loads(data)  # a comment\n"
    assert tokenizer(text)["input_ids"] == ours.tokenizer.encode(text).ids
    assert {p.name for p in out.iterdir()} >= {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "README.md",
    }
    card = (out / "README.md").read_text()
    assert "tokens trained | 1,024 (2 optimizer steps of 512 tokens)" in card and "python -m llm fit" in card


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_import_gives_back_the_same_weights_and_trains_from_them(exported, name, tmp_path, code_corpus, data_cache):
    ckpt, out = exported(name)
    config, state = load_pretrained(out)
    ours = load_for_inference(ckpt)
    # the same architecture: Llama's config.json spells out the MLP width this config derives
    assert replace(config, intermediate_size=None) == replace(ours.model.config, intermediate_size=None)
    assert config.mlp_hidden == ours.model.config.mlp_hidden
    for key, value in ours.model.state_dict().items():
        assert torch.equal(state[key], value), key
    run = tmp_path / "run"
    result = run_llm(*fit_args(code_corpus, run, data_cache, f"--model.init={out}", "--model.config.n_layer=7"))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["params"] == sum(
        v.numel() for k, v in state.items() if k != "lm_head.weight" or not config.tie_embeddings
    )


def test_bf16_export_halves_the_weights(exported, tmp_path):
    ckpt, out = exported("gpt2")
    half = tmp_path / "bf16"
    assert run_llm("export", f"--ckpt={ckpt}", f"--out={half}", "--dtype=bf16").returncode == 0
    size = (half / "model.safetensors").stat().st_size
    assert size < 0.55 * (out / "model.safetensors").stat().st_size
    assert json.loads((half / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_export_bad_inputs(exported, tmp_path):
    ckpt, out = exported("gpt2")
    assert_refused(run_llm("export", f"--ckpt={tmp_path}/none.ckpt", f"--out={tmp_path}/x"), "no such checkpoint")
    before = (out / "model.safetensors").stat().st_mtime_ns
    assert_refused(
        run_llm("export", f"--ckpt={ckpt}", f"--out={out}"), f"out={out}: exists and is not empty", "FORCE=1"
    )
    assert (out / "model.safetensors").stat().st_mtime_ns == before
    assert run_llm("export", f"--ckpt={ckpt}", f"--out={out}", "--force=true").returncode == 0


def test_a_model_neither_family_expresses_is_not_exported(tmp_path, code_corpus, data_cache):
    run = tmp_path / "run"
    odd = ["--model.config.norm=rmsnorm"]  # learned positions (GPT-2) with RMSNorm (Llama)
    assert run_llm(*fit_args(code_corpus, run, data_cache, *odd)).returncode == 0
    out = tmp_path / "hf"
    result = run_llm("export", f"--ckpt={run}/checkpoints/last.ckpt", f"--out={out}")
    assert_refused(result, "model.config.norm=rmsnorm with position=learned is neither GPT-2 nor Llama")
    assert not out.exists()


def test_init_from_an_unsupported_family(tmp_path, code_corpus, data_cache):
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 30522}))
    result = run_llm(*fit_args(code_corpus, tmp_path / "run", data_cache, f"--model.init={folder}"))
    assert_refused(result, f"model.init={folder}: model_type=bert in config.json; only gpt2 and llama")


# --- make eval --------------------------------------------------------------------------------------


def metrics_rows(run: Path) -> dict[int, dict]:
    import csv

    with open(run / "metrics.csv", newline="") as f:
        return {int(r["step"]): r for r in csv.DictReader(f)}


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory, code_corpus, data_cache):
    run = tmp_path_factory.mktemp("eval") / "run"
    result = run_llm(*fit_args(code_corpus, run, data_cache, "--trainer.max_steps=4", "--trainer.log_every_n_steps=1"))
    assert result.returncode == 0, result.stderr[-3000:]
    return run


def eval_json(*args: str) -> dict:
    result = run_llm("eval", *args, "--json=true")
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_eval_over_the_runs_blocks_reports_the_loss_the_run_logged(evaluated_run):
    ckpt = evaluated_run / "checkpoints" / "last.ckpt"
    logged = float(metrics_rows(evaluated_run)[3]["val/loss"])  # the validation after step 4
    result = eval_json(f"--ckpt={ckpt}", "--blocks=run")
    assert result["step"] == 4 and result["loss"] == pytest.approx(logged, abs=1e-4)
    assert result["evaluated"] == "the run's 16 validation blocks (those of its val/loss)"
    whole = eval_json(f"--ckpt={ckpt}", "--wandb=false")
    assert whole["evaluated"].startswith("the whole validation split, ") and whole["tokens_evaluated"] > 16 * 64
    # the run's W&B run got the result, and so did a W&B run of job_type eval in its group
    records = b"".join(p.read_bytes() for p in (evaluated_run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert b"eval/loss" in records
    (eval_run,) = (evaluated_run / "eval" / "wandb").glob("offline-run-*")
    eval_records = wandb_records(eval_run)
    (header,) = [r["run"] for r in eval_records if r["type"] == "run"]
    assert header["job_type"] == "eval" and header["run_group"] == "default"
    assert header["display_name"] == f"{evaluated_run.name}-eval-step4"
    summary = {}
    for r in eval_records:
        if r["type"] == "summary":
            summary.update(r["summary"]["update"])
    assert summary["eval/loss"] == pytest.approx(result["loss"]) and summary["eval/step"] == 4


def test_eval_on_any_text_reports_bits_per_byte_from_its_counts(evaluated_run, tmp_path):
    import math

    text = tmp_path / "notes.txt"
    text.write_text("def greet(name):\n    return f'hello {name}'\n" * 300 + "é ü\n")
    result = eval_json(f"--ckpt={evaluated_run}/checkpoints/last.ckpt", f"--text={text}", "--wandb=false")
    ours = load_for_inference(evaluated_run / "checkpoints" / "last.ckpt")
    assert result["bytes"] == len(text.read_bytes())
    assert result["tokens"] == len(ours.tokenizer.encode(text.read_text()).ids) + 1  # and its end-of-text
    assert result["bpb"] == pytest.approx(result["loss"] * result["tokens"] / (result["bytes"] * math.log(2)))
    assert result["evaluated"] == f"text={text} (1 file(s))" or result["evaluated"].startswith("text=")
    assert result["tokens_evaluated"] == (result["tokens"] - 1) // 64 * 64


def test_eval_of_a_checkpoint_that_does_not_exist(tmp_path):
    assert_refused(run_llm("eval", f"--ckpt={tmp_path}/none.ckpt"), f"ckpt={tmp_path}/none.ckpt: no such checkpoint")


def test_eval_on_a_dataset_through_the_hub_loading_path(evaluated_run, tmp_path):
    folder = tmp_path / "dataset"  # a local folder goes through the same datasets.load_dataset call as the Hub
    folder.mkdir()
    rows = [{"text": f"def f{i}(x):\n    return x * {i}\n"} for i in range(50)]
    (folder / "part.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ckpt = f"--ckpt={evaluated_run}/checkpoints/last.ckpt"
    result = eval_json(ckpt, f"--hf={folder}", "--hf_split=train", "--wandb=false")
    assert result["evaluated"] == "hf=dataset (train)" and result["bytes"] == sum(len(r["text"]) for r in rows)
    assert result["tokens"] == sum(len(load_for_inference(ckpt[7:]).tokenizer.encode(r["text"]).ids) + 1 for r in rows)


def test_a_weight_the_map_does_not_know_is_refused_not_dropped():
    # an option a fork added (docs/extending.md's QK-norm) makes weights GPT-2 has no place for
    config = ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)
    state = Transformer(config).state_dict()
    assert len(to_hf(state, config)) == len(state) - 1  # everything but the tied lm_head copy
    state["blocks.1.attn.q_norm.weight"] = torch.ones(16)
    with pytest.raises(ConfigError, match=r"ckpt=x: 1 weights \(blocks.1.attn.q_norm.weight\) have no place"):
        to_hf(state, config, "ckpt=x")
