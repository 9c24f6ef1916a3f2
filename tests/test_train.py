"""Training through the real entry points: `make train`, `python -m llm fit`, resume, sampling."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from llm.checkpointing.files import Checkpoint
from support import (
    REPO,
    RUN_ENV,
    STEPS,
    TINY,
    assert_refused,
    batches,
    callbacks,
    column,
    corpus_fit,
    llm_here,
    losses,
    run_llm,
    trained_steps,
    wandb_records,
)

# the module's fixtures (a stopped run, an accumulating run) are trained once: its tests stay on one worker
pytestmark = pytest.mark.xdist_group("train")

SUMMARY_KEYS = {
    "steps",
    "tokens",
    "wall_seconds",
    "tokens_per_second",
    "final_train_loss",
    "final_val_loss",
    "unigram_val_entropy",
    "best_checkpoint",
    "last_checkpoint",
    "params",
    "world_size",
    "strategy",
    "tokens_per_step",
    "accumulate_grad_batches",
    "save_seconds_max",
    "memory_planned_gib",
    "memory_measured_gib",
    "memory_baseline_gib",
}


def make(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-s", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def metrics(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_make_train_runs_the_default_job_and_leaves_the_run_folder(tmp_path, data_cache):
    run = tmp_path / "run"
    args = f"--eval_every=2 --data.cache_dir={data_cache} --data.batch_size=8 --data.val_batches=2"
    args += " --trainer.log_every_n_steps=2"
    result = make("train", "MAX_STEPS=4", f"RUN={run}", f"ARGS={args}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    readable_in_a_file(result)
    # before the first step: the tokenizer and where it came from, the time it will take, and a
    # warm-up (the default 50 steps) that the run is too short to finish
    lines = result.stdout.splitlines()
    tokenizer = r"tokenizer: byte-level BPE trained on the train split \(.*/tokenizer\.json\); vocabulary 8,192, "
    assert any(re.fullmatch(tokenizer + r"<\|endoftext\|> = 0", line) for line in lines), result.stdout
    assert any(
        re.fullmatch(r"estimate: \S+ s per optimizer step, \S+ s for 4 steps, at 40% MFU .*", line) for line in lines
    )
    assert "warning: model.optimizer.warmup_steps=50 is not shorter than trainer.max_steps=4" in result.stdout
    assert re.search(r"^step 4/4 \| loss .* \| \d+ s, 0 s left$", result.stdout, re.M), result.stdout
    assert "summary" in result.stdout and "final_val_loss" in result.stdout
    assert {p.name for p in run.iterdir()} >= {"config.yaml", "checkpoints", "metrics.csv", "wandb", "summary.json"}
    summary = json.loads((run / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["steps"] == 4 and summary["world_size"] == 1 and summary["tokens"] == 4 * 8 * 128
    assert summary["tokens_per_second"] > 0 and 1e6 < summary["params"] < 3e6
    assert Path(summary["last_checkpoint"]).name == "step-000004.ckpt" and Path(summary["best_checkpoint"]).is_file()
    assert (run / "checkpoints" / "last.ckpt").resolve() == Path(summary["last_checkpoint"]).resolve()
    assert summary["unigram_val_entropy"] > 4  # the embedded corpus, an 8192-token BPE
    # memory per device without what the process held before the model: the planner's figure is at
    # least the 16 bytes of each parameter's states, and the peak measured saw them too
    states = 16 * summary["params"] / 2**30
    assert summary["memory_planned_gib"] > states and summary["memory_measured_gib"] > states
    assert summary["memory_baseline_gib"] > 0.1  # the interpreter, torch and Lightning
    saves = [float(r["perf/save_seconds"]) for r in metrics(run) if r.get("perf/save_seconds")]
    assert len(saves) == 2 and summary["save_seconds_max"] == pytest.approx(max(saves), abs=1e-3)  # steps 2 and 4
    assert list((run / "wandb").glob("offline-run-*/run-*.wandb")), "no offline W&B run"
    rows = metrics(run)
    assert [int(r["step"]) for r in rows if r.get("val/loss")] == [2, 4]  # every 2 steps and after the last
    config = (run / "config.yaml").read_text()
    assert "vocab_size: 8192" in config and "precision: 32-true" in config  # resolved values, not nulls

    sample = make("sample", f"CKPT={summary['last_checkpoint']}", "PROMPT=def main(", "ARGS=--max_new_tokens=20")
    assert sample.returncode == 0, sample.stderr[-2000:]
    assert sample.stdout.startswith("def main(") and len(sample.stdout) > len("def main(\n")

    again = make("prepare", f"ARGS=--data.cache_dir={data_cache}")
    assert again.returncode == 0 and "(cached)" in again.stdout, again.stdout + again.stderr

    evaluated = make("eval", f"CKPT={run}", "ARGS=--max_batches=2")  # a run folder: its newest checkpoint
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert f"ckpt: {run}/checkpoints/step-000004.ckpt (run {run})" in evaluated.stderr
    assert re.search(r"^loss +\d", evaluated.stdout, re.M)
    readable_in_a_file(evaluated)


def readable_in_a_file(result) -> None:
    """Output written to a file reads as lines: no progress bar's carriage returns, no colours."""
    for stream in (result.stdout, result.stderr):
        assert "\r" not in stream and "\x1b" not in stream, stream[-3000:]


