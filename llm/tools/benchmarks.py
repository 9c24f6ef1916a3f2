"""Downstream benchmarks of a checkpoint through EleutherAI's lm-evaluation-harness (lm-eval):
`make eval CKPT=... TASKS=hellaswag,arc_easy,path/to/task.yaml`.

The model enters lm-eval as `CheckpointLM`, a subclass of its `LM` registered as "llm-checkpoint":
this project's Transformer and the tokenizer the checkpoint carries, scoring lm-eval's three kinds
of request (log-likelihood of a continuation, rolling log-likelihood of a text, greedy generation
up to a stop sequence). Tasks are lm-eval's own (by name) or a user's (task YAML files and folders
of them, lm-eval's include_path), run the same way.
"""

from __future__ import annotations

import difflib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from lm_eval import simple_evaluate
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.tasks import TaskManager
from lm_eval.utils import get_rolling_token_windows, handle_non_serializable, make_disjoint_window

from llm import bars
from llm.checkpointing.files import Loaded
from llm.data.tokenizer import ordinary
from llm.errors import ConfigError, exception_line
from llm.model import KVCache, Transformer

LM_NAME = "llm-checkpoint"
TASK_FILES = (".yaml", ".yml")


@register_model(LM_NAME)
class CheckpointLM(LM):
    """A checkpoint as lm-eval's model: requests scored in batches, longest first (as lm-eval's own
    models order them, so that a batch's padding is short and the first batch shows the peak
    memory), each context cut from the left to the model's block size."""

    def __init__(self, loaded: Loaded, batch_size: int = 8, device: str = "cpu"):
        super().__init__()
        self.model, self.eot = loaded.model, loaded.eot_id
        self.tokenizer = ordinary(loaded.tokenizer)  # a text that quotes <|endoftext|> is its characters
        self.block, self.batch_size, self.where = loaded.model.config.block_size, batch_size, device

    def tok_encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation tokenized together, as lm-eval's models do: the continuation's
        tokens are the whole's after the context's, with the context's trailing spaces moved to it
        (a space is a token's start in a byte-level BPE). An empty context is the end-of-text token."""
        if not context:
            return [self.eot], self.tok_encode(continuation)
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, head = self.tok_encode(context + continuation), self.tok_encode(context)
        return head, whole[len(head) :]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self.encode_pair(*request.args) for request in requests]
        return self.score(pairs, "log-likelihoods", disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """A whole text's log-likelihood, in disjoint windows of block_size predicted tokens (each
        with as much of the text before it as fits), the first predicted from the end-of-text token."""
        pairs, owner = [], []
        for i, request in enumerate(requests):
            (text,) = request.args
            windows = get_rolling_token_windows(self.tok_encode(text), self.eot, self.block, context_len=1)
            for window in map(make_disjoint_window, windows):
                pairs.append(window)
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self.score(pairs, "rolling log-likelihoods", disable_tqdm), strict=True):
            totals[i] += logprob
        return totals

    @torch.no_grad()
    def score(self, pairs: list[tuple[list[int], list[int]]], what: str, quiet: bool) -> list[tuple[float, bool]]:
        """(log-probability of the continuation, whether greedy decoding gives it) for each
        (context, continuation) of token ids."""
        # what the model reads (the last block_size tokens before the end) and how many it predicts
        rows = []
        for context, continuation in pairs:
            whole = (context + continuation)[-(self.block + 1) :]
            rows.append((whole, min(len(continuation), len(whole) - 1)))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        progress = bars.bar(desc=f"scoring {what}", total=len(rows), unit="req", disable=quiet)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            width = max(len(rows[i][0]) for i in batch) - 1
            # padded on the right: a causal model's earlier positions never see the padding
            tokens = torch.full((len(batch), width), self.eot, dtype=torch.long)
            for j, i in enumerate(batch):
                inputs = rows[i][0][:-1]
                tokens[j, : len(inputs)] = torch.tensor(inputs)
            logprobs = self.model(tokens.to(self.where)).float().log_softmax(-1).cpu()
            for j, i in enumerate(batch):
                whole, n = rows[i]
                end = len(whole) - 1
                target = torch.tensor(whole[end + 1 - n :])
                predicted = logprobs[j, end - n : end]
                logprob = predicted.gather(-1, target[:, None]).sum().item()
                results[i] = (logprob, bool((predicted.argmax(-1) == target).all()))
            progress.update(len(batch))
        progress.close()
        return results

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, each up to its task's stop sequences or max_gen_toks tokens (256 when
        the task gives none). One request at a time: the Transformer takes no padding mask."""
        answers = []
        progress = bars.bar(desc="generating", total=len(requests), unit="req", disable=disable_tqdm)
        for request in requests:
            context, options = request.args
            until = options.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            limit = int(options.get("max_gen_toks", 256))
            answers.append(self.greedy(self.tok_encode(context) or [self.eot], until, limit))
            progress.update(1)
        progress.close()
        return answers

    def greedy(self, context: list[int], until: list[str], limit: int) -> str:
        """Up to `limit` tokens after `context`, cut before the first stop sequence (or end-of-text)."""
        keep = max(self.block - limit, self.block // 2)  # room for the answer in one block
        tokens = torch.tensor([context[-keep:]], device=self.where)
        new: list[int] = []
        cached = isinstance(self.model, Transformer)  # a transformers model (make export's) is run whole
        dtype = next(self.model.parameters()).dtype
        cache = KVCache(self.model.config, 1, self.block, self.where, dtype) if cached else None
        logits = self.model(tokens, cache=cache)[:, -1] if cached else self.model(tokens)[:, -1]
        for _ in range(limit):
            token = int(logits.argmax(-1))
            if token == self.eot:
                break
            new.append(token)
            text = self.tokenizer.decode(new)
            stops = [text.index(s) for s in until if s in text]
            if stops:
                return text[: min(stops)]
            step = torch.tensor([[token]], device=self.where)
            if cache is not None and cache.pos < self.block:
                logits = self.model(step, cache=cache)[:, -1]
            else:  # no cache, or a full one: the last block's worth again
                tokens = torch.cat([tokens, step], dim=1)[:, -self.block :]
                logits = self.model(tokens)[:, -1]
                cache = None
        return self.tokenizer.decode(new)


@dataclass
class Tasks:
    """What TASKS= names: lm-eval task or group names, and the folders of the task YAML files it names."""

    names: list[str]
    include: list[str]

    @classmethod
    def parse(cls, tasks: str) -> Tasks:
        items = [item.strip() for item in tasks.split(",") if item.strip()]
        if not items:
            raise ConfigError(
                f"tasks={tasks!r}: no task named; give lm-eval task names or task YAML files, e.g. "
                "TASKS=hellaswag,arc_easy or TASKS=my_tasks/qa.yaml"
            )
        names, include = [], []
        for item in items:
            path = Path(item)
            if not (path.suffix in TASK_FILES or "/" in item or path.exists()):
                names.append(item)
                continue
            if not path.exists():
                raise ConfigError(
                    f"tasks={item}: no such file or folder; give a task YAML file or a folder of them, "
                    "or an lm-eval task name"
                )
            folder = path if path.is_dir() else path.parent
            found = defined_tasks(folder)
            mine = found if path.is_dir() else [n for n, p in found.items() if p == path.resolve()]
            if not mine:
                raise ConfigError(
                    f"tasks={item}: defines no lm-eval task (a YAML with `task:` and a dataset); "
                    "see docs/evaluation.md for one over a local JSONL file"
                )
            names += list(mine)
            include.append(str(folder))
        return cls(list(dict.fromkeys(names)), list(dict.fromkeys(include)))


def defined_tasks(folder: Path) -> dict[str, Path]:
    """The tasks (and groups) the YAML files under a folder define, with the file of each."""
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    index = manager.task_index
    return {name: Path(entry.yaml_path).resolve() for name, entry in index.items() if entry.yaml_path}


def task_manager(tasks: Tasks) -> TaskManager:
    """lm-eval's tasks and the user's; an unknown name is refused with the nearest ones lm-eval knows.
    Indexing lm-eval's own task files takes some seconds: only when a name needs them."""
    own = {n for folder in tasks.include for n in defined_tasks(Path(folder))}
    defaults = any(name not in own for name in tasks.names)
    manager = TaskManager(include_path=tasks.include or None, include_defaults=defaults)
    known = set(manager.all_tasks)
    for name in tasks.names:
        if name not in known:
            near = difflib.get_close_matches(name, manager.all_tasks, n=3, cutoff=0.6)
            hint = f"did you mean {', '.join(near)}?" if near else "see `lm-eval ls tasks` for the names"
            raise ConfigError(f"tasks={name}: no such lm-eval task or group; {hint}")
    return manager


