"""make eval: loss, perplexity and bits per byte of a checkpoint on its run's validation blocks or on
any text (local files or a dataset through the Hub's loading path), the result in the run's W&B run,
and progress a log file can show."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from llm.checkpointing.files import Checkpoint
from llm.data.tokenizer import ordinary
from support import STEPS, assert_refused, llm_here, metrics_rows, run_llm, wandb_records

# the module's evaluated run is made once: its tests stay on one test worker
pytestmark = pytest.mark.xdist_group("evaluate")


@pytest.fixture(scope="module")
def evaluated_run(runs):
    """A run of its own (evaluation adds to its W&B run), the canonical one for 4 steps."""
    return runs("evaluated", "--trainer.max_steps=4", probes=(), here=True)


def eval_json(*args: str, here: bool = True) -> dict:
    result = (llm_here if here else run_llm)("eval", *args, "--json=true")
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_eval_over_the_runs_blocks_reports_the_loss_the_run_logged(evaluated_run):
    ckpt = evaluated_run / "checkpoints" / "last.ckpt"
    logged = float(metrics_rows(evaluated_run)[4]["val/loss"])  # the validation after the last step, step 4
    result = eval_json(f"--ckpt={ckpt}", "--blocks=run", here=False)  # make eval as a user runs it, W&B included
    assert result["step"] == 4 and result["loss"] == pytest.approx(logged, abs=1e-4)
    assert result["evaluated"] == "the run's 8 validation blocks (those of its val/loss)"
    whole = eval_json(f"--ckpt={ckpt}", "--wandb=false")
    assert whole["evaluated"].startswith("the whole validation split, ") and whole["tokens_evaluated"] > 16 * 64
    # the run's W&B run got the result, and so did a W&B run of job_type eval in its group
    records = b"".join(p.read_bytes() for p in (evaluated_run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert b"eval/loss" in records
    (eval_run,) = (evaluated_run / "eval" / "wandb").glob("offline-run-*")
    eval_records = wandb_records(eval_run)
    (header,) = [r["run"] for r in eval_records if r["type"] == "run"]
    assert header["job_type"] == "eval" and header["run_group"] == "default"
    assert header["display_name"] == f"{evaluated_run.name}-eval-step4"
    # a run of its own: synced, it would otherwise merge into the training run
    assert header["run_id"] != (evaluated_run / "wandb" / "run_id").read_text().strip()
    summary = {}
    for r in eval_records:
        if r["type"] == "summary":
            summary.update(r["summary"]["update"])
    assert summary["eval/loss"] == pytest.approx(result["loss"]) and summary["eval/step"] == 4


def test_eval_on_any_text_reports_bits_per_byte_from_its_counts(evaluated_run, tmp_path):

    text = tmp_path / "notes.txt"
    text.write_text("def greet(name):\n    return f'hello {name}'\n" * 300 + "é ü\n")
    result = eval_json(f"--ckpt={evaluated_run}/checkpoints/last.ckpt", f"--text={text}", "--wandb=false")
    ours = Checkpoint(evaluated_run / "checkpoints" / "last.ckpt").load()
    assert result["bytes"] == len(text.read_bytes())
    assert result["tokens"] == len(ours.tokenizer.encode(text.read_text()).ids) + 1  # and its end-of-text
    assert result["bpb"] == pytest.approx(result["loss"] * result["tokens"] / (result["bytes"] * math.log(2)))
    assert result["evaluated"] == "text=notes (1 file(s))"
    assert result["tokens_evaluated"] == (result["tokens"] - 1) // 64 * 64


def test_eval_of_a_checkpoint_that_does_not_exist(tmp_path):
    assert_refused(llm_here("eval", f"--ckpt={tmp_path}/none.ckpt"), f"ckpt={tmp_path}/none.ckpt: no such checkpoint")


def test_eval_on_a_dataset_through_the_hub_loading_path(evaluated_run, tmp_path):
    folder = tmp_path / "dataset"  # a local folder goes through the same datasets.load_dataset call as the Hub
    folder.mkdir()
    rows = [{"text": f"def f{i}(x):\n    return x * {i}\n"} for i in range(50)]
    (folder / "part.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ckpt = f"--ckpt={evaluated_run}/checkpoints/last.ckpt"
    result = eval_json(ckpt, f"--hf={folder}", "--hf_split=train", "--wandb=false")
    assert result["evaluated"] == "hf=dataset (train)" and result["bytes"] == sum(len(r["text"]) for r in rows)
    assert result["tokens"] == sum(len(Checkpoint(ckpt[7:]).load().tokenizer.encode(r["text"]).ids) + 1 for r in rows)


@pytest.mark.slow
def test_eval_over_the_blocks_of_a_two_process_run_reports_the_loss_it_logged(runs):
    run = runs("zero2")  # 2 ranks validated on 2 x 2 x 4 blocks; a ZeRO folder is read consolidated
    logged = float(metrics_rows(run)[STEPS]["val/loss"])
    result = eval_json(f"--ckpt={run}/checkpoints/last.ckpt", "--blocks=run", "--wandb=false")
    assert result["evaluated"] == "the run's 16 validation blocks (those of its val/loss)"
    assert result["loss"] == pytest.approx(logged, abs=1e-4)


def test_eval_reads_a_text_longer_than_one_chunk_into_the_tokens_of_the_whole(runs, tmp_path, monkeypatch):
    from llm.tools import evaluate
    from llm.tools.evaluate import TextStream

    monkeypatch.setattr(evaluate, "TEXT_CHUNK_BYTES", 4096)  # a MiB in use: many cuts in a small text
    # Python source: indented lines, blank lines and runs of spaces that a careless cut would split
    source = "\n\n".join(p.read_text() for p in sorted(Path(json.__file__).parent.glob("*.py")))
    text = tmp_path / "long.txt"
    text.write_text(source)
    assert text.stat().st_size > 10 * 4096
    loaded = Checkpoint(runs("single") / "checkpoints" / "last.ckpt").load()
    stream = TextStream(loaded, str(text), None, "validation", "text")
    streamed = list(stream.tokens_stream())  # what make eval --text feeds the model, read a MiB at a time
    whole = ordinary(loaded.tokenizer).encode(text.read_text()).ids + [loaded.eot_id]
    assert len(streamed) == len(whole) and streamed == whole
    assert (stream.counts.tokens, stream.counts.bytes) == (len(whole), text.stat().st_size)


def test_eval_of_a_text_quoting_end_of_text_reads_it_as_text(evaluated_run, tmp_path):
    text = tmp_path / "quoting.txt"
    text.write_text("tokenizer.encode('<|endoftext|>') marks the end of a document.\n" * 40)
    result = eval_json(f"--ckpt={evaluated_run}/checkpoints/last.ckpt", f"--text={text}", "--wandb=false")
    loaded = Checkpoint(evaluated_run / "checkpoints" / "last.ckpt").load()
    ids = ordinary(loaded.tokenizer).encode(text.read_text()).ids
    assert loaded.eot_id not in ids and result["tokens"] == len(ids) + 1  # one end-of-text: after the document


def test_eval_of_a_text_shows_its_progress_in_lines_with_an_estimate_and_stops_at_max_tokens(evaluated_run, tmp_path):
    # stderr is no terminal here: lines, as in a log file; the first after five batches says the time left
    text = tmp_path / "notes.txt"
    text.write_text("def greet(name):\n    return f'hello {name}'\n" * 3000)
    args = (f"--ckpt={evaluated_run}/checkpoints/last.ckpt", f"--text={text}", "--max_tokens=3000", "--json=true")
    answer = llm_here("eval", *args, "--wandb=false")
    assert answer.returncode == 0, answer.stderr[-3000:]
    result = json.loads(answer.stdout.splitlines()[-1])
    assert 3000 <= result["tokens_evaluated"] < 3000 + 8 * 64  # the batch that passed it is the last
    progress = [line for line in answer.stderr.splitlines() if line.startswith("evaluating text=notes (1 file(s)): ")]
    assert len(progress) == 2 and "\r" not in answer.stderr, answer.stderr
    first, last = (re.search(r": +(\d+)% (\S+)/(\S+) \[(\S+?)(<\S+)?, ", line).groups() for line in progress)
    assert first[4] and first[2] == last[2] == f"{len(text.read_bytes()) / 1024:.3g}k"  # bytes: of the whole text
    assert int(first[0]) < int(last[0]) < 100
    assert_refused(llm_here("eval", *args[:2], "--max_tokens=0"), "max_tokens=0: out of range")
