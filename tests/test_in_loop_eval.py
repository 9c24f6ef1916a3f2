"""--eval_tasks=: lm-eval benchmarks scored at each validation of a training run (llm/train/in_loop_eval.py).

The in-loop score of a step is checked against `make eval TASKS=` on that step's checkpoint, scored in
one process: under DDP and ZeRO-3 each rank scores a share of the examples (ZeRO-3 gathering its
partitioned weights at every forward pass), so equal scores mean the shares were scored, gathered and
reduced as one process would."""

from __future__ import annotations

import json
import re
import shutil
import signal

import helpers
import pytest

from llm.observe.metrics import declared, logged_keys
from support import (
    EVAL_LIMIT,
    IN_LOOP_EVAL,
    RUN_ENV,
    TASK_YAML,
    assert_refused,
    column,
    data_args,
    finish,
    llm_here,
    losses,
    make,
    metrics_rows,
    snapshot,
)

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
SCORE = "eval/val_continuation/acc"


def make_eval_score(ckpt, limit: int = EVAL_LIMIT) -> float:
    """make eval TASKS=val_continuation's score of a checkpoint, in one process."""
    args = ("eval", f"--ckpt={ckpt}", "--tasks=val_continuation", f"--limit={limit}", "--wandb=false")
    result = llm_here(*args, env=OFFLINE)
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = [line.split() for line in result.stdout.splitlines() if line.startswith("val_continuation ")]
    assert row[1] == "acc" and row[4] == str(limit)
    return float(row[2])


@pytest.mark.slow  # two 2-process runs: make test runs it, test-fast runs no multi-process run
@pytest.mark.parametrize("strategy", ["ddp", "zero3"])
def test_in_loop_scores_of_two_processes_equal_make_evals_of_the_same_checkpoints(runs, strategy, tmp_path):
    run = runs(strategy)  # 2 processes, --eval_tasks=val_continuation at validations 4, 8 and 12
    scores, seconds = column(run, SCORE), column(run, "perf/eval_seconds")
    assert sorted(scores) == sorted(seconds) == [4, 8, 12]
    assert all(0 <= s <= 1 for s in scores.values()) and all(s > 0 for s in seconds.values())
    # the table shows 4 decimals; on 16 questions a score is a multiple of 1/16
    ckpt = run / "checkpoints" / "step-000012.ckpt"  # ZeRO-3's: a folder of shards, consolidated to score it
    assert make_eval_score(ckpt) == pytest.approx(scores[12], abs=1e-4)
    if strategy == "zero3":  # and the same folder consolidated into one file (make export-fp32), in a run folder
        (tmp_path / "checkpoints").mkdir()
        shutil.copy(run / "config.yaml", tmp_path / "config.yaml")
        consolidated = tmp_path / "checkpoints" / "step-000012.ckpt"
        assert llm_here("export-fp32", f"--ckpt={ckpt}", f"--out={consolidated}").returncode == 0
        assert make_eval_score(consolidated) == pytest.approx(scores[12], abs=1e-4)
    # charted against tokens as every validation metric is, and declared for make plot and the W&B workspace
    rows = metrics_rows(run)
    assert all(rows[step].get("train/tokens") for step in scores)
    logged = {key for row in rows.values() for key, value in row.items() if value} - {"step", "epoch"}
    assert all(map(declared, logged)), sorted(k for k in logged if not declared(k))
    assert logged_keys("benchmarks") - logged_keys() <= logged


@pytest.mark.long  # a second one-process run, besides the canonical one
def test_in_loop_benchmarks_leave_the_training_as_it_was(runs):
    # lm-eval seeds Python's, numpy's and torch's generators; the run's are set back after each eval,
    # so that dropout draws what it would have without them
    dropout = "--model.config.dropout=0.1"
    plain, scored = runs("single", dropout, here=True), runs("single", dropout, *IN_LOOP_EVAL, here=True)
    assert sorted(column(scored, SCORE)) == [4, 8, 12]
    assert losses(scored) == losses(plain) and column(scored, "val/loss") == column(plain, "val/loss")


def test_bad_in_loop_eval_options_are_refused_in_one_line_before_any_work(runs, tmp_path):
    run = tmp_path / "run"
    cases = [
        (["--eval_tasks=val_continuation", "--eval_limit=0"], "eval_limit=0: out of range"),
        (["--eval_tasks=val_continuation", "--eval_fewshot=-1"], "eval_fewshot=-1: out of range"),
        (["--eval_limit=5"], "eval_limit=5: given without eval_tasks"),
        (["--eval_tasks= , "], "eval_tasks=' , ': no task named"),
        ([f"--eval_tasks={tmp_path / 'nope.yaml'}"], f"eval_tasks={tmp_path / 'nope.yaml'}: no such file or folder"),
    ]
    before = snapshot(tmp_path)
    for options, answer in cases:
        assert_refused(llm_here(*runs.args(run, *options, probes=()), env={**RUN_ENV, **OFFLINE}), answer)
    assert snapshot(tmp_path) == before  # no run folder, nothing prepared


