"""The memory planner against the ZeRO paper's formulas, DeepSpeed's estimators and hand arithmetic."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from llm.model import ModelConfig, count_params
from llm.preflight.planner import OVERHEAD_BYTES, GiB, activation_bytes, largest_layer_params, plan, recommend
from llm.tools.plan import load_model_config
from support import REPO, assert_refused, llm_here, program_stderr


@pytest.fixture(scope="module")
def gpt2():
    config = load_model_config("gpt2-124m")
    return config, count_params(config)


def by_preset(rows):
    return {row.preset: row for row in rows}


@pytest.mark.parametrize("gpus, nnodes", [(1, 1), (8, 1), (8, 4)])
def test_model_states_follow_the_zero_paper(gpt2, gpus, nnodes):
    config, psi = gpt2
    n = gpus * nnodes
    rows = by_preset(plan(config, gpus, nnodes, gpu_mem=80))
    expected = {
        "ddp": 16 * psi,
        "zero1": 4 * psi + 12 * psi / n,
        "zero2": 2 * psi + 14 * psi / n,
        "zero3": 16 * psi / n,
    }
    for preset, nbytes in expected.items():
        assert rows[preset].model_states_gib * GiB == pytest.approx(nbytes, rel=1e-12)
    assert rows["ddp"].model_states_gib * GiB == 16 * 124_475_904  # 16 bytes per parameter


def test_offload_rows_follow_deepspeeds_estimates(gpt2):
    config, psi = gpt2
    assert psi == 124_475_904  # GPT-2 small with its vocabulary padded to 50,304
    rows = by_preset(plan(config, 4, 2, gpu_mem=80))
    largest = largest_layer_params(config)
    assert largest == 50304 * 768  # the (tied) embedding
    # DeepSpeed's estimators, written out (deepspeed/runtime/zero/stage_1_and_2.py and stage3.py, with
    # their buffer factor 1.5), for 4 GPUs on each of 2 nodes:
    # ZeRO-2 + optimizer offload: 2Ψ per GPU; Ψ x max(4 x 8 GPUs, 16) x 1.5 per node
    zero2 = rows["zero2_offload"]
    assert (zero2.model_states_gib * GiB, zero2.cpu_per_node_gib * GiB) == (2 * psi, psi * 48)
    assert (2 * psi, psi * 48) == (248_951_808, 5_974_843_392)
    # ZeRO-3 + parameter offload: the largest layer in fp32 per GPU; Ψ x 18 / 2 nodes x 1.5 per node
    zero3 = rows["zero3_offload"]
    assert (zero3.model_states_gib * GiB, zero3.cpu_per_node_gib * GiB) == (4 * largest, psi * 13.5)
    assert (4 * largest, psi * 13.5) == (154_533_888, 1_680_424_704)
    assert rows["zero3_nvme"].nvme_per_node_gib * GiB == psi * 13.5 and rows["zero3_nvme"].cpu_per_node_gib == 0
    # the estimators themselves agree with what is written out here (they are where the formulas live)
    assert estimate_zero2_model_states_mem_needs(psi, 4, 2, cpu_offload=True) == (psi * 48, 2 * psi)


def test_activations_by_hand():
    config = ModelConfig(vocab_size=1000, n_layer=3, n_embd=64, n_head=4, block_size=128)
    sbh = 128 * 2 * 64
    assert (
        activation_bytes(config, micro_batch=2, seq_len=128, checkpointing=False) == 34 * sbh * 3 + 10 * 128 * 2 * 1000
    )
    assert activation_bytes(config, 2, 128, checkpointing=True) == 2 * sbh * 3 + 34 * sbh + 10 * 128 * 2 * 1000


def test_total_adds_activations_and_overhead(gpt2):
    config, _ = gpt2
    for row in plan(config, 8, 1, gpu_mem=80, micro_batch=4):
        assert row.total_gib * GiB == pytest.approx(
            row.model_states_gib * GiB + row.activations_gib * GiB + OVERHEAD_BYTES
        )


def test_recommendation_moves_to_more_sharding_as_gpu_memory_shrinks():
    # GPT-2 XL (1.558B) on 8 GPUs, micro batch 4 x 1024 with activation checkpointing: 2.71 GiB of
    # activations + 2 GiB overhead, and model states of 23.2 (DDP), 7.98 (ZeRO-1), 5.44 (ZeRO-2),
    # 2.90 (ZeRO-3, and ZeRO-2 with offload) and 0.30 GiB (ZeRO-3 with offload)
    config = load_model_config("gpt2-1.5b")
    picks = [
        getattr(recommend(plan(config, 8, 1, gpu_mem=m, micro_batch=4, checkpointing=True)), "preset", None)
        for m in (80, 24, 12, 8, 6, 3)
    ]
    assert picks == ["ddp", "zero1", "zero2", "zero3", "zero3_offload", None]


def test_cpu_memory_rules_out_offload():
    config = load_model_config("gpt2-1.5b")
    rows = by_preset(plan(config, 8, 1, gpu_mem=8, cpu_mem=16, micro_batch=4, checkpointing=True))
    assert not rows["zero2_offload"].fits and not rows["zero3_offload"].fits
    assert rows["zero3_nvme"].fits  # its states go to disk


@pytest.mark.long  # through make, in a process of its own (10 s of make test's 10 minutes)
def test_make_plan_prints_json_and_a_table():
    result = subprocess.run(
        [
            "make",
            "-s",
            "plan",
            "MODEL=llama-7b",
            "DEVICES=8",
            "NNODES=2",
            "GPU_MEM=80",
            "CPU_MEM=512",
            "ARGS=--json=true --data.batch_size=1",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout[result.stdout.index("{") :])
    assert out["params"] == 6_738_415_616 and out["num_nodes"] == 2 and len(out["rows"]) == 7
    assert out["devices"] == 8 and out["batch_size"] == 1 and out["memory_gib"] == 80
    # 16 GPUs: ZeRO-1 holds 4Ψ + 12Ψ/16 = 29.8 GiB, with 17.0 GiB of activations, 1.2 of logits
    # and 2 of overhead: 50 GiB, the first row under 80 (DDP would need 16Ψ = 100 GiB alone)
    assert out["recommended"] == "zero1"
    # the table, in this process: what make plan MODEL=gpt2-124m DEVICES=1 GPU_MEM=80 runs
    table = llm_here("plan", "--model.config=gpt2-124m", "--trainer.devices=1", "--memory_gib=80")
    assert table.returncode == 0, table.stderr[-2000:]
    # gpt2-124m fits one GPU of 80 GB as it is: plain DDP's line, not only a row label of every table
    assert table.stdout.rstrip().splitlines()[-1] == "recommended: DS=  (plain DDP)"


def test_unknown_model_is_one_line():
    result = llm_here("plan", "--model.config=gpt5")
    lines = program_stderr(result.stderr)
    assert result.returncode == 2 and lines == [lines[0]] and "model.config=gpt5: no such preset" in lines[0]


@pytest.mark.parametrize(
    "old, new",
    [
        ("--gpus=2", "--trainer.devices=2"),
        ("--nnodes=2", "--trainer.num_nodes=2"),
        ("--micro_batch=4", "--data.batch_size=4"),
        ("--activation_checkpointing=true", "--model.activation_checkpointing=true"),
        ("--gpu_mem=24", "--memory_gib=24"),
        ("--model=gpt2-124m", "--model.config=gpt2-124m"),
    ],
)
def test_plans_old_option_names_are_refused_with_trainings_names(old, new):
    # one name per concept: make plan takes the options as training names them
    assert_refused(llm_here("plan", old), f"{old}: renamed; use {new}")


@pytest.mark.long  # an install and two runs of plan in fresh interpreters: about 20 s
def test_a_non_editable_install_finds_the_presets_in_the_repository_folder_else_says_so(tmp_path):
    # `pip install .` (not -e) puts the package alone in site-packages, without configs/: from the
    # repository's folder it finds them there; from anywhere else it says so in one line
    source = tmp_path / "source"
    shutil.copytree(REPO / "llm", source / "llm", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    site = tmp_path / "site-packages"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(site)]
    subprocess.run([*pip, str(source)], check=True, capture_output=True, cwd=source)
    assert (site / "llm" / "paths.py").is_file() and not (site / "configs").exists()
    # -P: the folder a command runs in is not put on the import path, so `llm` is the installed one
    env = {**os.environ, "PYTHONPATH": str(site)}
    plan = [sys.executable, "-P", "-m", "llm", "plan", "--model.config=gpt2-124m", "--json=true"]
    here = subprocess.run(plan, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert here.returncode == 0, here.stderr
    assert json.loads(here.stdout)["params"] == count_params(load_model_config("gpt2-124m"))
    where = subprocess.run([*plan[:2], "-c", "import llm; print(llm.__file__)"], cwd=REPO, env=env, capture_output=True)
    assert where.stdout.decode().startswith(str(site))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    away = subprocess.run(plan, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    lines = program_stderr(away.stderr)
    assert away.returncode != 0 and lines == [lines[0]], away.stderr
    assert f"configs/model: not found beside the package ({site}) nor in {elsewhere}" in lines[0]
