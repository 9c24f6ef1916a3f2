"""What only a GPU shows (`make test-gpu`; skipped with a reason elsewhere): a compiled bf16 run
with torch's fused AdamW, ZeRO-2 and ZeRO-3 on one GPU and the tools on their checkpoints, and no
host synchronisation between logging steps."""

from __future__ import annotations

import json

import pytest

from support import LLAMA, RUN_ENV, callbacks, llm_here, losses, run_llm

pytestmark = pytest.mark.gpu

GPU_RUN = ["--trainer.accelerator=gpu", "--trainer.devices=1", "--trainer.precision=bf16-mixed"]


@pytest.fixture(autouse=True)
def cuda():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device visible")


def train(runs, run, *extra):
    result = run_llm(*runs.args(run, *GPU_RUN, *extra, probes=()), env=RUN_ENV)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return json.loads((run / "summary.json").read_text())


def test_compiled_bf16_run_with_fused_adamw(tmp_path, runs):
    run = tmp_path / "run"
    summary = train(runs, run, "--model.compile=true", "--model.optimizer.fused=true")
    assert summary["precision"] == "bf16-mixed" and summary["compile"] is True
    assert summary["peak_flops_source"] != "" and 0 < summary["tokens_per_second"]
    assert "fused: true" in (run / "config.yaml").read_text()
    curve = losses(run)
    assert curve[max(curve)] < curve[0]


@pytest.mark.parametrize("preset", ["zero2", "zero3"])
def test_zero_on_one_gpu_and_the_tools_on_its_checkpoint(tmp_path, runs, preset):
    run = tmp_path / "run"
    summary = train(runs, run, f"--deepspeed={preset}")
    assert summary["strategy"] == f"deepspeed {preset}" and summary["world_size"] == 1
    ckpt = run / "checkpoints" / "last.ckpt"
    assert (ckpt / "latest").is_file()
    sample = llm_here("sample", f"--ckpt={ckpt}", "--prompt=def ", "--max_new_tokens=8")
    assert sample.returncode == 0 and sample.stdout.startswith("def "), sample.stderr[-2000:]
    evaluation = llm_here("eval", f"--ckpt={ckpt}", "--json=true", "--max_batches=2", "--wandb=false")
    assert evaluation.returncode == 0, evaluation.stderr[-2000:]
    export = llm_here("export", f"--ckpt={ckpt}", f"--out={tmp_path / 'hf'}")
    assert export.returncode == 0 and (tmp_path / "hf" / "model.safetensors").is_file(), export.stderr[-2000:]


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_float8_training_compiled_and_the_quantized_fp8_export(tmp_path, runs, recipe):
    import torch

    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 needs compute capability 8.9 or newer")
    run = tmp_path / "run"
    # wide enough that torchao's filter (layers too small to gain are left alone) converts some
    wide = ["--model.config.n_embd=2048", "--model.config.n_head=16"]
    summary = train(runs, run, f"--model.float8={recipe}", "--model.compile=true", *wide)
    assert summary["float8"].startswith(recipe) and summary["compile"] is True
    assert int(summary["float8"].split(", ")[1].split()[0]) > 0  # "<recipe>, <n> layers"
    curve = losses(run)
    assert curve[max(curve)] < curve[0]
    llama = runs("llama", *LLAMA, "--trainer.max_steps=2", probes=(), here=True)
    out = tmp_path / "fp8"
    export = llm_here("export", f"--ckpt={llama / 'checkpoints' / 'last.ckpt'}", f"--out={out}", "--quant=fp8")
    assert export.returncode == 0 and "top-1 agreement" in export.stdout, export.stderr[-2000:]


def test_no_host_synchronisation_between_logging_steps(tmp_path, runs):
    # what tests/test_host_reads.py proves on a CPU for the reads Python makes, torch's sync debug
    # mode checks on a GPU for every synchronisation, those inside operators included
    run = tmp_path / "run"
    train(runs, run, "--model.compile=true", "--trainer.log_every_n_steps=4", callbacks("NoSyncBetweenLogs"))
