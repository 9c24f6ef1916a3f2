"""DeepSpeed ZeRO for real: two CPU processes over gloo, through the same entry point as `make train`
(the canonical runs of tests/support.py: 12 steps of a 0.47M-parameter model, fp32).

Tolerances, and what was measured when they were set:
- loss curves of every ZeRO preset against 2-process DDP: |Δloss| <= 1e-5 per step (measured
  4.8e-7 for all five): the only differences are the order of floating-point reductions and, with
  offload, DeepSpeed's CPU Adam; the gradient norm before clipping likewise, within 1e-4 relative
  (measured 7.6e-7 for all five);
- resumed against uninterrupted runs of the same preset: |Δloss| <= 1e-6 (measured 0);
- partitions: each of the 2 ranks holds 50% ± 1% of the parameters (ZeRO-3) or of DDP's optimizer
  state (ZeRO-1, 2, 3) (measured 50.0%);
- consolidated fp32 checkpoint against the engine's own logits: max |Δ| <= 1e-5 (measured 0 for
  ZeRO-2, 4.8e-7 for ZeRO-3);
- torch.compile against eager under the same strategy: |Δloss| <= 1e-5 (measured about 1e-6 for
  ZeRO-2 and ZeRO-3): inductor's fused kernels sum in another order.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import RunsCode

from llm.checkpointing.files import Checkpoint
from llm.data.prepare import prepared_dir
from llm.train.strategy import build_strategy
from support import (
    CANONICAL_MODEL,
    COMPILE,
    RUN_ENV,
    STEPS,
    TINY,
    assert_refused,
    callbacks,
    column,
    llm_here,
    losses,
    probes,
    run_llm,
    snapshot,
    trained_steps,
)

PRESETS = ["zero1", "zero2", "zero2_offload", "zero3", "zero3_offload"]
# the offload runs in make test-long: DeepSpeed builds its CPU Adam the first time (about 70 s of C++
# on a CPU whose cache is cold, as a fresh CI machine's is)
OFFLOAD = pytest.mark.long
# ZeRO-1 too: its 2-process run (about 50 s) is the one make test's 10 minutes do without; ZeRO-2 has
# the same optimizer class, and make test-long runs ZeRO-1's
LONG_PRESETS = ("zero1", "zero2_offload", "zero3_offload")
RUN_PRESETS = [pytest.param(p, marks=pytest.mark.long) if p in LONG_PRESETS else p for p in PRESETS]


def summary(run) -> dict:
    return json.loads((run / "summary.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("preset", RUN_PRESETS)
def test_zero_preset_follows_the_ddp_loss_curve(runs, preset):
    ddp, zero = runs("ddp"), runs(preset)
    expected, got = losses(ddp), losses(zero)
    assert sorted(got) == sorted(expected) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert got[step] == pytest.approx(expected[step], abs=1e-5), f"step {step}"
    # the gradients themselves, not only the losses: a sum where DDP averages would hide behind Adam,
    # which is invariant to the scale of the gradients, but not behind their norm
    expected, got = column(ddp, "train/grad_norm"), column(zero, "train/grad_norm")
    assert sorted(got) == sorted(expected) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert got[step] == pytest.approx(expected[step], rel=1e-4), f"step {step}"
    assert summary(zero)["world_size"] == 2 and summary(zero)["strategy"] == f"deepspeed {preset}"
    assert summary(ddp)["strategy"] == "ddp"


@pytest.mark.slow
def test_zero3_partitions_the_parameters(runs):
    total = None
    for probe in probes(runs("zero3"), 2):
        total = probe["params_total"]
        assert probe["params_held"] / total == pytest.approx(0.5, abs=0.01)
    ddp = probes(runs("ddp"), 2)[0]
    assert ddp["params_held"] == ddp["params_total"] == total == 470_528  # test_metrics.py writes it out


@pytest.mark.slow
@pytest.mark.parametrize(
    "preset",
    [pytest.param("zero1", marks=pytest.mark.long), "zero2", pytest.param("zero2_offload", marks=OFFLOAD), "zero3"],
)
def test_zero_partitions_the_optimizer_state(runs, preset):
    ddp = probes(runs("ddp"), 2)[0]
    full = ddp["optimizer_state"]  # exp_avg and exp_avg_sq of every parameter
    assert full == 2 * ddp["params_total"]
    for probe in probes(runs(preset), 2):
        assert probe["optimizer_state"] / full == pytest.approx(0.5, abs=0.01)


@pytest.mark.slow
def test_resume_from_a_zero3_checkpoint_continues_exactly(runs, tmp_path):
    # ZeRO-2's sharded resume with resume=auto is tested by the kill -9 test (test_faults.py); this one
    # continues the canonical ZeRO-3 run from its step-6 checkpoint, given as a path
    canonical = runs("zero3")
    step6 = canonical / "checkpoints" / "step-000006.ckpt"
    assert (step6 / "latest").is_file(), "no sharded checkpoint"
    run = tmp_path / "run"
    zero3 = ("--trainer.devices=2", "--deepspeed=zero3", f"--resume={step6}")
    resumed = run_llm(*runs.args(run, *zero3, probes=()), env={**RUN_ENV, "WANDB_MODE": "disabled"})
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    # the resumed process trained steps 7 to 12 only: it did not start again from step 0
    assert trained_steps(resumed.stdout) == list(range(7, STEPS + 1))
    expected, got = losses(canonical), losses(run)
    assert sorted(got) == list(range(7, STEPS + 1))
    for step in range(7, STEPS + 1):
        assert got[step] == pytest.approx(expected[step], abs=1e-6), f"step {step}"


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["zero2", "zero3"])
def test_consolidated_checkpoint_gives_the_engines_logits(runs, preset, tmp_path):
    run = runs(preset)
    out = tmp_path / "fp32.ckpt"
    result = run_llm("export-fp32", f"--ckpt={run}/checkpoints/last.ckpt", f"--out={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    probe = probes(run, 2)[0]
    model = Checkpoint(out).load().model
    with torch.no_grad():
        logits = model(probe["idx"])
    assert (logits - probe["logits"]).abs().max().item() <= 1e-5
    # the folder itself loads the same, consolidated in memory
    direct = Checkpoint(run / "checkpoints" / "last.ckpt").load().model
    with torch.no_grad():
        assert torch.equal(direct(probe["idx"]), logits)
    again = llm_here("export-fp32", f"--ckpt={run}/checkpoints/last.ckpt", f"--out={out}")
    assert_refused(again, "already exists")


@pytest.mark.slow
def test_sample_and_eval_read_a_sharded_checkpoint(runs):
    ckpt = runs("zero3") / "checkpoints" / "last.ckpt"
    sample = llm_here("sample", f"--ckpt={ckpt}", "--prompt=def ", "--max_new_tokens=10")
    assert sample.returncode == 0 and sample.stdout.startswith("def "), sample.stderr[-3000:]
    evaluation = llm_here("eval", f"--ckpt={ckpt}", "--json=true", "--max_batches=4", "--batch_size=8", "--wandb=false")
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    result = json.loads(evaluation.stdout.strip().splitlines()[-1])
    assert result["step"] == STEPS
    # the same numbers, computed here: the first 4 x 8 non-overlapping blocks of the validation split
    loaded = Checkpoint(ckpt).load()
    meta, T = loaded.data_meta, loaded.model.config.block_size
    folder = prepared_dir(loaded.run_config.data)
    tokens = np.memmap(folder / "val.bin", dtype=meta["dtype"], mode="r")[: meta["splits"]["val"]["tokens"]]
    batch = torch.from_numpy(np.stack([tokens[i * T : i * T + T + 1] for i in range(32)]).astype(np.int64))
    with torch.no_grad():
        logits = loaded.model(batch[:, :-1])
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).item()
    assert result["tokens_evaluated"] == 32 * T
    assert result["loss"] == pytest.approx(expected, abs=1e-5)
    val = meta["splits"]["val"]  # bits per byte: the split's nats per token, times its tokens, over its bytes
    assert result["bpb"] == pytest.approx(result["loss"] * val["tokens"] / (val["bytes"] * math.log(2)))


# compiled under each strategy, against the eager canonical run of the same strategy: variants trained
# by `make test-long` (a compile on a cold cache costs about a minute a process on a CPU)
COMPILED = ("ddp", "zero1", "zero2", "zero2_offload", "zero3")


def check_compiled_follows_eager(compiled: Path, eager: Path) -> None:
    expected, got = losses(eager), losses(compiled)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert got[step] == pytest.approx(expected[step], abs=1e-5), f"step {step}"
    assert summary(compiled)["compile"] is True and summary(compiled)["compile_seconds"] > 0
    assert summary(eager)["compile"] is False


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.parametrize("strategy", COMPILED)
def test_compiled_model_under_ddp_and_each_zero_stage_follows_the_eager_loss_curve(runs, strategy):
    check_compiled_follows_eager(runs(strategy, COMPILE), runs(strategy))


@OFFLOAD
def test_activation_checkpointing_under_zero3_recomputes_and_changes_no_loss(runs):
    # the ZeRO-3 offload run recomputes every block in backward (support.CANONICAL); ZeRO-3's does not
    run = runs("zero3_offload")
    recomputed, plain = losses(run), losses(runs("zero3"))
    for step in range(1, STEPS + 1):
        assert recomputed[step] == pytest.approx(plain[step], abs=1e-5), f"step {step}"
    for rank in (0, 1):  # each of the 2 blocks ran twice per batch: forward, and again in backward
        assert json.loads((run / f"block-forwards-rank{rank}.json").read_text()) == [4] * STEPS


@pytest.mark.parametrize("preset", PRESETS)
def test_overlap_comm_is_off_where_nothing_can_overlap(preset):
    # one process reduces nothing; a whole-model compile releases every gradient at the end of backward
    stage = build_strategy(preset, None, batch_size=4, on_gpu=False).config["zero_optimization"]["stage"]
    for world, compiled, overlap in ((1, False, False), (2, False, True), (None, False, True), (2, True, stage == 3)):
        strategy = build_strategy(preset, None, batch_size=4, on_gpu=False, world_size=world, compiled=compiled)
        assert strategy.config["zero_optimization"]["overlap_comm"] is overlap, (world, compiled)


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_leave_out_deepspeeds_timer_and_say_how_bf16_steps_are_checked(preset):
    # the throughput timer synchronises the device twice per micro-batch; the non-finite skip under
    # DeepSpeed is its bf16 overflow check, whose default changed between releases
    strategy = build_strategy(preset, None, batch_size=4, on_gpu=False, world_size=2, precision="bf16-mixed")
    assert strategy.config["timers"] == {"throughput": {"enabled": False}}
    assert strategy.config["bf16"] == {"enabled": True, "check_grad_overflow": True}
    assert "bf16" not in build_strategy(preset, None, batch_size=4, on_gpu=False, world_size=2).config


@pytest.mark.parametrize(
    "preset, optimizer, summed_in",
    [
        # a 2-process run of its own each: make test-long (make test's 10 minutes)
        pytest.param("zero2", "DeepSpeedZeroOptimizer", "torch.float32", marks=pytest.mark.long),
        pytest.param("zero3", "DeepSpeedZeroOptimizer_Stage3", "torch.float32", marks=pytest.mark.long),
        # ZeRO-1 keeps its ZeRO optimizer, and with it bf16 sums (llm/train/strategy.py says why)
        pytest.param("zero1", "DeepSpeedZeroOptimizer", "torch.bfloat16", marks=pytest.mark.long),
    ],
)
def test_bf16_runs_sum_the_micro_batches_gradients_in_float32(
    tmp_path, fixture_text, data_cache, preset, optimizer, summed_in
):
    """DeepSpeed sums the gradients of accumulated micro-batches in the model's dtype unless told
    otherwise: 32 of them summed in bf16 lose the small terms. Under ZeRO-2 and ZeRO-3 the real
    engine sums them in float32 while the parameters it trains are bf16, and the run trains."""
    run = tmp_path / "run"
    result = run_llm(
        "fit", "--config", "configs/experiment/default.yaml", *TINY, f"--data.text={fixture_text}",
        "--data.vocab_size=300", f"--data.cache_dir={data_cache}", f"--run={run}", "--trainer.max_steps=2",
        "--eval_every=100", "--trainer.precision=bf16-mixed", f"--deepspeed={preset}",
        "--trainer.accumulate_grad_batches=4", callbacks("AccumulationProbe"),
        env={**RUN_ENV, "WANDB_MODE": "disabled"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    probe = json.loads((run / "accumulation.json").read_text())
    assert probe == {"optimizer": optimizer, "accumulation_dtype": summed_in, "parameters_dtype": "torch.bfloat16"}
    logged = losses(run)  # the last step logs
    assert list(logged) == [2] and math.isfinite(logged[2])


# --- refusals, decided before any process group: checked in this process -------------------------------


@pytest.fixture
def refusal(tmp_path, code_corpus, data_cache):
    """Run a bad DeepSpeed command into an existing run folder; check it is refused in one line,
    before any process group, with nothing on disk changed."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("earlier work")

    def refuse(*args: str, fragments: tuple[str, ...]) -> None:
        before = snapshot(tmp_path)
        result = llm_here(
            "fit",
            "--config",
            "configs/experiment/default.yaml",
            *CANONICAL_MODEL,
            f"--data.text={code_corpus}",
            f"--data.cache_dir={data_cache}",
            f"--run={run}",
            "--resume=auto",
            "--trainer.devices=2",
            *args,
        )
        assert_refused(result, *fragments)
        assert "initializing deepspeed distributed" not in result.stdout + result.stderr
        assert snapshot(tmp_path) == before

    return refuse


