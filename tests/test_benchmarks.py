"""make eval TASKS=: benchmarks through lm-evaluation-harness, the checkpoint as lm-eval's model.

The project's model is checked against lm-eval's own `hf` model on the exported transformers folder
of the same checkpoint: two independent implementations of the same requests."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from llm.checkpointing.files import Checkpoint
from support import TASK_YAML, assert_refused, finish, llm_here, make, run_llm, snapshot, wandb_records

# the module's export is made once: its tests stay on one test worker
pytestmark = pytest.mark.xdist_group("benchmarks")

QUESTIONS = [
    ("import ", [" os", " the river", " 42 apples", " ?!"], 0),
    ("def main(", ["):", " blue", " never", " cats"], 0),
    ("for i in ", ["range(", " the morning", " yes", " !!"], 0),
    ("return ", ["None", " oranges", " sky", " ~~"], 0),
    ("class Foo", [":", " sings", " tree", " ??"], 0),
    ("    if x is ", ["None:", " happy", " stone", " ..."], 0),
]
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tasks")
    data = folder / "local_choice.jsonl"
    rows = [{"context": c, "choices": choices, "label": label} for c, choices, label in QUESTIONS]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = folder / "local_choice.yaml"
    path.write_text(TASK_YAML.format(name="local_choice", data=data))
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory, runs) -> tuple[Path, Path]:
    """The canonical one-process run's checkpoint, and its transformers export."""
    ckpt = runs("single") / "checkpoints" / "last.ckpt"
    out = tmp_path_factory.mktemp("export") / "hf"
    result = llm_here("export", f"--ckpt={ckpt}", f"--out={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    return ckpt, out


def requests(kind: str, *arguments: tuple):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(arguments)]


def test_our_model_and_lm_evals_own_agree_on_the_same_checkpoint(exported, task, monkeypatch):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from llm.benchmarks.harness import CheckpointLM

    for name, value in OFFLINE.items():
        monkeypatch.setenv(name, value)
    ckpt, folder = exported
    ours = CheckpointLM.of(Checkpoint(ckpt).load(), batch_size=3)
    theirs = HFLM(pretrained=str(folder), batch_size=3, device="cpu", dtype="float32")
    long_context = "x = 1\n" * 40  # longer than the block of 64 tokens: cut from the left by both
    pairs = [(c + "", choice) for c, choices, _ in QUESTIONS for choice in choices]
    pairs += [("", "import os"), ("print(x) ", "# a trailing space"), (long_context, " y = 2")]
    mine, hf = (
        ours.loglikelihood(requests("loglikelihood", *pairs)),
        theirs.loglikelihood(requests("loglikelihood", *pairs)),
    )
    assert [greedy for _, greedy in mine] == [greedy for _, greedy in hf]
    torch.testing.assert_close(torch.tensor([x for x, _ in mine]), torch.tensor([x for x, _ in hf]), rtol=0, atol=1e-4)
    text = long_context * 3
    (rolling,), (hf_rolling,) = (
        m.loglikelihood_rolling(requests("loglikelihood_rolling", (text,))) for m in (ours, theirs)
    )
    assert rolling == pytest.approx(hf_rolling, abs=1e-3) and rolling < 0
    # the same task scored through lm-eval by each: the same accuracy
    manager = TaskManager(include_path=str(task.parent), include_defaults=False)
    scores = [
        simple_evaluate(model=m, tasks=["local_choice"], task_manager=manager, log_samples=False)["results"]
        for m in (ours, theirs)
    ]
    assert scores[0]["local_choice"]["acc,none"] == scores[1]["local_choice"]["acc,none"]


