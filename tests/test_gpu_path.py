"""What a GPU run uses, tested on the CPU: torch's fused AdamW under bf16 autocast with gradient
clipping, torch.compile (plain and through the recipes), and the peak FLOP/s that MFU divides by,
from a table keyed by device names that are mocked here."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from llm.checkpointing.files import Checkpoint
from llm.config import LoaderConfig, OptimizerConfig, PrepareConfig, RunConfig, RunOptions, TrainerConfig
from llm.errors import ConfigError
from llm.model import ModelConfig
from llm.observe import peaks
from llm.observe.peaks import find_peak, table_peak
from llm.preflight import resolve
from llm.tools.plan import PlanData, PlanModel, PlanTrainer, plan_main
from llm.train.optim import plain_cuda_arch_list
from support import REPO, STEPS, TINY, column, llm_here, losses, run_llm

CLIP_PROBE = '--trainer.callbacks=[{"class_path": "tests.helpers.ClipProbe"}]'


def fit_args(corpus: Path, run: Path, cache: Path, *extra: str, config: str = "default") -> list[str]:
    return [
        "fit",
        "--config",
        f"configs/experiment/{config}.yaml",
        *TINY,
        f"--data.text={corpus}",
        "--data.vocab_size=512",
        f"--data.cache_dir={cache}",
        f"--run={run}",
        "--trainer.log_every_n_steps=1",
        *extra,
    ]


def grad_norms(run: Path) -> list[float]:
    return [column(run, "train/grad_norm")[s] for s in sorted(column(run, "train/grad_norm"))]


# --- bug 1: fused AdamW + bf16-mixed + clipping stopped at the first step ---------------------------


@pytest.mark.slow
def test_fused_adamw_with_bf16_autocast_clips_and_trains(tmp_path, code_corpus, data_cache):
    run = tmp_path / "run"
    clip = 0.05  # below the gradient norms of this model, so every step is clipped
    result = llm_here(
        *fit_args(code_corpus, run, data_cache, "--trainer.max_steps=4", "--eval_every=2"),
        "--trainer.precision=bf16-mixed",
        "--model.optimizer.fused=true",
        f"--trainer.gradient_clip_val={clip}",
        CLIP_PROBE,
        env={"WANDB_MODE": "disabled"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    probe = json.loads((run / "clip-probe.json").read_text())
    assert probe["fused"], "the optimizer is not torch's fused AdamW"
    before = grad_norms(run)  # logged before clipping
    assert len(before) == len(probe["norms_at_step"]) == 4 and min(before) > clip
    for norm in probe["norms_at_step"]:
        assert norm == pytest.approx(clip, rel=1e-3), "the step saw gradients that were not clipped"
    train = losses(run)
    assert all(torch.isfinite(torch.tensor(v)) for v in train.values()) and train[4] < train[1]
    config = (run / "config.yaml").read_text()
    assert "fused: true" in config and "precision: bf16-mixed" in config


def speed_options(on_gpu: bool, precision: str, fused=None, compile=None) -> RunConfig:
    """A resolved run's compile and fused AdamW, from a config that leaves them (None) or sets them."""
    run = RunConfig(
        model=ModelConfig(),
        optimizer=OptimizerConfig(fused=fused),
        data=PrepareConfig(),
        loader=LoaderConfig(),
        trainer=TrainerConfig(precision=precision),
        options=RunOptions(),
        compile=compile,
    )
    return resolve.with_speed_options(run, on_gpu)


def test_fused_adamw_with_fp16_and_clipping_is_refused_in_one_line():
    run = RunConfig(
        model=ModelConfig(),
        optimizer=OptimizerConfig(fused=True),
        data=PrepareConfig(),
        loader=LoaderConfig(),
        trainer=TrainerConfig(precision="16-mixed", gradient_clip_val=1.0),
        options=RunOptions(),
    )
    with pytest.raises(ConfigError, match="model.optimizer.fused=true.*16-mixed"):
        resolve.check_fused(run)
    resolve.check_fused(dataclasses.replace(run, trainer=TrainerConfig(precision="16-mixed")))  # no clipping: fine
    resolve.check_fused(dataclasses.replace(run, options=RunOptions(deepspeed="zero2")))  # DeepSpeed clips itself


