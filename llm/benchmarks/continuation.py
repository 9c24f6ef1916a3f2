"""`val_continuation`: a multiple-choice task any run can score offline, built from its own
validation split. Each question is a passage of the split and four continuations of it, each two
tokens long: the true one and three others taken from elsewhere in the split; chance is 1/4.
A model that has learned anything of its corpus prefers the continuation that follows.

The task is an ordinary lm-eval task (a YAML over a local JSONL file, written into the run folder's
eval/tasks/), so it is scored through the same path as every other task.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from llm import atomic

NAME = "val_continuation"
CHOICES = 4
QUESTIONS = 200  # at most; fewer where the split is short
CONTEXT_TOKENS = 48  # at most: the block size leaves room for the answer
# the next two tokens: the longer a continuation, the more its score is the frequency of its tokens
# rather than their fit to the passage (measured on tiny Shakespeare, docs/evaluation.md)
ANSWER_TOKENS = 2

TASK_YAML = f"""# built by make eval TASKS={NAME} from this run's validation split (llm/benchmarks/continuation.py)
task: {NAME}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {{data}}
test_split: test
output_type: multiple_choice
doc_to_text: context  # a column's name: its value as it is (a template would be parsed as Python)
doc_to_choice: choices
doc_to_target: label
target_delimiter: ""  # the continuation follows the passage as the text has it (lm-eval's default adds a space)
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1
"""


def questions(tokens: np.ndarray, tokenizer: Tokenizer, block_size: int, seed: int) -> list[dict]:
    """The task's questions from a split's tokens, the same for the same split and seed."""
    context = min(CONTEXT_TOKENS, max(block_size - ANSWER_TOKENS, 1))
    span = context + ANSWER_TOKENS
    starts = np.arange(0, len(tokens) - span + 1, span)  # passages that do not overlap
    if len(starts) < CHOICES:
        return []
    rng = np.random.default_rng(seed)

    def answer(start: int) -> str:
        return tokenizer.decode(tokens[start + context : start + span].tolist())

    rows = []
    for i in rng.permutation(len(starts))[:QUESTIONS]:
        choices = [answer(int(starts[i]))]
        for j in rng.permutation(len(starts)):  # continuations of other passages, each unlike the rest
            if len(choices) == CHOICES:
                break
            if (text := answer(int(starts[j]))) not in choices:
                choices.append(text)
        if len(choices) < CHOICES:
            continue
        label = int(rng.integers(CHOICES))
        choices[0], choices[label] = choices[label], choices[0]
        start = int(starts[i])
        rows.append(
            {"context": tokenizer.decode(tokens[start : start + context].tolist()), "choices": choices, "label": label}
        )
    return rows


def write_task(folder: Path, tokens: np.ndarray, tokenizer: Tokenizer, block_size: int, seed: int) -> int:
    """The task's YAML and JSONL in `folder` (written again only where they differ); its questions."""
    rows = questions(tokens, tokenizer, block_size, seed)
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{NAME}.jsonl"
    files = {data: "".join(json.dumps(row) + "\n" for row in rows), folder / f"{NAME}.yaml": ""}
    files[folder / f"{NAME}.yaml"] = TASK_YAML.format(data=json.dumps(str(data.resolve())))
    for path, text in files.items():
        if not path.is_file() or path.read_text() != text:
            atomic.write_text(path, text, shared=True)  # every rank of a run builds it (--eval_tasks=)
    return len(rows)
