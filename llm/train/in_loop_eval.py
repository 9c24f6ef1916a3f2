"""--eval_tasks=: lm-eval benchmarks scored at each validation, on the model being trained.

Every rank scores its share of each task's examples through the same `CheckpointLM` that
`make eval TASKS=` uses (llm/benchmarks/), so that the in-loop score of a step equals make eval's
score of that step's checkpoint; rank 0's results are broadcast and logged on every rank as
eval/<task>/<metric>, with the time it took as perf/eval_seconds. Validation time, this included,
is not training time in tokens/s or MFU (llm/observe/monitor.py)."""

from __future__ import annotations

import contextlib
import io
import random
import time
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from llm.config import RunOptions
from llm.errors import ConfigError
from llm.observe.metrics import benchmark_key

FIELD = "eval_tasks"
SEED = 1234  # make eval's default --seed: the same few-shot examples, so the same scores


def check(options: RunOptions) -> None:
    """The options checked before any data is prepared: counts in range, files found, names known
    and their data loaded (lm-eval's task index is read only when a name is not the run's own)."""
    if not options.eval_tasks:
        for name in ("eval_limit", "eval_fewshot"):
            if getattr(options, name) is not None:
                raise ConfigError(f"{name}={getattr(options, name)}: given without eval_tasks; name the tasks too")
        return
    from llm.benchmarks import continuation, tasks

    tasks.check_counts(options.eval_limit, options.eval_fewshot, ("eval_limit", "eval_fewshot"))
    named = tasks.Tasks.parse(options.eval_tasks, FIELD)
    named.names = [name for name in named.names if name != continuation.NAME]  # built once the data is
    if named.names:
        tasks.load_tasks(named, tasks.task_manager(named))  # a task whose data is not here: refused now


@contextlib.contextmanager
def random_state_kept(device: torch.device):
    """lm-eval seeds Python's, numpy's and torch's generators; training continues with its own."""
    state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type):
        yield
    random.setstate(state[0])
    np.random.set_state(state[1])


class InLoopBenchmarks(Callback):
    def __init__(self, options: RunOptions, run_dir: Path):
        self.spec, self.limit, self.fewshot = options.eval_tasks or "", options.eval_limit, options.eval_fewshot
        self.run_dir = run_dir

    def setup(self, trainer, pl_module, stage: str) -> None:
        """The tasks and their data, loaded once (val_continuation built from the validation split)."""
        from tokenizers import Tokenizer

        from llm.benchmarks import continuation, tasks

        data = trainer.datamodule
        self.tasks = tasks.Tasks.parse(self.spec, FIELD)
        self.tokenizer = Tokenizer.from_file(str(data.folder / data.meta["tokenizer"]))
        if continuation.NAME in self.tasks.names:
            folder = self.run_dir / "eval" / "tasks" / continuation.NAME
            val = data.blocks("val")
            tokens = np.memmap(val.path, dtype=val.dtype, mode="r")[: val.n_tokens]
            if not continuation.write_task(folder, tokens, self.tokenizer, data.block_size, data.seed):
                raise ConfigError(
                    f"{FIELD}={continuation.NAME}: the validation split of {data.folder} holds too few tokens "
                    "for four passages"
                )
            self.tasks.include.append(str(folder))
        self.manager = tasks.task_manager(self.tasks)
        tasks.load_tasks(self.tasks, self.manager)
        self.eot, self.batch_size = data.meta["eot_id"], data.micro_batch

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        from llm.benchmarks.harness import CheckpointLM
        from llm.benchmarks.tasks import run_tasks

        started = time.perf_counter()
        model = CheckpointLM(
            pl_module.model,
            self.tokenizer,
            self.eot,
            self.batch_size,
            pl_module.device,
            trainer.global_rank,
            trainer.world_size,
            trainer.precision_plugin.forward_context,
            progress=False,
        )
        # lm-eval's and datasets' progress bars, on stderr, would break up the run's own lines
        with random_state_kept(pl_module.device), contextlib.redirect_stderr(io.StringIO()):
            rows, _ = run_tasks(model, self.tasks, self.manager, self.fewshot, self.limit, SEED)
        scores = {benchmark_key(r["task"], r["metric"]): r["value"] for r in rows}
        scores = trainer.strategy.broadcast(scores)  # rank 0 holds lm-eval's results
        seconds = time.perf_counter() - started
        if trainer.is_global_zero:
            shown = ", ".join(f"{key.removeprefix('eval/')} {value:.4f}" for key, value in scores.items())
            print(f"benchmarks at step {trainer.global_step}: {shown} ({seconds:.1f} s)", flush=True)
        # with sync_dist, as every validation metric: Lightning then knows every rank holds the value
        pl_module.log_dict({**scores, "perf/eval_seconds": seconds}, sync_dist=True)