def test_rolling_loglikelihood_is_make_evals_loss_times_its_tokens(exported, tmp_path):
    from llm.benchmarks.harness import CheckpointLM
    from llm.data.tokenizer import ordinary

    ckpt, _ = exported
    loaded = Checkpoint(ckpt).load()
    tokenizer, block = ordinary(loaded.tokenizer), loaded.model.config.block_size
    # a text of whole blocks: make eval predicts each of its tokens once, as the rolling windows do
    source = Path(__file__).read_text()
    text = next(
        source[:end]
        for end in range(2000, len(source))
        if len(tokenizer.encode(source[:end]).ids) % block == 0 and not source[end - 1].isspace()
    )
    tokens = len(tokenizer.encode(text).ids)
    # an empty document first: make eval's stream starts with its end-of-text token, the rolling
    # windows' first context
    data = tmp_path / "text.jsonl"
    data.write_text(json.dumps({"text": ""}) + "\n" + json.dumps({"text": text}) + "\n")
    result = llm_here("eval", f"--ckpt={ckpt}", f"--text={data}", "--json=true", "--wandb=false")
    assert result.returncode == 0, result.stderr[-3000:]
    evaluated = json.loads(result.stdout.strip().splitlines()[-1])
    assert evaluated["tokens_evaluated"] == tokens
    (rolling,) = CheckpointLM.of(loaded).loglikelihood_rolling(requests("loglikelihood_rolling", (text,)))
    assert -rolling == pytest.approx(evaluated["loss"] * tokens, rel=1e-5)