@pytest.mark.parametrize(
    "on_gpu, precision, compile, fused",
    [(True, "bf16-mixed", True, True), (True, "16-mixed", True, False), (False, "32-true", False, False)],
)
def test_compile_and_fused_adamw_default_on_with_a_gpu_only(on_gpu, precision, compile, fused):
    run = speed_options(on_gpu, precision)
    assert run.compile is compile and run.optimizer.fused is fused
    explicit = speed_options(on_gpu, precision, fused=False, compile=False)
    assert explicit.compile is False and explicit.optimizer.fused is False


def test_cuda_arch_suffixes_that_deepspeeds_op_builder_cannot_parse_are_dropped(monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0a+PTX 10.0f")
    plain_cuda_arch_list()
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0+PTX 10.0"


# --- bug 2: the peak FLOP/s of MFU --------------------------------------------------------------------


@contextlib.contextmanager
def matmul_precision(precision: str):
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize(
    "name, dtype, expected",
    [
        ("NVIDIA H200", torch.bfloat16, 989.4e12),
        ("NVIDIA H200 NVL", torch.bfloat16, 835.5e12),
        ("NVIDIA GH200 480GB", torch.bfloat16, 989.4e12),
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.4e12),
        ("NVIDIA H100 PCIe", torch.float16, 756e12),
        ("NVIDIA H100 NVL", torch.bfloat16, 835.5e12),
        ("NVIDIA B200", torch.bfloat16, 2250e12),
        ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312e12),
        ("NVIDIA A100 80GB PCIe", torch.float32, 156e12),  # tf32: float32 matmuls at "high" precision
        ("NVIDIA A10G", torch.bfloat16, 70e12),
        ("NVIDIA A10", torch.bfloat16, 125e12),
        ("NVIDIA L4", torch.bfloat16, 121e12),
        ("NVIDIA L40S", torch.bfloat16, 362.05e12),
        ("NVIDIA GeForce RTX 4090", torch.bfloat16, 165.2e12),
        ("NVIDIA GeForce RTX 3090", torch.bfloat16, 71e12),
    ],
)
def test_datasheet_peak_of_each_gpu(name, dtype, expected):
    with matmul_precision("high"):  # as `python -m llm fit` sets it
        peak = table_peak(name, dtype)
    assert peak is not None and peak.flops == pytest.approx(expected)
    assert "datasheet" in peak.source


def test_full_fp32_matmuls_use_the_fp32_peak():
    with matmul_precision("highest"):
        assert table_peak("NVIDIA H100 80GB HBM3", torch.float32).flops == pytest.approx(66.9e12)


def test_a_gpu_in_no_table_is_measured_on_that_gpu_never_the_cpu(monkeypatch):
    measured = []
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA Imaginary X1")
    monkeypatch.setattr(peaks, "measure_matmul_peak", lambda device, dtype: measured.append(device) or 123e12)
    peak = find_peak(torch.device("cuda", 0), torch.bfloat16)
    assert measured == [torch.device("cuda", 0)]
    assert peak.flops == 123e12 and "NVIDIA Imaginary X1, measured bfloat16 matmul" == peak.source


def test_h200_takes_the_projects_table_before_lightnings(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(peaks, "measure_matmul_peak", lambda device, dtype: pytest.fail("measured a listed GPU"))
    peak = find_peak(torch.device("cuda", 0), torch.bfloat16)
    assert peak.flops == 989.4e12 and peak.describe() == "989.4 TFLOP/s (H200 SXM datasheet, dense bf16)"


def test_an_override_wins_over_everything():
    peak = find_peak(torch.device("cpu"), torch.float32, override=5e12)
    assert peak.flops == 5e12 and peak.source == "--peak_flops"


# --- torch.compile ------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.long  # a compile on a cold cache (a fresh clone's) costs about a minute on a CPU
def test_compiled_training_matches_eager_and_keeps_checkpoint_keys(runs):
    eager, compiled = runs("single"), runs("single", "--model.compile=true", probes=())
    assert "compile: on" in (compiled / "stdout.txt").read_text()
    expected, got = losses(eager), losses(compiled)
    assert sorted(got) == sorted(expected) == list(range(1, STEPS + 1))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=1e-5), f"step {step}"
    summary = json.loads((compiled / "summary.json").read_text())
    assert summary["compile"] is True and summary["compile_seconds"] > 0
    assert json.loads((eager / "summary.json").read_text())["compile_seconds"] == 0
    keys = {run: set(Checkpoint(run / "checkpoints" / "last.ckpt").read()["state_dict"]) for run in (eager, compiled)}
    assert keys[compiled] == keys[eager] and not any("_orig_mod" in k for k in keys[compiled])
    ckpt = compiled / "checkpoints" / "last.ckpt"
    sample = llm_here("sample", f"--ckpt={ckpt}", "--prompt=def ", "--max_new_tokens=8")
    assert sample.returncode == 0 and sample.stdout.startswith("def "), sample.stderr[-2000:]
    evaluation = llm_here("eval", f"--ckpt={ckpt}", "--json=true", "--max_batches=2", "--wandb=false")
    assert evaluation.returncode == 0, evaluation.stderr[-2000:]
    assert json.loads(evaluation.stdout.strip().splitlines()[-1])["step"] == STEPS