@pytest.mark.slow
@pytest.mark.long
def test_training_on_shakespeare_with_the_gpt2_tokenizer_learns(tmp_path, shakespeare, gpt2_tokenizer, data_cache):
    run = tmp_path / "run"
    result = llm_here(
        "fit",
        "--config",
        "configs/experiment/default.yaml",
        *TINY,
        f"--data.text={shakespeare}",
        f"--data.tokenizer={gpt2_tokenizer}",
        f"--data.cache_dir={data_cache}",
        f"--run={run}",
        "--model.config.block_size=32",
        "--model.config.tie_embeddings=false",  # learns context sooner than tied at this width (5.6 vs 5.9 nats)
        "--data.batch_size=16",
        "--data.val_batches=8",
        "--trainer.max_steps=400",
        "--eval_every=100",
        "--model.optimizer.lr=3e-3",
        "--model.optimizer.warmup_steps=20",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    val = [float(r["val/loss"]) for r in metrics(run) if r.get("val/loss")]
    # the first validation (step 100) already knows token frequencies; ln(50304) = 10.8 at the start
    assert val[-1] < 0.8 * 10.83
    assert val[-1] < val[0] - 0.5
    assert summary["final_val_loss"] == pytest.approx(val[-1])
    assert summary["final_val_loss"] < summary["unigram_val_entropy"] - 0.05, summary


QUIET = {"WANDB_MODE": "disabled"}  # runs whose W&B records no test reads leave W&B out
STOP_AT_4 = '{"class_path": "tests.helpers.StopAtStep", "init_args": {"step": 4}}'


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, runs):
    """The canonical one-process run, preempted after 4 of its 12 steps (a callback stops it, as a
    job's end would): what a resume continues."""
    run = tmp_path_factory.mktemp("stopped") / "run"
    first = llm_here(*runs.args(run, callbacks("BatchRecord", STOP_AT_4), probes=()), env=RUN_ENV)
    assert first.returncode == 0, first.stderr[-3000:]
    return run, first


def wandb_runs(run: Path) -> list[Path]:
    return sorted((run / "wandb").glob("offline-run-*"))


def history_steps(wandb_run: Path) -> list[int]:
    return [r["history"]["item"]["trainer/global_step"] for r in wandb_records(wandb_run) if r["type"] == "history"]


@pytest.mark.slow
def test_resume_continues_exactly_where_an_uninterrupted_run_would_be_and_in_the_same_wandb_run(
    tmp_path, runs, stopped
):
    run = tmp_path / "run"
    shutil.copytree(stopped[0], run, symlinks=True)
    assert trained_steps(stopped[1].stdout) == [1, 2, 3, 4]
    assert json.loads((run / "summary.json").read_text())["steps"] == 4
    second = llm_here(*runs.args(run, callbacks("BatchRecord"), "--resume=auto", probes=()), env=RUN_ENV)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resuming from {run}/checkpoints/step-000004.ckpt" in second.stdout
    assert trained_steps(second.stdout) == list(range(5, STEPS + 1))

    whole = runs("single")
    expected, got = losses(whole), losses(run)
    assert sorted(got) == sorted(expected) == list(range(1, STEPS + 1)), "metrics.csv lost or repeated steps"
    for step in range(1, STEPS + 1):
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), f"step {step}"
    assert batches(run) == batches(whole), "a sample was repeated or skipped"
    assert json.loads((run / "summary.json").read_text())["steps"] == STEPS
    # W&B: the resumed process continued the same run (one id), logging from step 4 on
    first, resumed = wandb_runs(run)
    run_id = (run / "wandb" / "run_id").read_text().strip()
    assert first.name.endswith(run_id) and resumed.name.endswith(run_id)
    steps = history_steps(resumed)
    assert min(steps) >= 5 and max(steps) == STEPS


