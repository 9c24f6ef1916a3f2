"""`python -m llm <command>`: the entry point of every Make target (see `make help`)."""

import importlib
import os
import sys
import threading

# Transparent huge pages for torch's large CPU tensors: far fewer page faults when the logits of a
# 50k vocabulary are allocated every step (1.4x faster steps measured on a 2-core CPU). Read once,
# when torch first allocates, so it is set before torch is imported.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch

from llm import ranks, signals
from llm.argv import with_make_args
from llm.errors import (
    ConfigError,
    OneLineErrors,
    RunStopped,
)
from llm.launch.collectives import end_child_processes, failed_collective

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # what DeepSpeed would pick, without its warning
if "CROSS_RANK" in os.environ:  # started by the DeepSpeed launcher: Lightning reads the node rank as NODE_RANK
    os.environ.setdefault("NODE_RANK", os.environ["CROSS_RANK"])

# command -> (module, function, what it does). fit and prepare are LightningCLI entry points that
# read sys.argv; the others are functions whose signature and docstring make their options.
COMMANDS = {
    "fit": ("llm.train.cli", "fit_main", "train (LightningCLI; --help lists every option)"),
    "prepare": ("llm.train.cli", "prepare_main", "prepare and cache the data of a config"),
    "sample": ("llm.tools.sample", "sample", "generate text from a checkpoint"),
    "eval": ("llm.tools.evaluate", "evaluate", "validation loss, perplexity and bits per byte of a checkpoint"),
    "export": ("llm.tools.export", "export", "a Hugging Face transformers folder of a checkpoint"),
    "export-fp32": (
        "llm.checkpointing.files",
        "export_fp32",
        "consolidate a DeepSpeed checkpoint folder into one fp32 file",
    ),
    "plan": ("llm.tools.plan", "plan_main", "memory per ZeRO stage and offload, and the preset to use"),
    "torchrun": ("llm.launch.commands", "torchrun_main", "start this node's processes of a multi-node job (torchrun)"),
    "deepspeed": ("llm.launch.commands", "deepspeed_main", "start a job over a hostfile (the DeepSpeed launcher)"),
    "slurm": ("llm.launch.commands", "slurm_main", "submit a job to SLURM (sbatch scripts/slurm/train.sbatch)"),
    "plot": ("llm.tools.plot", "plot", "PNG charts of a run: loss, optimizer, throughput, memory"),
    "tui": ("llm.tools.plot", "tui", "open a run in W&B's terminal viewer"),
    "wandb-dashboard": (
        "llm.tools.dashboard",
        "wandb_dashboard",
        "build or update a saved W&B workspace of the metrics",
    ),
}
READS_ARGV = {"fit", "prepare", "torchrun", "deepspeed", "slurm"}


def function_cli(function, args: list[str]) -> None:
    """A command from a function's signature and docstring (jsonargparse), with one-line errors."""
    from jsonargparse import ArgumentParser, auto_cli

    class Parser(OneLineErrors, ArgumentParser):
        renamed = getattr(sys.modules[function.__module__], "RENAMED", {})  # an old option: its new name

    auto_cli(function, args=args, parser_class=Parser, as_positional=False)


def requeue(exc: RunStopped) -> int:
    """A stop under SLURM's warning: rank 0 puts the job back in the queue, now that this process
    has cleaned up, and every rank ends with status 0 (with srun's --kill-on-bad-exit, a rank that
    ended first with another status would have the others killed before the job is requeued)."""
    if not ranks.is_first_process():
        return 0
    print(f"stopped: {exc}; requeueing SLURM job {exc.requeue}", file=sys.stderr, flush=True)
    signals.ignore()  # SLURM ends the job's processes as it requeues it: this one is done
    failed = ranks.requeue_slurm_job(str(exc.requeue))
    if failed:
        print(f"stopped: {failed}; {exc.otherwise}", file=sys.stderr, flush=True)
        return exc.status
    return 0


def main(argv: list[str] | None = None) -> None:
    try:
        argv = with_make_args(list(sys.argv[1:] if argv is None else argv))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    if not argv or argv[0] not in COMMANDS:
        print("usage: python -m llm {" + ",".join(COMMANDS) + "} [options]", file=sys.stderr)
        for name, (_, _, what) in COMMANDS.items():
            print(f"  {name:<15} {what}", file=sys.stderr)
        sys.exit(2)
    sys.argv = [sys.argv[0], *argv]
    command, args = argv[0], argv[1:]
    module, name, _ = COMMANDS[command]
    if hasattr(sys.stdout, "reconfigure"):  # a text stream whose errors can be set (not a StringIO)
        sys.stdout.reconfigure(errors="replace")
    if command in ("fit", "prepare") and threading.current_thread() is threading.main_thread():
        signals.STOPS.install()  # the one owner of the stop signals in this process
    try:
        function = getattr(importlib.import_module(module), name)
        function() if command in READS_ARGV else function_cli(function, args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except RunStopped as exc:
        if exc.requeue:
            sys.exit(requeue(exc))
        if ranks.is_first_process() and str(exc):  # empty: already said
            print(f"stopped: {exc}", file=sys.stderr)
        sys.exit(exc.status)
    except RuntimeError as exc:
        line = failed_collective(exc)
        if line is None:
            raise
        print(f"stopped: {line}", file=sys.stderr, flush=True)
        end_child_processes()
        sys.exit(1)
    finally:
        signals.STOPS.release()
        signals.STOPS.restore()  # main() called in-process (the tests) leaves no trace


if __name__ == "__main__":
    main()