# the task's own scoring function stops the run from inside its first in-loop eval, as a scheduler's
# SIGTERM arriving then would: lm-eval loads it from the file beside the task's YAML
STOPPING_TASK = TASK_YAML.replace("metric_list:", "process_results: !function stop.process_results\nmetric_list:")
STOP_PY = """import os
import signal


def process_results(doc, results):
    marker = os.environ["STOP_MARKER"]
    if os.path.exists(marker):  # once: the resumed run scores on
        os.remove(marker)
        os.kill(os.getpid(), signal.SIGTERM)
    scores = [logprob for logprob, _ in results]
    return {"acc": float(scores.index(max(scores)) == doc["label"])}
"""


@pytest.mark.long  # two runs through make, and make plot
def test_a_run_through_make_scores_at_each_validation_survives_a_stop_in_its_eval_and_continues_the_curve(
    tmp_path, code_corpus, data_cache
):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "choice.jsonl").write_text(
        "".join(
            json.dumps({"context": f"x = {i}", "choices": [" +", " (", " )", " ."], "label": 0}) + "\n"
            for i in range(8)
        )
    )
    (tasks / "stopping_choice.yaml").write_text(
        STOPPING_TASK.format(name="stopping_choice", data=tasks / "choice.jsonl")
    )
    (tasks / "stop.py").write_text(STOP_PY)
    marker = tmp_path / "stop-now"
    marker.touch()
    run = tmp_path / "run"
    evals = f"--eval_tasks=val_continuation,{tasks / 'stopping_choice.yaml'} --eval_limit={EVAL_LIMIT}"
    args = f"ARGS={data_args(code_corpus, data_cache)} {evals}"
    env = {**OFFLINE, "WANDB_MODE": "offline", "STOP_MARKER": str(marker)}
    code, out, err = finish(make("train", f"RUN={run}", "MAX_STEPS=6", args, env=env))
    # stopped inside the eval of step 3: its scores are logged, and the run stops as a signal during
    # a step stops it, at the end of that step (4, the one the eval came before)
    assert code == 2 and f"Error {128 + signal.SIGTERM}" in err and not marker.exists(), err[-3000:]
    stopped = re.search(r"^stopped: SIGTERM at step (\d+); saved (\S+); make train .*RESUME=auto$", err, re.M)
    assert stopped and int(stopped.group(1)) == 4 and "Traceback" not in err, err[-3000:]
    assert sorted(column(run, SCORE)) == [3]
    # the command it printed, in this process (what make runs: its run's config.yaml holds the options)
    printed = ["--config", "configs/experiment/default.yaml", "--config", f"{run}/config.yaml", f"--run={run}"]
    resumed = llm_here("fit", *printed, "--trainer.max_steps=9", "--resume=auto", env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "benchmarks at step 6: val_continuation/acc" in resumed.stdout
    assert sorted(column(run, SCORE)) == sorted(column(run, "eval/stopping_choice/acc")) == [3, 6, 9]
    assert make_eval_score(run / "checkpoints" / "step-000009.ckpt") == pytest.approx(column(run, SCORE)[9], abs=1e-4)
    plotted = llm_here("plot", f"--run={run}")
    assert plotted.returncode == 0, plotted.stderr[-3000:]
    (line,) = [line for line in plotted.stdout.splitlines() if line.startswith("benchmarks.png:")]
    assert f"{SCORE} 3" in line and "eval/stopping_choice/acc 3" in line and "perf/eval_seconds 3" in line


@pytest.mark.slow  # two processes
def test_every_rank_runs_as_many_forward_passes_as_the_busiest(tmp_path):
    # under ZeRO-3 a forward pass gathers weights from every rank: a rank with a smaller share that
    # stopped early would leave the others waiting for ever
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(helpers.score_a_share, args=(2, port, str(tmp_path / "rank")), nprocs=2, start_method="spawn")
    reports = [json.loads((tmp_path / f"rank{r}").read_text()) for r in (0, 1)]
    # 3 and 9 requests in batches of 2: 2 and 5 forward passes, the first rank's padded to 5
    assert [r["scored"] for r in reports] == [5, 5]
    # greedy decoding to 2 and 6 new tokens: the context's pass and one per token but the last, on both
    assert [r["generated"] for r in reports] == [7, 7]
    assert [r["gathered"] for r in reports] == [[10, 11], [10, 11]]
    assert reports[0]["objects"] == [{"rank": 0}, {"rank": 1}] and reports[1]["objects"] is None