def load_tasks(tasks: Tasks, manager: TaskManager) -> None:
    """Each task's data loaded before any is scored: one that is neither local nor in the datasets
    cache, with no network, is one line naming it."""
    for name in tasks.names:
        try:
            manager.load([name])
        except Exception as exc:  # datasets' offline and not-found errors differ by version and source
            raise ConfigError(
                f"tasks={name}: its data could not be loaded ({exception_line(exc, 120)}); offline, give it as "
                "a task YAML over a local file (docs/evaluation.md), or fill the datasets cache where the Hub "
                "is reachable"
            ) from exc


def run_tasks(
    loaded: Loaded,
    tasks: Tasks,
    manager: TaskManager,
    batch_size: int,
    device: str,
    num_fewshot: int | None,
    limit: int | None,
    seed: int,
) -> tuple[list[dict], dict]:
    """Score every task; returns the table's rows and lm-eval's results of each task, by name."""
    model = CheckpointLM(loaded, batch_size, device)
    rows, results = [], {}
    logging.getLogger("lm_eval").setLevel(logging.WARNING)  # its per-task INFO lines are not the result
    for name in tasks.names:
        started = time.perf_counter()
        out = simple_evaluate(
            model=model,
            tasks=[name],
            task_manager=manager,
            num_fewshot=num_fewshot,
            limit=limit,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
            log_samples=False,
        )
        assert out is not None  # None only on ranks other than 0 of lm-eval's own multi-process models
        seconds = time.perf_counter() - started
        results[name] = out
        for task, metrics in out["results"].items():
            examples = out.get("n-samples", {}).get(task, {}).get("effective")
            for key, value in metrics.items():
                metric, comma, _ = key.partition(",")  # a score is "<metric>,<filter>"; the rest describe it
                if not comma or metric.endswith("_stderr") or not isinstance(value, int | float):
                    continue
                stderr = metrics.get(key.replace(metric, f"{metric}_stderr", 1))
                rows.append(
                    {
                        "task": task,
                        "metric": metric,
                        "value": float(value),
                        "stderr": float(stderr) if isinstance(stderr, int | float) else None,
                        "examples": examples,
                        "seconds": seconds,
                    }
                )
    return rows, results


