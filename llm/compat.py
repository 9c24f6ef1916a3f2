"""What the project needs from its libraries that they offer no public API for, in one place.

Each function names the versions it was written against (torch 2.13, lightning 2.6, deepspeed
0.19, wandb 0.31, torchao 0.18, jsonargparse 4.49) and has a test in tests/test_compat.py that fails
when a library changes under it; the parser's message patterns and DeepSpeed's shared-memory name say
which tests check them.
Two subclasses override private methods where they are (train/strategy.py's CPUDeepSpeedStrategy,
observe/progress.py's RichBar); the same tests check those methods still exist.
"""

from __future__ import annotations

import os
import re
from datetime import timedelta
from pathlib import Path


def set_timeout_of_every_process_group(timeout: timedelta) -> None:
    """Give every process group of this process `timeout`. `init_process_group(timeout=)` sets it
    for the default group only; a group made later with `new_group()` (DeepSpeed's copy of the
    world group, which ZeRO reduces over) takes torch's 30-minute default instead. torch 2.13 keeps
    the groups in `distributed_c10d._world.pg_map` and sets a group's timeout with `_set_pg_timeout`."""
    from torch.distributed import distributed_c10d

    for group in list(distributed_c10d._world.pg_map):
        distributed_c10d._set_pg_timeout(timeout, group)


def process_group_timeouts() -> list[timedelta]:
    """The timeout of every process group of this process (for tests and diagnostics)."""
    import torch
    from torch.distributed import distributed_c10d

    timeouts = []
    for group in distributed_c10d._world.pg_map:
        for device in group._device_types:
            timeouts.append(group._get_backend(torch.device(device)).options._timeout)
    return timeouts


def skip_fused_update_if(optimizer, found_inf) -> None:
    """Make the next step of torch's fused Adam/AdamW change nothing when `found_inf` (a 0-dim
    tensor on the parameters' device) is non-zero, with no host synchronisation. This is how torch's
    GradScaler talks to optimizers that unscale themselves (`_step_supports_amp_scaling`): torch
    2.13's fused kernels read the optimizer's `found_inf` attribute and leave parameters, moments and
    step counts unchanged when it is set. `end_fused_skip` removes it after the step."""
    optimizer.found_inf = found_inf.float()


def end_fused_skip(optimizer) -> None:
    if hasattr(optimizer, "found_inf"):
        del optimizer.found_inf


def drop_wandb_anonymous(logger) -> None:
    """Lightning 2.6's WandbLogger hands wandb.init `anonymous=None`, which wandb 0.31 warns about on
    every run; the keyword arguments it hands over wait in `_wandb_init` until the run starts."""
    logger._wandb_init.pop("anonymous", None)


def set_logging_step(trainer, step: int) -> None:
    """The step Lightning 2.6 logs metrics under: the fit loop's count of batches that stepped the
    optimizer (`fit_loop.epoch_loop._batches_that_stepped`), which it restores off by one after some
    resumes (callbacks.LoggingStepOnResume)."""
    trainer.fit_loop.epoch_loop._batches_that_stepped = step


def shift_batch_progress(checkpoint: dict, micro_batches: int) -> None:
    """Move the training loop's restored count of micro-batches (Lightning 2.6's
    `loops.fit_loop["epoch_loop.batch_progress"]` in a checkpoint) by `micro_batches`. Lightning
    validates when that count reaches a multiple of val_check_interval (eval_every x the
    accumulation), so a run resumed with another accumulation must count as if it had always had it
    (callbacks.RunInfo), or it validates and checkpoints at other steps than it would have."""
    progress = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]
    for part in ("total", "current"):
        for key in progress[part]:
            progress[part][key] += micro_batches


def quiet_torchao() -> None:
    """torchao 0.18 logs a warning for each of its GPU kernel libraries a CPU-only torch cannot load,
    and torch 2.13 one for each enum torchao registers in the old way; neither concerns a user."""
    import logging

    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def compile_callbacks():
    """torch 2.13's registry of the callbacks run at the start and the end of each torch.compile
    compilation (`torch._dynamo.callback.callback_handler`: `register_start_callback`,
    `register_end_callback` and their `remove_` forms), by which monitor.CompileClock times them."""
    from torch._dynamo.callback import callback_handler

    return callback_handler


def float8_layer_filter(recipe: str, keep: list[str]):
    """torchao 0.18's choice of the linear layers float8 training speeds up under a recipe (its
    `_auto_filter_for_recipe`: large enough for the casts to pay), skipping the names in `keep`: a
    function (module, name) -> bool, as `convert_to_float8_training` takes."""
    from torchao.float8 import _auto_filter_for_recipe

    return _auto_filter_for_recipe(recipe, filter_fqns=keep)


def convert_to_universal(input_folder: str, output_folder: str) -> None:
    """DeepSpeed 0.19's `ds_to_universal` conversion of one ZeRO checkpoint tag, in this process: its
    `main` takes the namespace its own command line would parse (`parse_arguments`), one worker each
    for extracting and merging, strict about every parameter."""
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    ds_to_universal.main(
        argparse.Namespace(
            input_folder=input_folder,
            output_folder=output_folder,
            num_extract_workers=1,
            num_merge_workers=1,
            keep_temp_folder=False,
            strict=True,
            inject_missing_state=False,
        )
    )


def allow_deepspeed_types() -> None:
    """The plain-data classes DeepSpeed (0.19) pickles into its optimizer shards (its loss scaler,
    ZeRO's stage, a parameter's place in the flat buffer), from the modules it keeps them in:
    loadable weights-only, none of them runs code when loaded."""
    import torch
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    torch.serialization.add_safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address])


# jsonargparse 4.49's wording of a parser error, which llm.errors.one_line reads to answer in one line
# with the fix. tests/test_errors.py drives the real parser into each case (a config file that is not
# there, an unknown option, a subclass section's unknown option, a bad value): each fails when the
# wording changes.
PARSER_MISSING_CONFIG = re.compile(
    r'Parser key "([\w.]+)": (?:Unable to load config|File does not exist:) [\'"]([^\'"]+)[\'"]'
)
PARSER_UNKNOWN_OPTION = re.compile(r"(?:unrecognized arguments|ambiguous option): (\S+)")
PARSER_NESTED_OPTION = re.compile(
    r"Parser key \"([\w.]+)\":.* Option '([\w.]+)' is not accepted.*NestedArg\(key='[^']*', val='(.*)'\)"
)
PARSER_BAD_VALUE = re.compile(r'Parser key "([\w.]+)":.*(?:Given value|Got value): (.*?)$')
PARSER_CHOICES = re.compile(r"Literal\[([^\]]*)\]")  # a Literal's values, 'quoted', in a bad value's reasons
PARSER_EXPECTED_TYPE = re.compile(r"Expected a <class '(\w+)'>")

# DeepSpeed 0.19's CPU backend makes a shared-memory all-reduce buffer per process when its launcher
# sets LOCAL_SIZE (about 69 MB each in /dev/shm; its csrc/cpu/comm/shm.cpp names it
# <prefix>_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>) and never removes it. tests/test_multinode.py's
# DeepSpeed-launcher run fails when /dev/shm keeps a file after the run.
DEEPSPEED_SHM = Path("/dev/shm")
DEEPSPEED_SHM_PREFIX = "deepspeed_allreduce_buffer"


def deepspeed_shm_buffer(rank: int) -> Path:
    """The shared-memory buffer DeepSpeed's CPU backend made for this process (`rank`)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return DEEPSPEED_SHM / f"{DEEPSPEED_SHM_PREFIX}_{os.getuid()}_{addr}_{port}_{rank}"