def warmup_cosine_expected(lr: float, warmup: int, total: int, min_ratio: float) -> list[float]:
    """The learning rate of each optimizer step (1-based), written out: linear warm-up from
    lr/warmup to lr over `warmup` steps, then half a cosine from lr down to lr * min_ratio, which it
    reaches after step `total`."""
    rates = [lr * (1 / warmup + (1 - 1 / warmup) * (s - 1) / warmup) for s in range(1, warmup + 1)]
    low = lr * min_ratio
    span = total - warmup
    rates += [low + (lr - low) * (1 + math.cos(math.pi * j / span)) / 2 for j in range(span)]
    return rates


def final_lr(run: Path) -> float:
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["lr_schedulers"][0]
    return state["_last_lr"][0]


@pytest.mark.slow
def test_learning_rate_warms_up_decays_to_its_minimum_and_follows_a_longer_resumed_run(tmp_path, runs, stopped):
    lr, warmup, ratio = 3e-3, 4, 0.1  # configs/experiment/default.yaml; support.CANONICAL_CADENCE
    logged = [column(runs("single"), "train/lr")[s] for s in range(1, STEPS + 1)]
    expected = warmup_cosine_expected(lr, warmup, STEPS, ratio)
    assert logged == pytest.approx(expected, rel=1e-6)
    assert logged[:warmup] == pytest.approx([lr / 4, lr * 7 / 16, lr * 5 / 8, lr * 13 / 16])  # warm-up
    assert logged[warmup] == pytest.approx(lr) and max(logged) == pytest.approx(lr)  # the peak, after it
    assert final_lr(runs("single")) == pytest.approx(lr * ratio)  # where the cosine ends, after the last step
    # resumed at step 4 with 16 steps instead of 12: the cosine now spans steps 5 to 16
    run = tmp_path / "run"
    shutil.copytree(stopped[0], run, symlinks=True)
    longer = llm_here(*runs.args(run, "--resume=auto", "--trainer.max_steps=16", probes=()), env=QUIET)
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert "warning: trainer.max_steps 12 -> 16: continuing from step 4" in longer.stdout
    logged = [column(run, "train/lr")[s] for s in range(1, 17)]
    assert logged == pytest.approx(warmup_cosine_expected(lr, warmup, 16, ratio), rel=1e-6)
    assert final_lr(run) == pytest.approx(lr * ratio)
    assert json.loads((run / "summary.json").read_text())["steps"] == 16


def test_checkpoint_holds_config_and_tokenizer_and_reproduces_the_logits(runs):
    run = runs("single")
    loaded = Checkpoint(run / "checkpoints" / "last.ckpt").load()
    assert loaded.config["model"]["config"]["n_layer"] == 2 and loaded.config["run"] == str(run)
    assert loaded.tokenizer.get_vocab_size() == 512
    text = "def f(x):\n    return x"
    assert loaded.tokenizer.decode(loaded.tokenizer.encode(text).ids) == text
    trained = torch.load(run / "probe-rank0.pt", weights_only=True)  # taken in the training process, at its end
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(trained["idx"]), trained["logits"], rtol=0, atol=1e-6)


def test_the_run_config_reads_the_same_from_config_yaml_and_from_a_checkpoint(runs):
    from llm.config import RunConfig

    run = runs("single")
    from_yaml = RunConfig.from_yaml(run / "config.yaml")
    from_checkpoint = RunConfig.from_checkpoint(torch.load(run / "checkpoints" / "last.ckpt", weights_only=True))
    assert from_yaml == from_checkpoint
    assert (from_yaml.model.n_layer, from_yaml.loader.batch_size, from_yaml.trainer.max_steps) == (2, 4, STEPS)
    assert from_yaml.options.run == str(run) and from_yaml.optimizer.betas == (0.9, 0.95)
    assert from_yaml.data.vocab_size == 512 and from_yaml.world_size == 1
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["model"]["config"]["n_layers"] = 3  # a misspelt field is named, never dropped
    with pytest.raises(ValueError, match="n_layers: no such field of ModelConfig"):
        RunConfig.from_dict(config)