def test_generation_stops_at_the_tasks_stop_sequence_and_its_token_limit(exported):
    from llm.benchmarks.harness import CheckpointLM

    ckpt, _ = exported
    loaded = Checkpoint(ckpt).load()
    model = CheckpointLM.of(loaded)
    free = model.greedy(model.tok_encode("def "), [], 40)
    assert free and len(model.tok_encode(free)) <= 40
    assert len(model.tok_encode(model.greedy(model.tok_encode("def "), [], 3))) <= 3
    stop = free[len(free) // 2 : len(free) // 2 + 2]
    (cut,) = model.generate_until(requests("generate_until", ("def ", {"until": [stop], "max_gen_toks": 40})))
    assert cut == free[: free.index(stop)]


@pytest.mark.long  # through make, in a process of its own: lm-eval's import (seconds) and the W&B runs
def test_make_eval_tasks_prints_the_scores_and_keeps_them_in_the_run(tmp_path, runs, task):
    run = tmp_path / "run"  # a copy: the scores go into the run's W&B runs and eval/
    shutil.copytree(runs("single"), run, ignore=shutil.ignore_patterns("*.lock"))
    code, out, err = finish(make("eval", f"CKPT={run}", f"TASKS={task}"), timeout=300)
    assert code == 0, err[-3000:]
    (row,) = [line.split() for line in out.splitlines() if line.startswith("local_choice ")]
    assert row[1] == "acc" and 0 <= float(row[2]) <= 1 and row[4] == str(len(QUESTIONS))
    (saved,) = (run / "eval").glob("tasks-step*.json")
    assert f"results: {saved}" in out
    acc = json.loads(saved.read_text())["lm_eval"]["local_choice"]["results"]["local_choice"]["acc,none"]
    assert acc == pytest.approx(float(row[2]), abs=5e-5)  # the table shows 4 decimals
    (eval_run,) = (run / "eval" / "wandb").glob("offline-run-*")
    summary = {}
    for record in wandb_records(eval_run):
        if record["type"] == "summary":
            summary.update(record["summary"]["update"])
    assert summary["eval/local_choice/acc"] == acc


def test_bad_tasks_options_are_refused_in_one_line_before_any_scoring(exported, task, tmp_path):
    ckpt, _ = exported
    taken = tmp_path / "taken.json"
    taken.write_text("{}")
    before = snapshot(tmp_path)
    cases = [
        (["--tasks=", "--wandb=false"], "tasks='': no task named"),
        ([f"--tasks={tmp_path / 'nope.yaml'}"], f"tasks={tmp_path / 'nope.yaml'}: no such file or folder"),
        ([f"--tasks={task}", "--limit=0"], "limit=0: out of range"),
        ([f"--tasks={task}", "--num_fewshot=-1"], "num_fewshot=-1: out of range"),
        ([f"--tasks={task}", f"--out={taken}"], f"out={taken}: already exists"),
        ([f"--tasks={taken}"], f"tasks={taken}: defines no lm-eval task"),
    ]
    for options, answer in cases:
        assert_refused(llm_here("eval", f"--ckpt={ckpt}", *options, env=OFFLINE), answer)
    assert snapshot(tmp_path) == before


@pytest.mark.long  # lm-eval's index of its own ~15,000 task files takes half a minute to build
def test_an_unknown_task_and_one_whose_data_is_not_here_are_named(exported):
    ckpt, _ = exported
    env = {**OFFLINE, "HF_DATASETS_CACHE": os.devnull}
    assert_refused(llm_here("eval", f"--ckpt={ckpt}", "--tasks=hellaswagg", env=env), "did you mean hellaswag")
    assert_refused(
        llm_here("eval", f"--ckpt={ckpt}", "--tasks=arc_easy", env=env),
        "tasks=arc_easy: its data could not be loaded",
        "task YAML over a local file",
    )


def test_the_held_out_continuation_task_is_built_from_the_runs_validation_split(runs, tmp_path):
    run = tmp_path / "run"  # a copy: the task's files go into the run folder
    shutil.copytree(runs("single"), run, ignore=shutil.ignore_patterns("*.lock"))
    ckpt = run / "checkpoints" / "last.ckpt"
    result = llm_here("eval", f"--ckpt={ckpt}", "--tasks=val_continuation", "--limit=20", "--wandb=false", env=OFFLINE)
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = [line.split() for line in result.stdout.splitlines() if line.startswith("val_continuation ")]
    assert row[1] == "acc" and row[4] == "20"
    folder = run / "eval" / "tasks" / "val_continuation"
    questions = [json.loads(line) for line in (folder / "val_continuation.jsonl").read_text().splitlines()]
    assert len(questions) > 20 and all(len(q["choices"]) == 4 and 0 <= q["label"] < 4 for q in questions)
    assert len({q["label"] for q in questions}) == 4  # the true continuation is not always first
    # a passage followed by its true continuation is the split's text; the other choices are not
    import numpy as np
    from tokenizers import Tokenizer

    from llm.config import RunConfig
    from llm.data.prepare import load_meta, prepared_dir

    data = prepared_dir(RunConfig.from_yaml(run / "config.yaml").data)
    meta = load_meta(data)
    tokens = np.fromfile(data / meta["splits"]["val"]["file"], dtype=meta["dtype"])[: meta["splits"]["val"]["tokens"]]
    text = Tokenizer.from_file(str(data / meta["tokenizer"])).decode(tokens.tolist())
    for q in questions[:10]:
        following = [q["context"] + choice in text for choice in q["choices"]]
        assert following[q["label"]] and following.count(True) == 1


@pytest.mark.long  # a few hundred steps on tiny Shakespeare
def test_a_trained_model_beats_chance_on_its_held_out_continuations_and_an_untrained_one_does_not(
    tmp_path, shakespeare
):
    from support import TINY

    scores = {}
    for steps in (1, 300):
        run = tmp_path / f"run-{steps}"
        args = ["--config", "configs/experiment/default.yaml", *TINY, f"--data.text={shakespeare}"]
        args += [f"--data.cache_dir={tmp_path / 'data'}", f"--trainer.max_steps={steps}", f"--run={run}"]
        args += [
            "--eval_every=1000",
            "--model.optimizer.lr=3e-3",
            "--model.optimizer.warmup_steps=20",
            "--data.vocab_size=512",
        ]
        trained = run_llm("fit", *args)
        assert trained.returncode == 0, trained.stderr[-3000:]
        result = run_llm("eval", f"--ckpt={run}", "--tasks=val_continuation", "--wandb=false", env=OFFLINE)
        assert result.returncode == 0, result.stderr[-3000:]
        (row,) = [line.split() for line in result.stdout.splitlines() if line.startswith("val_continuation ")]
        scores[steps] = float(row[2])
    # 200 questions of 4 choices: chance is 0.25, with a standard error of about 0.03
    assert scores[1] < 0.35 and scores[300] > 0.4, scores
