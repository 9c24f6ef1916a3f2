"""make eval TASKS=: the scores' table, the results JSON (OUT= or the run folder's eval/) and their
W&B keys. The model and the tasks are llm/benchmarks/'s, shared with the in-loop eval."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from lm_eval.utils import handle_non_serializable

from llm import atomic
from llm.benchmarks import continuation
from llm.benchmarks.harness import CheckpointLM
from llm.benchmarks.tasks import Tasks, check_counts, load_tasks, run_tasks, task_manager
from llm.checkpointing.files import Checkpoint, choose_checkpoint
from llm.data.prepare import load_meta, prepare
from llm.errors import ConfigError
from llm.tools.loading import add_to_wandb_run, run_folder_data, transformers_folder


def evaluate_tasks(
    ckpt: str,
    tasks: str,
    batch_size: int,
    device: str,
    num_fewshot: int | None,
    limit: int | None,
    seed: int,
    out: str | None,
    wandb: bool,
) -> dict:
    """TASKS=: every input checked and every task's data loaded before the model is, then the scores."""
    check_counts(limit, num_fewshot)
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size}: out of range; use 1 or more requests per forward pass")
    chosen = Tasks.parse(tasks)
    if out:
        results_path(out, None, 0)  # refused now, not after the scoring
    ckpt = choose_checkpoint(ckpt)
    if continuation.NAME in chosen.names:  # built from the run's own validation split
        chosen.include.append(str(build_continuation_task(ckpt)))
    manager = task_manager(chosen)
    load_tasks(chosen, manager)
    if (Path(ckpt) / "config.json").is_file():
        loaded, run_dir = transformers_folder(Path(ckpt), device), None
    else:
        checkpoint = Checkpoint(ckpt)
        loaded, run_dir = checkpoint.load(device), checkpoint.run_folder
    model = CheckpointLM.of(loaded, batch_size, device)
    rows, results = run_tasks(model, chosen, manager, num_fewshot, limit, seed)
    print_table(rows)
    path = results_path(out, run_dir, loaded.step)
    write_results(path, loaded.step, str(ckpt), rows, results)
    print(f"results: {path}")
    values = wandb_values(rows)
    if wandb and run_dir is not None:
        add_to_wandb_run(loaded, values, run_dir, {"checkpoint": str(ckpt), "step": loaded.step, "tasks": tasks})
    return {"checkpoint": str(ckpt), "step": loaded.step, "results": str(path), **values}


def build_continuation_task(ckpt: str) -> Path:
    """TASKS=val_continuation: the task's files in the run folder's eval/tasks/, from the validation
    split of the data the run folder's config.yaml names (llm/benchmarks/continuation.py)."""
    from tokenizers import Tokenizer

    field = f"tasks={continuation.NAME}"
    run_dir = None if (Path(ckpt) / "config.json").is_file() else Checkpoint(ckpt).run_folder
    if run_dir is None:
        raise ConfigError(
            f"{field}: built from a run's validation split, and ckpt={ckpt} is not in a run folder; give a "
            "checkpoint in runs/<name>/checkpoints/"
        )
    run = Checkpoint(ckpt).header().run_config
    folder = prepare(run_folder_data(run.data, run_dir, ckpt), log=lambda *_: None)
    meta = load_meta(folder)
    info = meta["splits"]["val"]
    tokens = np.memmap(folder / info["file"], dtype=meta["dtype"], mode="r")[: info["tokens"]]
    tokenizer = Tokenizer.from_file(str(folder / meta["tokenizer"]))
    tasks = run_dir / "eval" / "tasks" / continuation.NAME
    if not continuation.write_task(tasks, tokens, tokenizer, run.model.block_size, run.loader.seed):
        raise ConfigError(f"{field}: the validation split of {folder} holds too few tokens for four passages")
    return tasks


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
    atomic.write_text(path, json.dumps(document, indent=2, default=handle_non_serializable))


def wandb_values(rows: list[dict]) -> dict[str, float]:
    """The scores as W&B summary keys: eval/<task>/<metric>."""
    return {f"eval/{r['task']}/{r['metric']}": r["value"] for r in rows}
