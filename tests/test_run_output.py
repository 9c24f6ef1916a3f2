"""What a run says and records about itself, step by step: the tokenizer it names, the steps it logs
(every log_every_n_steps and the last, by one rule: llm/train/clock.py), the order its callbacks run
in, and the options its --help lists."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

from support import TINY, callbacks, corpus_fit, llm_here, trained_steps


def metrics(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_the_tokenizer_printed_is_the_one_this_run_was_given(tmp_path, fixture_text, fixture_tokenizer):
    # prepared data is cached by content: a second run with the same tokenizer at another path finds
    # the first one's folder, whose meta.json names the first path
    cache, lines = tmp_path / "data", []
    for name in ("first", "second"):
        tokenizer = tmp_path / name / "tokenizer.json"
        tokenizer.parent.mkdir()
        shutil.copy(fixture_tokenizer, tokenizer)
        args = ["fit", "--config", "configs/experiment/default.yaml", *TINY, f"--data.text={fixture_text}"]
        args += [f"--data.tokenizer={tokenizer}", f"--data.cache_dir={cache}", f"--run={tmp_path / name / 'run'}"]
        result = llm_here(*args, "--trainer.max_steps=1", "--data.val_batches=1", env={"WANDB_MODE": "disabled"})
        assert result.returncode == 0, result.stderr[-3000:]
        lines += [line for line in result.stdout.splitlines() if line.startswith("tokenizer: ")]
    assert [line.split(";")[0] for line in lines] == [
        f"tokenizer: {tmp_path}/{n}/tokenizer.json" for n in ("first", "second")
    ]
    assert len(list(cache.iterdir())) == 1


def test_the_last_step_is_logged_and_the_callbacks_run_in_their_stated_order(tmp_path, fixture_text):
    # steps 5 and 7 are logged: every 5, and the last (llm/train/clock.py); 7 once lacked perf/ and its line
    run = tmp_path / "run"
    args = corpus_fit(fixture_text, run, tmp_path / "data", "--trainer.max_steps=7")
    args += ["--trainer.log_every_n_steps=5", "--eval_every=100", "--data.val_batches=1", callbacks("CallbackOrder")]
    result = llm_here(*args, env={"WANDB_MODE": "disabled"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert trained_steps(result.stdout) == [5, 7]
    logged = {int(row["step"]): row for row in metrics(run) if row.get("train/loss")}
    assert sorted(logged) == [5, 7]
    for step in (5, 7):
        assert float(logged[step]["perf/tokens_per_sec"]) > 0 and float(logged[step]["mem/peak_max"]) > 0
        assert logged[step]["train/skipped_steps"] == "0.0"
    # the user's callbacks first, then the run's as run_callbacks lists them, and Lightning moves the
    # Checkpoint subclass to the end: a validation's line is printed before its checkpoint is written
    order = (run / "callback-order.txt").read_text().split()
    assert order == ["CallbackOrder", "PerformanceMonitor", "NonFiniteSteps", "CollectiveTimeout", "ValidateAtEnd"] + [
        "LoggingStepOnResume",
        "RunInfo",
        "PlainLines",
        "Checkpoints",
    ]


def test_every_run_option_is_an_option_with_the_help_its_dataclass_gives():
    # RunOptions (llm/config.py) is the one list: a field added there is an option of make train
    from dataclasses import fields

    from llm.config import RunOptions
    from llm.train.cli import option_help

    helps = option_help(RunOptions)
    answer = llm_here("fit", "--help")
    assert answer.returncode == 0, answer.stderr[-2000:]
    text = " ".join(answer.stdout.split())
    for field in fields(RunOptions):
        assert helps.get(field.name), f"RunOptions.{field.name} has no help in its docstring"
        if field.name != "seed_everything":  # LightningCLI's own option
            assert f"--{field.name} " in text and helps[field.name][:40] in text, field.name
