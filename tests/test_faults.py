"""Runs that survive being killed and bad numbers: kill -9 at a random step and during a save,
SIGTERM, a full disk, NaN gradients, each compared with the uninterrupted run it must equal."""

from __future__ import annotations

import csv
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import llm.module  # noqa: F401  (registers the dataclasses a checkpoint holds with weights-only loading)
from conftest import REPO, corpus_fit, run_llm, trained_steps

STEPS = 12
ZERO2 = ("--trainer.devices=2", "--deepspeed=zero2")


def fit_args(corpus: Path, run: Path, cache: Path, *extra: str) -> list[str]:
    return corpus_fit(
        corpus,
        run,
        cache,
        "--trainer.log_every_n_steps=1",
        f"--trainer.max_steps={STEPS}",
        "--eval_every=4",
        "--save_every=2",
        *extra,
    )


def callbacks(*specs: str) -> str:
    return "--trainer.callbacks=[" + ", ".join(specs) + "]"


RECORD = '{"class_path": "tests.helpers.BatchRecord"}'


def losses(run: Path) -> dict[int, float]:
    with open(run / "metrics.csv", newline="") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def batches(run: Path, rank: int = 0) -> list[tuple[int, int]]:
    path = run / f"batches-rank{rank}.txt"
    return [tuple(int(x) for x in line.split()) for line in path.read_text().splitlines()] if path.exists() else []