def print_table(rows: list[dict]) -> None:
    print(f"{'task':<28} {'metric':<16} {'value':>8} {'stderr':>8} {'examples':>9} {'seconds':>8}")
    for r in rows:
        stderr = f"{r['stderr']:.4f}" if r["stderr"] is not None else "-"
        examples = r["examples"] if r["examples"] is not None else "-"
        print(f"{r['task']:<28} {r['metric']:<16} {r['value']:>8.4f} {stderr:>8} {examples:>9} {r['seconds']:>8.1f}")


def results_path(out: str | None, run_dir: Path | None, step: int) -> Path:
    """Where the results JSON goes: OUT=, which must not exist yet, else a new file in the run
    folder's eval/ (or ./eval outside one), named by the step and the time."""
    if out:
        path = Path(out)
        if path.exists():
            raise ConfigError(
                f"out={out}: already exists; give a new file for the results (OUT=), nothing is overwritten"
            )
        if path.suffix != ".json":
            raise ConfigError(f"out={out}: the results are JSON; give a path ending in .json, e.g. OUT=results.json")
        return path
    folder = run_dir / "eval" if run_dir is not None else Path("eval")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, n = folder / f"tasks-step{step}-{stamp}.json", 1
    while path.exists():
        path, n = folder / f"tasks-step{step}-{stamp}-{n}.json", n + 1
    return path


def write_results(path: Path, step: int, checkpoint: str, rows: list[dict], results: dict) -> None:
    """lm-eval's results of every task, and the table, as one JSON file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"checkpoint": checkpoint, "step": step, "table": rows, "lm_eval": results}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(document, indent=2, default=handle_non_serializable))
    tmp.replace(path)


def wandb_values(rows: list[dict]) -> dict[str, float]:
    """The scores as W&B summary keys: eval/<task>/<metric>."""
    return {f"eval/{r['task']}/{r['metric']}": r["value"] for r in rows}
