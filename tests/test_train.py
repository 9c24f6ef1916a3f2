"""Training through the real entry points: `make train`, `python -m llm fit`, resume, sampling."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY, assert_refused, corpus_fit, run_llm, trained_steps
from llm.checkpoint import load_for_inference

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
    result = make("train", "MAX_STEPS=4", f"RUN={run}", f"ARGS={args}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "summary" in result.stdout and "final_val_loss" in result.stdout
    assert {p.name for p in run.iterdir()} >= {"config.yaml", "checkpoints", "metrics.csv", "wandb", "summary.json"}
    summary = json.loads((run / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["steps"] == 4 and summary["world_size"] == 1 and summary["tokens"] == 4 * 8 * 128
    assert summary["tokens_per_second"] > 0 and 1e6 < summary["params"] < 3e6
    assert Path(summary["last_checkpoint"]).name == "step-000004.ckpt" and Path(summary["best_checkpoint"]).is_file()
    assert (run / "checkpoints" / "last.ckpt").resolve() == Path(summary["last_checkpoint"]).resolve()
    assert summary["unigram_val_entropy"] > 4  # the embedded corpus, an 8192-token BPE
    assert list((run / "wandb").glob("offline-run-*/run-*.wandb")), "no offline W&B run"
    rows = metrics(run)
    assert [int(r["step"]) for r in rows if r.get("val/loss")] == [1, 3]  # every 2 steps and after the last
    config = (run / "config.yaml").read_text()
    assert "vocab_size: 8192" in config and "precision: 32-true" in config  # resolved values, not nulls

    sample = make("sample", f"CKPT={summary['last_checkpoint']}", "PROMPT=def main(", "ARGS=--max_new_tokens=20")
    assert sample.returncode == 0, sample.stderr[-2000:]
    assert sample.stdout.startswith("def main(") and len(sample.stdout) > len("def main(\n")

    again = make("prepare", f"ARGS=--data.cache_dir={data_cache}")
    assert again.returncode == 0 and "(cached)" in again.stdout, again.stdout + again.stderr


@pytest.mark.slow
def test_training_on_shakespeare_with_the_gpt2_tokenizer_learns(tmp_path, shakespeare, gpt2_tokenizer, data_cache):
    run = tmp_path / "run"
    result = run_llm(
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


def fit_args(corpus: Path, run: Path, cache: Path, *extra: str) -> list[str]:
    return corpus_fit(corpus, run, cache, "--trainer.log_every_n_steps=1", "--eval_every=3", *extra)


def train_losses(run: Path) -> dict[int, float]:
    return {int(r["step"]): float(r["train/loss"]) for r in metrics(run) if r.get("train/loss")}


@pytest.mark.slow
def test_resume_continues_exactly_where_an_uninterrupted_run_would_be(tmp_path, code_corpus, data_cache):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert run_llm(*fit_args(code_corpus, whole, data_cache, "--trainer.max_steps=8")).returncode == 0
    # the same run, preempted after 4 of its 8 steps, then continued with RESUME=auto
    stop = '--trainer.callbacks=[{"class_path": "tests.helpers.StopAtStep", "init_args": {"step": 4}}]'
    first = run_llm(*fit_args(code_corpus, parts, data_cache, "--trainer.max_steps=8", stop))
    assert first.returncode == 0, first.stderr[-3000:]
    assert json.loads((parts / "summary.json").read_text())["steps"] == 4
    second = run_llm(*fit_args(code_corpus, parts, data_cache, "--trainer.max_steps=8", "--resume=auto"))
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resuming from {parts}/checkpoints/step-000004.ckpt" in second.stdout
    assert trained_steps(first.stdout) == [1, 2, 3, 4] and trained_steps(second.stdout) == [5, 6, 7, 8]

    expected, got = train_losses(whole), train_losses(parts)
    assert sorted(got) == sorted(expected) == list(range(8)), "metrics.csv lost or repeated steps"
    for step in range(8):
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), f"step {step}"
    assert json.loads((parts / "summary.json").read_text())["steps"] == 8


@pytest.mark.slow
def test_checkpoint_holds_config_and_tokenizer_and_reproduces_the_logits(tmp_path, code_corpus, data_cache):
    run = tmp_path / "run"
    probe = '--trainer.callbacks=[{"class_path": "tests.helpers.EngineProbe"}]'  # the trained model's logits
    assert run_llm(*fit_args(code_corpus, run, data_cache, "--trainer.max_steps=3", probe)).returncode == 0
    loaded = load_for_inference(run / "checkpoints" / "last.ckpt")
    assert loaded.config["model"]["config"]["n_layer"] == 2 and loaded.config["run"] == str(run)
    assert loaded.tokenizer.get_vocab_size() == 512
    text = "def f(x):\n    return x"
    assert loaded.tokenizer.decode(loaded.tokenizer.encode(text).ids) == text
    trained = torch.load(run / "probe-rank0.pt", weights_only=True)  # taken in the training process, at its end
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(trained["idx"]), trained["logits"], rtol=0, atol=1e-6)


def test_loggers_and_callbacks_of_a_yaml_are_added_to_the_runs_own(tmp_path, fixture_text, data_cache):
    # a fork's own logger and callback, in its own config file: honoured beside metrics.csv and W&B
    extra = tmp_path / "extra.yaml"
    extra.write_text(
        "trainer:\n"
        "  logger:\n"
        "    - class_path: lightning.pytorch.loggers.CSVLogger\n"
        f"      init_args: {{save_dir: {tmp_path / 'theirs'}, name: csv}}\n"
        "  callbacks:\n"
        "    - class_path: lightning.pytorch.callbacks.LearningRateMonitor\n"
    )
    run = tmp_path / "run"
    args = corpus_fit(fixture_text, run, data_cache, "--data.vocab_size=300", "--data.val_fraction=0.3")
    result = run_llm(*args, "--config", str(extra), "--trainer.max_steps=2", "--trainer.log_every_n_steps=1")
    assert result.returncode == 0, result.stderr[-3000:]
    with open(run / "metrics.csv", newline="") as f:
        ours = list(csv.DictReader(f))
    (theirs,) = (tmp_path / "theirs" / "csv").glob("version_*/metrics.csv")
    with open(theirs, newline="") as f:
        their_rows = list(csv.DictReader(f))
    assert [r["train/loss"] for r in their_rows if r.get("train/loss")] == [r["train/loss"] for r in ours]
    assert all(r.get("lr-AdamW/pg1") for r in ours)  # the LearningRateMonitor's key, in the run's own log


def test_turning_the_runs_loggers_off_is_refused(tmp_path, fixture_text, data_cache):
    run = tmp_path / "run"
    result = run_llm(*corpus_fit(fixture_text, run, data_cache, "--trainer.logger=false"))
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


def test_the_datamodule_is_chosen_by_config(tmp_path, fixture_text, data_cache):
    (tmp_path / "forkdata.py").write_text(FORK_DATAMODULE)
    run, marker = tmp_path / "run", tmp_path / "marker.txt"
    args = corpus_fit(fixture_text, run, data_cache, "--data.vocab_size=300", "--data.val_fraction=0.3")
    args += ["--data=forkdata.MarkedData", f"--data.marker={marker}", "--trainer.max_steps=2"]
    result = run_llm(*args, env={"PYTHONPATH": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert marker.read_text() == "TrainerFn.FITTING 8 64"  # its own argument, and the linked block size
    assert "class_path: forkdata.MarkedData" in (run / "config.yaml").read_text()
    not_one = run_llm(*args[:-3], "--data=lightning.pytorch.demos.boring_classes.BoringDataModule")
    assert not_one.returncode == 2 and "does not correspond to a subclass of TokenDataModule" in not_one.stderr