# --- the recipes for real runs ------------------------------------------------------------------------

# each recipe at the size of a smoke test: what stays is its optimizer, schedule shape, precision,
# compile and clipping
SMALL = [
    "--model.config.n_layer=2",
    "--model.config.n_head=2",
    "--model.config.n_kv_head=null",
    "--model.config.n_embd=64",
    "--model.config.block_size=64",
    "--model.config.intermediate_size=null",
    "--model.config.vocab_size=null",
    "--data.batch_size=4",
    "--data.val_batches=2",
    "--data.num_workers=0",
    "--data.vocab_size=512",
    "--trainer.max_steps=2",
    "--tokens_per_step=512",  # the recipe's tokens per step at this size: an accumulation of 2 derived
    "--trainer.devices=1",
    "--trainer.log_every_n_steps=1",
    "--model.optimizer.warmup_steps=1",
    "--eval_every=1",
]


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.parametrize("recipe", ["gpt2-124m", "llama-1b"])
def test_recipe_trains_two_steps_at_smoke_size(recipe, tmp_path, code_corpus, data_cache):
    run = tmp_path / "run"
    extra = ["--model.optimizer.fused=true"] if recipe == "gpt2-124m" else ["--model.compile=false"]
    # compiled in a process of its own (Dynamo's caches would outlive the run here); the other in this one
    result = (run_llm if recipe == "gpt2-124m" else llm_here)(
        "fit",
        "--config",
        "configs/experiment/default.yaml",  # a recipe states what differs from it, as make applies them
        "--config",
        f"configs/experiment/{recipe}.yaml",
        *SMALL,
        f"--data.text={code_corpus}",
        f"--data.cache_dir={data_cache}",
        f"--run={run}",
        *extra,
        env={"WANDB_MODE": "disabled"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["precision"] == "bf16-mixed"
    assert summary["tokens"] == 2 * 2 * 4 * 64  # steps x accumulation x batch x block
    lr = {"gpt2-124m": 6e-4, "llama-1b": 4e-4}[recipe]
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["optimizer"]["lr"] == lr and config["experiment"] == recipe
    assert summary["compile"] is (recipe == "gpt2-124m")


@pytest.mark.parametrize("recipe", ["gpt2-124m", "llama-1b"])
def test_recipe_is_the_experiment_make_picks_for_its_model(recipe):

    dry = subprocess.run(["make", "-n", "train", f"MODEL={recipe}"], cwd=REPO, capture_output=True, text=True)
    assert f"--config 'configs/experiment/default.yaml' --config 'configs/experiment/{recipe}.yaml'" in dry.stdout
    other = subprocess.run(["make", "-n", "train", "MODEL=gpt2-350m"], cwd=REPO, capture_output=True, text=True)
    assert "--config 'configs/experiment/default.yaml' " in other.stdout and other.stdout.count("--config") == 1


def test_llama_recipe_uses_what_make_plan_recommends_for_8_gpus_of_80_gb():
    recipe = yaml.safe_load((REPO / "configs/experiment/llama-1b.yaml").read_text())
    result = plan_main(
        model=PlanModel("llama-1b", recipe["model"].get("activation_checkpointing", False)),  # false: the default's
        data=PlanData(recipe["data"]["batch_size"]),
        trainer=PlanTrainer(recipe["trainer"]["devices"]),
        memory_gib=80,
        json=True,
    )
    assert (recipe.get("deepspeed") or "ddp") == result["recommended"]
