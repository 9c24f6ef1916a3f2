"""DeepSpeed ZeRO for real: two CPU processes over gloo, through the same entry point as `make train`.

Tolerances (fp32, 6 steps of a 0.47M-parameter model), and what was measured when they were set:
- loss curves of every ZeRO preset against 2-process DDP: |Δloss| <= 1e-5 per step (measured
  4.8e-7 for all five): the only differences are the order of floating-point reductions and, with
  offload, DeepSpeed's CPU Adam; the gradient norm before clipping likewise, within 1e-4 relative
  (measured 7.6e-7 for all five);
- resumed against uninterrupted runs of the same preset, and activation checkpointing against
  none: |Δloss| <= 1e-6 (measured 0);
- partitions: each of the 2 ranks holds 50% ± 1% of the parameters (ZeRO-3) or of DDP's optimizer
  state (ZeRO-1, 2, 3) (measured 50.0%);
- consolidated fp32 checkpoint against the engine's own logits: max |Δ| <= 1e-5 (measured 0 for
  ZeRO-2, 4.8e-7 for ZeRO-3);
- torch.compile against eager under the same strategy: |Δloss| <= 1e-5 (measured about 1e-6 for
  ZeRO-2 and ZeRO-3): inductor's fused kernels sum in another order.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_llm, snapshot, trained_steps
from llm.checkpoint import load_for_inference
from llm.data.datamodule import datamodule_args
from llm.data.prepare import PrepareConfig, prepared_dir

pytestmark = pytest.mark.slow

PRESETS = ["zero1", "zero2", "zero2_offload", "zero3", "zero3_offload"]
# weights of 16k elements or more, so that ZeRO-3 partitions nearly all of them (the presets keep
# tensors under 1e4 elements whole on every rank, as they cost more to gather than to hold)
MODEL = [
    "--model.config.n_layer=2",
    "--model.config.n_head=2",
    "--model.config.n_embd=128",
    "--model.config.block_size=64",
    "--data.batch_size=4",
    "--data.val_batches=2",
    "--data.num_workers=0",
    "--data.vocab_size=512",
]
PROBE = '--trainer.callbacks=[{"class_path": "tests.helpers.EngineProbe"}]'
COUNT_FORWARDS = '--trainer.callbacks=[{"class_path": "tests.helpers.BlockForwardCount"}]'
STOP_AT_3 = '--trainer.callbacks=[{"class_path": "tests.helpers.StopAtStep", "init_args": {"step": 3}}]'


class Runs:
    """2-process runs of 6 steps, each one once per session: `run(name, *args)` gives its folder."""

    def __init__(self, root: Path, corpus: Path, cache: Path):
        self.root, self.corpus, self.cache = root, corpus, cache
        self.done: dict[tuple, Path] = {}

    def args(self, folder: Path, *extra: str) -> list[str]:
        return [
            "fit",
            "--config",
            "configs/experiment/default.yaml",
            *MODEL,
            f"--data.text={self.corpus}",
            f"--data.cache_dir={self.cache}",
            f"--run={folder}",
            "--trainer.devices=2",
            "--trainer.log_every_n_steps=1",
            "--eval_every=3",
            "--trainer.max_steps=6",
            *extra,
        ]

    def __call__(self, name: str, *extra: str) -> Path:
        if (name, *extra) not in self.done:
            folder = self.root / name
            result = run_llm(*self.args(folder, *extra))
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
            self.done[(name, *extra)] = folder
        return self.done[(name, *extra)]


@pytest.fixture(scope="module")
def train(tmp_path_factory, code_corpus, data_cache) -> Runs:
    return Runs(tmp_path_factory.mktemp("ds"), code_corpus, data_cache)


def column(run: Path, key: str) -> dict[int, float]:
    with open(run / "metrics.csv", newline="") as f:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r.get(key)}


def losses(run: Path) -> dict[int, float]:
    return column(run, "train/loss")


def probes(run: Path) -> list[dict]:
    return [torch.load(run / f"probe-rank{r}.pt", weights_only=True) for r in (0, 1)]


def ds(preset: str) -> str:
    return f"--deepspeed={preset}"


@pytest.mark.parametrize("preset", PRESETS)
def test_zero_preset_follows_the_ddp_loss_curve(train, preset):
    ddp, zero = train("ddp", PROBE), train(preset, ds(preset), PROBE)
    expected, got = losses(ddp), losses(zero)
    assert sorted(got) == sorted(expected) == list(range(6))
    for step in range(6):
        assert got[step] == pytest.approx(expected[step], abs=1e-5), f"step {step}"
    # the gradients themselves, not only the losses: a sum where DDP averages would hide behind Adam,
    # which is invariant to the scale of the gradients, but not behind their norm
    expected, got = column(ddp, "train/grad_norm"), column(zero, "train/grad_norm")
    assert sorted(got) == sorted(expected) == list(range(6))
    for step in range(6):
        assert got[step] == pytest.approx(expected[step], rel=1e-4), f"step {step}"
    summary = json.loads((zero / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["strategy"] == f"deepspeed {preset}"
    assert json.loads((ddp / "summary.json").read_text())["strategy"] == "ddp"


def test_zero3_partitions_the_parameters(train):
    total = None
    for probe in probes(train("zero3", ds("zero3"), PROBE)):
        total = probe["params_total"]
        assert probe["params_held"] / total == pytest.approx(0.5, abs=0.01)
    ddp = probes(train("ddp", PROBE))[0]
    assert ddp["params_held"] == ddp["params_total"] == total


@pytest.mark.parametrize("preset", ["zero1", "zero2", "zero2_offload", "zero3"])
def test_zero_partitions_the_optimizer_state(train, preset):
    full = probes(train("ddp", PROBE))[0]["optimizer_state"]  # exp_avg and exp_avg_sq of every parameter
    assert full == 2 * probes(train("ddp", PROBE))[0]["params_total"]
    for probe in probes(train(preset, ds(preset), PROBE)):
        assert probe["optimizer_state"] / full == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("preset", ["zero2", "zero3"])
def test_resume_auto_continues_a_sharded_run_exactly(train, preset, tmp_path):
    whole = train(preset, ds(preset), PROBE)
    stopped = train(f"{preset}-stopped", ds(preset), STOP_AT_3)
    assert (stopped / "checkpoints" / "last.ckpt" / "latest").is_file(), "no sharded checkpoint"
    resumed = run_llm(*train.args(stopped, ds(preset), "--resume=auto"))
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    assert "resuming from" in resumed.stdout
    # the resumed process trained steps 4 to 6 only: it did not start again from step 0 (metrics.csv,
    # keyed by step, would not show a deterministic restart)
    assert trained_steps(resumed.stdout) == [4, 5, 6]
    expected, got = losses(whole), losses(stopped)
    assert sorted(got) == list(range(6))
    for step in range(6):
        assert got[step] == pytest.approx(expected[step], abs=1e-6), f"step {step}"


@pytest.mark.parametrize("preset", ["zero2", "zero3"])
def test_consolidated_checkpoint_gives_the_engines_logits(train, preset, tmp_path):
    run = train(preset, ds(preset), PROBE)
    out = tmp_path / "fp32.ckpt"
    result = run_llm("export-fp32", f"--ckpt={run}/checkpoints/last.ckpt", f"--out={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    probe = probes(run)[0]
    model = load_for_inference(out).model
    with torch.no_grad():
        logits = model(probe["idx"])
    assert (logits - probe["logits"]).abs().max().item() <= 1e-5
    # the folder itself loads the same, consolidated in memory
    direct = load_for_inference(run / "checkpoints" / "last.ckpt").model
    with torch.no_grad():
        assert torch.equal(direct(probe["idx"]), logits)
    again = run_llm("export-fp32", f"--ckpt={run}/checkpoints/last.ckpt", f"--out={out}")
    assert again.returncode == 2 and "already exists" in again.stderr


def test_sample_and_eval_read_a_sharded_checkpoint(train):
    ckpt = train("zero3", ds("zero3"), PROBE) / "checkpoints" / "last.ckpt"
    sample = run_llm("sample", f"--ckpt={ckpt}", "--prompt=def ", "--max_new_tokens=10")
    assert sample.returncode == 0 and sample.stdout.startswith("def "), sample.stderr[-3000:]
    evaluation = run_llm("eval", f"--ckpt={ckpt}", "--json=true", "--max_batches=4", "--batch_size=8")
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    result = json.loads(evaluation.stdout.strip().splitlines()[-1])
    assert result["step"] == 6
    # the same numbers, computed here: the first 4 x 8 non-overlapping blocks of the validation split
    loaded = load_for_inference(ckpt)
    meta, T = loaded.data_meta, loaded.model.config.block_size
    folder = prepared_dir(PrepareConfig.from_data_config(datamodule_args(loaded.config["data"])))
    tokens = np.memmap(folder / "val.bin", dtype=meta["dtype"], mode="r")[: meta["splits"]["val"]["tokens"]]
    batch = torch.from_numpy(np.stack([tokens[i * T : i * T + T + 1] for i in range(32)]).astype(np.int64))
    with torch.no_grad():
        logits = loaded.model(batch[:, :-1])
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).item()
    assert result["tokens_evaluated"] == 32 * T
    assert result["loss"] == pytest.approx(expected, abs=1e-5)
    val = meta["splits"]["val"]  # bits per byte: the split's nats per token, times its tokens, over its bytes
    assert result["bpb"] == pytest.approx(result["loss"] * val["tokens"] / (val["bytes"] * math.log(2)))


@pytest.mark.parametrize("preset", ["ddp", "zero1", "zero2", "zero3"])
def test_compiled_model_under_ddp_and_zero_follows_the_eager_loss_curve(train, preset):
    strategy = () if preset == "ddp" else (ds(preset),)
    eager = losses(train(preset, *strategy, PROBE))
    compiled = train(f"{preset}-compiled", *strategy, "--model.compile=true")
    got = losses(compiled)
    assert sorted(got) == list(range(6))
    for step in range(6):
        assert got[step] == pytest.approx(eager[step], abs=1e-5), f"step {step}"
    summary = json.loads((compiled / "summary.json").read_text())
    assert summary["compile"] is True and summary["compile_seconds"] > 0


@pytest.mark.parametrize("preset", PRESETS)
def test_overlap_comm_is_off_for_one_process_only(preset):
    from llm.strategy import build_strategy

    for world, overlap in ((1, False), (2, True), (None, True)):
        strategy = build_strategy(preset, None, batch_size=4, on_gpu=False, world_size=world)
        assert strategy.config["zero_optimization"]["overlap_comm"] is overlap, world


def test_a_preset_that_is_not_yaml_is_refused(refusal, tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("zero_optimization: {stage: 2\n")
    refusal(f"--deepspeed={bad}", fragments=(f"deepspeed={bad}", "not valid YAML"))


def test_activation_checkpointing_under_zero3_recomputes_and_changes_no_loss(train):
    plain = losses(train("zero3", ds("zero3"), PROBE))
    run = train("zero3-ckpt", ds("zero3"), "--model.activation_checkpointing=true", COUNT_FORWARDS)
    recomputed = losses(run)
    for step in range(6):
        assert recomputed[step] == pytest.approx(plain[step], abs=1e-6), f"step {step}"
    for rank in (0, 1):  # each of the 2 blocks ran twice per batch: forward, and again in backward
        assert json.loads((run / f"block-forwards-rank{rank}.json").read_text()) == [4] * 6


@pytest.fixture
def refusal(tmp_path, code_corpus, data_cache):
    """Run a bad DeepSpeed command into an existing run folder; check it is refused in one line,
    before any process group, with nothing on disk changed."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("earlier work")

    def refuse(*args: str, fragments: tuple[str, ...]) -> None:
        before = snapshot(tmp_path)
        result = run_llm(
            "fit",
            "--config",
            "configs/experiment/default.yaml",
            *MODEL,
            f"--data.text={code_corpus}",
            f"--data.cache_dir={data_cache}",
            f"--run={run}",
            "--resume=auto",
            "--trainer.devices=2",
            *args,
        )
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
        for fragment in fragments:
            assert fragment in lines[0]
        assert "initializing deepspeed distributed" not in result.stdout + result.stderr
        assert snapshot(tmp_path) == before

    return refuse


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