def start(args: list[str]) -> subprocess.Popen:
    """The entry point in a session of its own, so that killing its process group kills the job only.
    Its stderr goes to a file: unread, a pipe would fill up and block the job."""
    stderr = tempfile.TemporaryFile("w+")
    process = subprocess.Popen(
        [sys.executable, "-m", "llm", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        start_new_session=True,
    )
    process.stderr_file = stderr
    return process


def finish(process: subprocess.Popen, out: str = "") -> tuple[str, str]:
    """Wait for the process; its whole stdout (after `out`, already read) and stderr."""
    rest, _ = process.communicate(timeout=600)
    process.stderr_file.seek(0)
    return out + rest, process.stderr_file.read()


def signal_at(process: subprocess.Popen, step: int, send) -> tuple[str, str]:
    """Call send(process) once the run prints its progress line of `step`; return its stdout and stderr."""
    out = []
    for line in process.stdout:
        out.append(line)
        if re.match(rf"^step {step}/\d+ \| loss ", line):
            send(process)
            break
    return finish(process, "".join(out))


def kill_job(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGKILL)  # every process of the job at once, as a lost node


def newest_checkpoint(run: Path) -> int:
    """The step of the newest complete checkpoint the killed job left."""
    return max(int(p.name[5:11]) for p in (run / "checkpoints").glob("step-*.ckpt"))


def resumed_step(stdout: str) -> int:
    return int(re.search(r"resuming from \S+/step-(\d+)\.ckpt", stdout).group(1))


@pytest.fixture(scope="module")
def whole(tmp_path_factory, code_corpus, data_cache):
    """Uninterrupted runs, by extra arguments: the reference every interrupted run must equal."""
    runs = {}

    def get(*extra: str) -> Path:
        if extra not in runs:
            run = tmp_path_factory.mktemp("whole") / "run"
            result = run_llm(*fit_args(code_corpus, run, data_cache, *extra, callbacks(RECORD)))
            assert result.returncode == 0, result.stderr[-3000:]
            runs[extra] = run
        return runs[extra]

    return get


def assert_continues_exactly(whole_run: Path, run: Path, first_batches: dict, resumed_from: int, ranks: int, tol):
    expected, got = losses(whole_run), losses(run)
    assert sorted(got) == sorted(expected) == list(range(STEPS)), "metrics.csv lost or repeated steps"
    for step in range(STEPS):
        assert got[step] == pytest.approx(expected[step], rel=0, abs=tol), f"step {step} (resumed at {resumed_from})"
    for rank in range(ranks):
        # what the model trained on: the first process's batches before the checkpoint, then the second's
        before = [b for b in first_batches[rank] if b[0] < resumed_from]
        after = batches(run, rank)[len(first_batches[rank]) :]
        assert before + after == batches(whole_run, rank), f"rank {rank}: a sample was repeated or skipped"


def test_kill_9_at_a_random_step_resumes_exactly(tmp_path, code_corpus, data_cache, whole):
    step = random.randint(3, STEPS - 1)
    run = tmp_path / "run"
    args = fit_args(code_corpus, run, data_cache, callbacks(RECORD))
    process = start(args)
    signal_at(process, step, kill_job)
    assert process.returncode == -signal.SIGKILL
    first, newest = {0: batches(run)}, newest_checkpoint(run)
    resumed = run_llm(*args, "--resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    at = resumed_step(resumed.stdout)
    assert at == newest >= step - 2, f"killed after step {step}, resumed from {at}: not the newest checkpoint"
    assert trained_steps(resumed.stdout)[0] == at + 1
    # one process, fp32 on CPU: the same operations on the same data give the same bits
    assert_continues_exactly(whole(), run, first, at, ranks=1, tol=1e-6)
    wandb_ids = {p.name.rsplit("-", 1)[-1] for p in (run / "wandb").glob("offline-run-*")}
    assert len(wandb_ids) == 1, f"the resumed run started another W&B run: {wandb_ids}"


@pytest.mark.slow
def test_kill_9_of_a_two_process_zero2_job_resumes_exactly(tmp_path, code_corpus, data_cache, whole):
    extra = ZERO2
    step = random.randint(3, STEPS - 1)
    run = tmp_path / "run"
    args = fit_args(code_corpus, run, data_cache, *extra, callbacks(RECORD))
    process = start(args)
    signal_at(process, step, kill_job)
    first, newest = {r: batches(run, r) for r in (0, 1)}, newest_checkpoint(run)
    resumed = run_llm(*args, "--resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    at = resumed_step(resumed.stdout)
    assert at == newest >= step - 2
    # ZeRO-2 restores the exact fp32 partitions of weights and Adam moments, and gloo's all-reduce
    # adds in a fixed order for a fixed world size: the continued run is the same computation, so
    # the tolerance is fp32 round-off only (1e-6 on a loss of ~6), not an approximation of the state
    assert_continues_exactly(whole(*extra), run, first, at, ranks=2, tol=1e-6)


@pytest.mark.parametrize(
    "extra", [pytest.param((), id="file"), pytest.param(ZERO2, id="zero2-folder", marks=pytest.mark.slow)]
)
def test_kill_during_a_save_leaves_the_previous_checkpoint_to_resume(tmp_path, code_corpus, data_cache, whole, extra):
    run = tmp_path / "run"
    breaks = '{"class_path": "tests.helpers.BreakSave", "init_args": {"step": 6, "how": "kill"}}'
    first = start(fit_args(code_corpus, run, data_cache, *extra, callbacks(RECORD, breaks)))  # kills its group
    _, err = finish(first)
    assert first.returncode == -signal.SIGKILL, err[-3000:]
    folder = run / "checkpoints"
    assert not (folder / "step-000006.ckpt").exists()
    assert os.readlink(folder / "last.ckpt") == "step-000004.ckpt"
    firsts = {r: batches(run, r) for r in range(2 if extra else 1)}
    resumed = run_llm(*fit_args(code_corpus, run, data_cache, *extra, callbacks(RECORD), "--resume=auto"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed_step(resumed.stdout) == 4
    assert not list(folder.glob("*.partial")), "a killed save's remains were left behind"
    assert_continues_exactly(whole(*extra), run, firsts, 4, ranks=len(firsts), tol=1e-6)


def test_sigterm_saves_at_the_step_boundary_then_resume_continues(tmp_path, code_corpus, data_cache, whole):
    run = tmp_path / "run"
    args = fit_args(code_corpus, run, data_cache, callbacks(RECORD))
    process = start(args)
    out, err = signal_at(process, 3, lambda p: p.send_signal(signal.SIGTERM))
    assert process.returncode == 128 + signal.SIGTERM, err[-3000:]
    stopped = re.search(r"^stopped: SIGTERM at step (\d+); saved (\S+); make train RUN=\S+ RESUME=auto$", err, re.M)
    assert stopped, err[-3000:]
    at, saved = int(stopped.group(1)), Path(stopped.group(2))
    assert saved.name == f"step-{at:06d}.ckpt" and saved.is_file() and trained_steps(out)[-1] == at
    first = {0: batches(run)}
    resumed = run_llm(*args, "--resume=auto")
    assert resumed.returncode == 0 and resumed_step(resumed.stdout) == at, resumed.stderr[-3000:]
    assert_continues_exactly(whole(), run, first, at, ranks=1, tol=1e-6)


def test_a_second_signal_exits_at_once(tmp_path, code_corpus, data_cache):
    def twice(process):  # two different signals: the kernel merges a pending signal with its repeat
        process.send_signal(signal.SIGTERM)
        process.send_signal(signal.SIGUSR1)

    process = start(fit_args(code_corpus, tmp_path / "run", data_cache))
    _, err = signal_at(process, 2, twice)
    # both are pending when Python's handlers run, and the kernel delivers the lower number first
    second = signal.Signals(process.returncode - 128)
    assert second in (signal.SIGTERM, signal.SIGUSR1), err[-3000:]
    assert f"{second.name}, the second stop signal: exiting now, without a checkpoint" in err


def test_disk_full_during_a_save_stops_in_one_line_and_keeps_the_previous_checkpoint(tmp_path, code_corpus, data_cache):
    run = tmp_path / "run"
    breaks = '{"class_path": "tests.helpers.BreakSave", "init_args": {"step": 4, "how": "disk_full"}}'
    result = run_llm(*fit_args(code_corpus, run, data_cache, callbacks(breaks)))
    assert result.returncode == 1, result.stderr[-3000:]
    stopped = [line for line in result.stderr.splitlines() if line.startswith("stopped: ")]
    folder = run / "checkpoints"
    assert stopped == [
        f"stopped: checkpoint {folder}/step-000004.ckpt: No space left on device while saving; the previous "
        f"checkpoint ({folder}/step-000002.ckpt) is intact; free space in {folder} and continue with RESUME=auto"
    ]
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt", "step-000002.ckpt"]
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 2


def poison(steps) -> str:
    return callbacks(json.dumps({"class_path": "tests.helpers.PoisonLoss", "init_args": {"steps": list(steps)}}))


def weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)["state_dict"]


@pytest.mark.parametrize("fused", ["false", "true"])
def test_a_nan_gradient_skips_its_step_and_is_counted(tmp_path, code_corpus, data_cache, fused):
    run = tmp_path / "run"
    args = fit_args(code_corpus, run, data_cache, poison([5]), "--save_every=1", "--keep_last=20")
    result = run_llm(*args, f"--model.optimizer.fused={fused}", "--trainer.max_steps=7")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warning: step 6: 1 optimizer step(s) skipped" in result.stdout
    # step 6 (the sixth optimizer step) changed nothing: neither weights nor Adam's state
    before, after = (torch.load(run / f"checkpoints/step-{s:06d}.ckpt", weights_only=True) for s in (5, 6))
    for key, value in before["state_dict"].items():
        assert torch.equal(value, after["state_dict"][key]), key
    states = before["optimizer_states"][0]["state"], after["optimizer_states"][0]["state"]
    for param, state in states[0].items():
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(state[name], states[1][param][name]), (param, name)
    with open(run / "metrics.csv", newline="") as f:
        skipped = {int(r["step"]): float(r["train/skipped_steps"]) for r in csv.DictReader(f)}
    assert [skipped[s] for s in range(7)] == [0, 0, 0, 0, 0, 1, 1]
    assert all(torch.isfinite(v).all() for v in weights(run / "checkpoints" / "last.ckpt").values())


def test_too_many_nan_steps_in_a_row_stop_the_run_with_the_last_good_checkpoint(tmp_path, code_corpus, data_cache):
    run = tmp_path / "run"
    result = run_llm(*fit_args(code_corpus, run, data_cache, poison(range(4, STEPS)), "--max_skipped_steps=2"))
    assert result.returncode == 1, result.stderr[-3000:]
    assert re.search(r"^stopped: 3 optimizer steps in a row had a non-finite gradient norm", result.stderr, re.M)
    assert "Traceback" not in result.stderr
    assert "by step 7;" in result.stderr  # steps 5, 6 and 7 were skipped; it stopped at the third
    last = run / "checkpoints" / "last.ckpt"
    good = weights(run / "checkpoints" / "step-000004.ckpt")
    for key, value in weights(last).items():
        assert torch.isfinite(value).all() and torch.equal(value, good[key]), key


@pytest.mark.slow
def test_deepspeed_skips_a_nan_step_itself_and_it_is_counted(tmp_path, code_corpus, data_cache):
    run = tmp_path / "run"
    args = fit_args(code_corpus, run, data_cache, poison([5]), "--deepspeed=zero2", "--trainer.max_steps=7")
    result = run_llm(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(run / "metrics.csv", newline="") as f:
        rows = {int(r["step"]): r for r in csv.DictReader(f)}
    assert [float(rows[s]["train/skipped_steps"]) for s in range(7)] == [0, 0, 0, 0, 0, 1, 1]
    assert rows[5]["train/grad_norm"] == "inf"  # DeepSpeed's report of the step it skipped
    assert all(float(rows[s]["train/loss"]) < 20 for s in range(7))