def test_a_preset_that_is_not_yaml_is_refused(refusal, tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("zero_optimization: {stage: 2\n")
    refusal(f"--deepspeed={bad}", fragments=(f"deepspeed={bad}", "not valid YAML"))


def test_unknown_preset(refusal):
    refusal("--deepspeed=zero4", fragments=("deepspeed=zero4", "no such preset", "zero2_offload"))


def test_parameter_offload_below_stage_3(refusal, tmp_path):
    bad = tmp_path / "zero2_params.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}))
    refusal(f"--deepspeed={bad}", fragments=("offload_param", "needs ZeRO stage 3", "stage 2"))


def test_preset_that_sets_what_the_trainer_owns(refusal, tmp_path):
    bad = tmp_path / "clip.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 2}, "gradient_clipping": 0.5}))
    refusal(f"--deepspeed={bad}", fragments=("gradient_clipping", "trainer.gradient_clip_val"))


def test_nvme_path_missing(refusal, tmp_path):
    refusal(
        "--deepspeed=zero3_nvme",
        f"--nvme_path={tmp_path}/nope",
        fragments=(f"nvme_path={tmp_path}/nope", "no such folder"),
    )
    refusal("--deepspeed=zero3_nvme", fragments=("nvme_path=", "NVME_PATH="))


def test_nvme_path_not_writable(refusal):
    refusal("--deepspeed=zero3_nvme", "--nvme_path=/proc", fragments=("nvme_path=/proc", "not writable"))


def test_16_mixed_on_cpu_with_deepspeed(refusal):
    refusal("--deepspeed=zero2", "--trainer.precision=16-mixed", fragments=("trainer.precision=16-mixed", "GPU"))


def test_more_devices_than_the_machine_has(refusal):
    refusal("--deepspeed=zero2", "--trainer.devices=4096", fragments=("trainer.devices=4096", "CPU cores"))


def test_a_collective_timeout_that_is_not_positive(refusal):
    refusal("--deepspeed=zero2", "--collective_timeout=0", fragments=("collective_timeout=0", "positive"))


DECAYED = [  # support.CANONICAL_MODEL: every weight matrix of the 2 blocks; no norm, bias or embedding
    f"blocks.{b}.{name}.weight"
    for b in (0, 1)
    for name in ("attn.qkv_proj", "attn.out_proj", "mlp.up_proj", "mlp.down_proj")
]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["single", "zero3"])
def test_weight_decay_falls_on_the_weight_matrices_also_under_zero3(runs, name):
    # under ZeRO-3 each parameter the module holds is a flat partition; its shape is in ds_shape
    for probe in probes(runs(name), 2 if name == "zero3" else 1):
        assert probe["decayed"] == sorted(DECAYED)


