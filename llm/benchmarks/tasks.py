"""The tasks a run names (TASKS=, --eval_tasks=): lm-eval task or group names and the user's task
YAML files, each checked and its data loaded before any model runs, then scored into rows of a table
(task, metric, value, stderr, examples, seconds)."""

from __future__ import annotations

import difflib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager

from llm.benchmarks.harness import CheckpointLM
from llm.errors import ConfigError, exception_line

TASK_FILES = (".yaml", ".yml")


@dataclass
class Tasks:
    """What TASKS= names: lm-eval task or group names, and the folders of the task YAML files it names."""

    names: list[str]
    include: list[str]
    field: str = "tasks"  # the option that named them, for the messages: tasks (make eval) or eval_tasks

    @classmethod
    def parse(cls, tasks: str, field: str = "tasks") -> Tasks:
        items = [item.strip() for item in tasks.split(",") if item.strip()]
        if not items:
            raise ConfigError(
                f"{field}={tasks!r}: no task named; give lm-eval task names or task YAML files, e.g. "
                "hellaswag,arc_easy or my_tasks/qa.yaml"
            )
        names, include = [], []
        for item in items:
            path = Path(item)
            if not (path.suffix in TASK_FILES or "/" in item or path.exists()):
                names.append(item)
                continue
            if not path.exists():
                raise ConfigError(
                    f"{field}={item}: no such file or folder; give a task YAML file or a folder of them, "
                    "or an lm-eval task name"
                )
            folder = path if path.is_dir() else path.parent
            found = defined_tasks(folder)
            mine = found if path.is_dir() else [n for n, p in found.items() if p == path.resolve()]
            if not mine:
                raise ConfigError(
                    f"{field}={item}: defines no lm-eval task (a YAML with `task:` and a dataset); "
                    "see docs/evaluation.md for one over a local JSONL file"
                )
            names += list(mine)
            include.append(str(folder))
        return cls(list(dict.fromkeys(names)), list(dict.fromkeys(include)), field)


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
            raise ConfigError(f"{tasks.field}={name}: no such lm-eval task or group; {hint}")
    return manager


def load_tasks(tasks: Tasks, manager: TaskManager) -> None:
    """Each task's data loaded before any is scored: one that is neither local nor in the datasets
    cache, with no network, is one line naming it."""
    for name in tasks.names:
        try:
            manager.load([name])
        except Exception as exc:  # datasets' offline and not-found errors differ by version and source
            raise ConfigError(
                f"{tasks.field}={name}: its data could not be loaded ({exception_line(exc, 120)}); offline, give it as "
                "a task YAML over a local file (docs/evaluation.md), or fill the datasets cache where the Hub "
                "is reachable"
            ) from exc


def check_counts(limit: int | None, num_fewshot: int | None, names: tuple[str, str] = ("limit", "num_fewshot")) -> None:
    """A limit of examples per task and a few-shot count in range; `names`: the options' own."""
    if limit is not None and limit < 1:
        raise ConfigError(f"{names[0]}={limit}: out of range; use a positive number of examples per task, e.g. 100")
    if num_fewshot is not None and num_fewshot < 0:
        raise ConfigError(f"{names[1]}={num_fewshot}: out of range; use 0 or more examples, e.g. 5")


def run_tasks(
    model: CheckpointLM, tasks: Tasks, manager: TaskManager, num_fewshot: int | None, limit: int | None, seed: int
) -> tuple[list[dict], dict]:
    """Score every task; returns the table's rows and lm-eval's results of each task, by name (on rank
    0; empty on the others, which score their share of the requests)."""
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
        if out is None:  # a rank other than 0
            continue
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