def test_turning_the_runs_loggers_off_is_refused(tmp_path, fixture_text, data_cache):
    run = tmp_path / "run"
    result = llm_here(*corpus_fit(fixture_text, run, data_cache, "--trainer.logger=false"))
    assert_refused(result, "trainer.logger=false: a run always writes metrics.csv", "WANDB_MODE=disabled")
    assert not run.exists()


FORK_DATAMODULE = '''
from pathlib import Path

from llm.data.datamodule import TokenDataModule


class MarkedData(TokenDataModule):
    """A fork's DataModule: the project's, plus an argument of its own."""

    def __init__(self, *args, marker: str = "marker.txt", **kwargs):
        super().__init__(*args, **kwargs)
        self.marker = marker

    def setup(self, stage: str) -> None:
        super().setup(stage)
        Path(self.marker).write_text(f"{stage} {self.batch_size} {self.block_size}")
'''


def test_a_forks_datamodule_logger_and_callback_come_from_its_config(tmp_path, fixture_text, data_cache, monkeypatch):
    # a fork's DataModule (by class path), logger and callback, in its own config file: honoured
    # beside the run's own metrics.csv and W&B
    (tmp_path / "forkdata.py").write_text(FORK_DATAMODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    extra = tmp_path / "extra.yaml"
    extra.write_text(
        "trainer:\n"
        "  logger:\n"
        "    - class_path: lightning.pytorch.loggers.CSVLogger\n"
        f"      init_args: {{save_dir: {tmp_path / 'theirs'}, name: csv}}\n"
        "  callbacks:\n"
        "    - class_path: lightning.pytorch.callbacks.LearningRateMonitor\n"
    )
    run, marker = tmp_path / "run", tmp_path / "marker.txt"
    args = corpus_fit(fixture_text, run, data_cache, "--data.vocab_size=300", "--data.val_fraction=0.3")
    args += ["--config", str(extra), "--trainer.max_steps=2", "--trainer.log_every_n_steps=1"]
    result = llm_here(*args, "--data=forkdata.MarkedData", f"--data.marker={marker}", env=QUIET)
    assert result.returncode == 0, result.stderr[-3000:]
    assert marker.read_text() == "TrainerFn.FITTING 8 64"  # its own argument, and the linked block size
    assert "class_path: forkdata.MarkedData" in (run / "config.yaml").read_text()
    with open(run / "metrics.csv", newline="") as f:
        ours = list(csv.DictReader(f))
    (theirs,) = (tmp_path / "theirs" / "csv").glob("version_*/metrics.csv")
    with open(theirs, newline="") as f:
        their_rows = list(csv.DictReader(f))
    assert [r["train/loss"] for r in their_rows if r.get("train/loss")] == [r["train/loss"] for r in ours]
    assert all(r.get("lr-AdamW/pg1") for r in ours)  # the LearningRateMonitor's key, in the run's own log
    not_one = llm_here(*args, "--data=lightning.pytorch.demos.boring_classes.BoringDataModule")
    assert not_one.returncode == 2 and "does not correspond to a subclass of TokenDataModule" in not_one.stderr


# the canonical 4 x 64 tokens per step, in micro-batches of 2: the accumulation of 2 is derived
ACCUMULATE = ("--data.batch_size=2", "--tokens_per_step=256", "--data.val_batches=4")


@pytest.fixture(scope="module")
def accumulated(tmp_path_factory, runs):
    """The canonical one-process run with micro-batches of 2 and accumulation 2: each optimizer step
    sees the same 4 samples as the canonical micro-batch of 4, and validation the same 8 blocks."""
    run = tmp_path_factory.mktemp("accumulated") / "run"
    result = llm_here(*runs.args(run, *ACCUMULATE, probes=("BatchRecord",)), env=QUIET)
    assert result.returncode == 0, result.stderr[-3000:]
    return run


@pytest.mark.slow
def test_gradient_accumulation_of_two_half_batches_trains_as_the_whole_batch(runs, accumulated):
    whole = runs("single")
    for key in ("val/loss", "train/grad_norm"):  # validation on the same blocks; the norm of the summed gradients
        expected, got = column(whole, key), column(accumulated, key)
        assert sorted(got) == sorted(expected) and expected, key
        for step in expected:
            assert got[step] == pytest.approx(expected[step], rel=1e-5), (key, step)
    weights = [
        torch.load(r / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"] for r in (whole, accumulated)
    ]
    # the gradients are summed in another order: after 12 Adam steps, weights differ by up to 1e-5
    # (measured on the attention biases, whose small gradients Adam's normalisation scales up)
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, rtol=0, atol=3e-5, msg=name)
    summary = json.loads((accumulated / "summary.json").read_text())
    assert summary["tokens"] == STEPS * 2 * 2 * 64  # steps x accumulation x micro-batch x block
    assert summary["tokens_per_step"] == 256 and summary["accumulate_grad_batches"] == 2
    config = yaml.safe_load((accumulated / "config.yaml").read_text())
    assert config["trainer"]["accumulate_grad_batches"] == 2 and config["tokens_per_step"] == 256


@pytest.mark.slow
def test_resuming_a_run_with_accumulation_is_exact(tmp_path, runs, accumulated):
    run = tmp_path / "run"
    stop = '{"class_path": "tests.helpers.StopAtStep", "init_args": {"step": 5}}'
    first = llm_here(*runs.args(run, *ACCUMULATE, callbacks("BatchRecord", stop), probes=()), env=QUIET)
    assert first.returncode == 0, first.stderr[-3000:]
    second = llm_here(*runs.args(run, *ACCUMULATE, "--resume=auto", probes=("BatchRecord",)), env=QUIET)
    assert second.returncode == 0, second.stderr[-3000:]
    assert trained_steps(second.stdout) == list(range(6, STEPS + 1))
    expected, got = losses(accumulated), losses(run)
    assert sorted(got) == sorted(expected) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert got[step] == pytest.approx(expected[step], abs=1e-6), f"step {step}"
    assert batches(run) == batches(accumulated), "a micro-batch was repeated or skipped"


# --- the same tokens per step on another number of processes ---------------------------------------


def continued_from_step_10(tmp_path, runs, reference: Path, *new_shape: str, process=llm_here):
    """`reference` (complete, 12 steps) continued from its step-10 checkpoint in a copy of its folder,
    split as `new_shape` says; the copy's folder."""
    run = tmp_path / "run"
    shutil.copytree(reference, run, symlinks=True)
    resume = f"--resume={run / 'checkpoints' / 'step-000010.ckpt'}"
    result = process(*runs.args(run, *new_shape, resume, probes=()), env=QUIET)
    assert result.returncode == 0, result.stderr[-3000:]
    assert trained_steps(result.stdout) == [11, 12] and "the same samples per step" in result.stdout
    return run


def assert_same_model(reference: Path, run: Path) -> None:
    """The validation after step 12 (the same blocks) and the final weights."""
    (step,) = [s for s in column(reference, "val/loss") if s == STEPS]
    assert column(run, "val/loss")[step] == pytest.approx(column(reference, "val/loss")[step], abs=1e-5)
    weights = [
        torch.load(r / "checkpoints" / "step-000012.ckpt", weights_only=True)["state_dict"] for r in (reference, run)
    ]
    for name, value in weights[0].items():  # two steps of gradients summed in another order
        torch.testing.assert_close(weights[1][name], value, rtol=0, atol=1e-5, msg=name)


@pytest.mark.long
def test_a_two_process_run_continues_on_one_process_that_accumulates_twice(tmp_path, runs):
    ddp = runs("ddp")  # 2 processes x 4 sequences, validating 2 x 4 x 2 blocks
    run = continued_from_step_10(tmp_path, runs, ddp, "--tokens_per_step=512", "--data.val_batches=4")
    assert_same_model(ddp, run)


@pytest.mark.long
def test_a_one_process_run_continues_on_two_processes_that_accumulate_half_as_much(tmp_path, runs, accumulated):
    # 1 process x 2 sequences x 2 accumulated (8 validation blocks) -> 2 processes x 2 sequences
    two = ("--data.batch_size=2", "--tokens_per_step=256", "--data.val_batches=2", "--trainer.devices=2")
    run = continued_from_step_10(tmp_path, runs, accumulated, *two, process=run_llm)
    assert_same_model(accumulated, run)