@pytest.mark.long
@pytest.mark.slow
def test_a_sharded_checkpoint_with_a_payload_in_an_optimizer_shard_is_refused_unread(runs, tmp_path, monkeypatch):
    """Every command that reads a ZeRO folder reads every shard as data first: DeepSpeed's own
    loading would meet the payload only after the run folder exists, or mid-consolidation."""

    marker = tmp_path / "code-ran"
    monkeypatch.setenv("LLM_TEST_MARKER", str(marker))
    folder = tmp_path / "run" / "checkpoints" / "last.ckpt"
    shutil.copytree(runs("zero2") / "checkpoints" / "last.ckpt", folder)
    shutil.copy(runs("zero2") / "config.yaml", tmp_path / "run" / "config.yaml")
    (shard,) = sorted(folder.rglob("*optim_states.pt"))[-1:]
    state = torch.load(shard, weights_only=False)
    state["payload"] = RunsCode()
    torch.save(state, shard)
    refused = f"{shard.name} holds objects other than tensors and plain data, refused unread"
    commands = {
        "sample": ["sample", f"--ckpt={folder}", "--prompt=x"],
        "eval": ["eval", f"--ckpt={folder}", "--wandb=false"],
        "export": ["export", f"--ckpt={folder}", f"--out={tmp_path / 'hf'}"],
        "export-fp32": ["export-fp32", f"--ckpt={folder}", f"--out={tmp_path / 'fp32.ckpt'}"],
        "resume": runs.args(tmp_path / "resumed", "--trainer.devices=2", "--deepspeed=zero2", f"--resume={folder}"),
    }
    for name, args in commands.items():
        assert_refused(llm_here(*args), refused)
        assert not marker.exists(), f"{name} ran the checkpoint's code"
    assert not (tmp_path / "hf").exists() and not (tmp_path / "fp32.ckpt").exists()
    assert not (tmp_path / "resumed").exists()


def test_a_checkpoint_with_a_changed_byte_is_refused(runs, tmp_path):
    """torch.load does not check the CRC-32s its zip holds: the changed bytes would load as weights."""
    import zipfile

    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    whole = bytearray((runs("single") / "checkpoints" / "last.ckpt").read_bytes())
    with zipfile.ZipFile(runs("single") / "checkpoints" / "last.ckpt") as archive:
        entry = max(archive.infolist(), key=lambda i: i.file_size)  # the largest tensor's storage
        start = entry.header_offset + 30 + len(entry.filename.encode()) + len(entry.extra) + entry.file_size // 2
    whole[start : start + 64] = bytes(b ^ 0xFF for b in whole[start : start + 64])
    ckpt.write_bytes(bytes(whole))
    answer = f"{entry.filename} in last.ckpt does not match the checksum the save wrote"
    assert_refused(llm_here("sample", f"--ckpt={ckpt}", "--prompt=x"), answer)
    resume = runs.args(tmp_path / "resumed", f"--resume={ckpt}", "--trainer.max_steps=14", probes=())
    assert_refused(llm_here(*resume), answer)
    assert not (tmp_path / "resumed").exists()
