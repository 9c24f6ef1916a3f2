"""What a process hands to the processes started after it, through the environment: the one way
to reach a process that torchrun, the DeepSpeed launcher, srun or Lightning's own launcher starts,
before any process group exists. Every variable of the package's own is named here; a new one
belongs here too, with what it holds.

    LLM_ARGS            Make's ARGS=, the options appended to the command line (llm/argv.py)
    LLM_RUN_DIR         the run folder: given by a launcher (RUN=), or decided by rank 0
    LLM_RESUME_FROM     the checkpoint rank 0 chose to continue from ("" for none)
    LLM_AUTOSIZE        rank 0's choice for DS=auto and batch_size=auto (JSON)
    LLM_LAUNCH_TIMEOUT  seconds a process waits for rank 0 to answer (LAUNCH_TIMEOUT=)

Libraries' own variables that the package sets for its children (WANDB_MODE, TOKENIZERS_PARALLELISM,
TORCH_CUDA_ARCH_LIST) are set where that library is set up, which says why.
"""

from __future__ import annotations

import os

ARGS = "LLM_ARGS"
PREFIX = ARGS.split("_", 1)[0] + "_"  # what travels to the hosts of a multi-node job (llm/launch/hosts.py)
RUN_DIR = "LLM_RUN_DIR"
RESUME_FROM = "LLM_RESUME_FROM"
AUTOSIZE = "LLM_AUTOSIZE"
LAUNCH_TIMEOUT = "LLM_LAUNCH_TIMEOUT"


def received(name: str) -> str | None:
    """The value an earlier process handed on, or None."""
    return os.environ.get(name)


def hand_on(name: str, value: str) -> None:
    """Give `value` to every process this one starts from now on."""
    os.environ[name] = value
