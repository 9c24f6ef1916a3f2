"""Between logging steps a run does not wait for the device: tests/helpers.py HostReads counts every
host read of a tensor and every tensor made from a Python value on the other steps of a real run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from support import TINY, callbacks, llm_here, run_llm


def reads_between_logging_steps(run: Path, fixture_text: Path, data_cache: Path, *extra: str) -> list[dict]:
    """tests/helpers.py HostReads of a short run, one process or more, with torch's fused AdamW as on
    a GPU: steps 3, 4, 6, 7, 8, 9 and 11 of 12 are counted (5 and 10 log, 12 is the last), two
    micro-batches each. One result per rank."""
    args = ["fit", "--config", "configs/experiment/default.yaml", *TINY, f"--data.text={fixture_text}",
            "--data.vocab_size=300", f"--data.cache_dir={data_cache}", f"--run={run}", "--trainer.max_steps=12",
            "--trainer.log_every_n_steps=5", "--eval_every=100", "--model.optimizer.fused=true",
            "--trainer.accumulate_grad_batches=2", callbacks("HostReads"), *extra]  # fmt: skip
    result = (run_llm if extra else llm_here)(*args, env={"WANDB_MODE": "disabled"})
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(path.read_text()) for path in sorted(run.glob("host-reads-rank*.json"))]


def test_between_logging_steps_a_run_reads_nothing_from_the_device(tmp_path, fixture_text, data_cache):
    """No tensor read by the host and none made from a Python value on non-logging steps, so that a
    GPU never waits for the host between them. Before: the loss read for the progress bar and the
    learning rate made into a tensor, once per micro-batch each."""
    assert reads_between_logging_steps(tmp_path / "run", fixture_text, data_cache) == [
        {"counted_steps": 14, "reads": {}}
    ]


@pytest.mark.long  # a two-process run of its own, traced
def test_between_logging_steps_two_processes_read_only_what_lightning_and_the_host_group_need(
    tmp_path, fixture_text, data_cache
):
    """Two processes agree on a stop at each optimizer step over a host (gloo) group: a read of a CPU
    tensor, which on a GPU run waits for no kernel (on this CPU run every tensor is on the host, so it
    is counted). What remains is Lightning 2.6's own broadcast of its SIGTERM flag, once per
    micro-batch (training_epoch_loop.py), which no setting turns off."""
    for rank in reads_between_logging_steps(tmp_path / "run", fixture_text, data_cache, "--trainer.devices=2"):
        reads = rank["reads"]
        lightning = {k: v for k, v in reads.items() if k.startswith(("torch.tensor(device=) lightning/pytorch/loops/",
                                                                      "item lightning/pytorch/loops/"))}  # fmt: skip
        assert sorted(lightning.values()) == [14, 14], reads
        ours = {k: v for k, v in reads.items() if k not in lightning}
        assert [(k.split(" ")[0], k.split(" ")[1].split(":")[0], v) for k, v in ours.items()] == [
            ("tolist", "llm/checkpointing/saving.py", 7)
        ], reads  # the stop flag, once per optimizer step, made without device=


def test_the_counter_names_each_read_of_a_device_tensor_and_leaves_torch_as_it_was():
    """llm/observe/host_syncs.py, which the probe above and `make bench` count with: a read of a tensor
    on the counted device's type, or a tensor made there from Python values, counts once, named by
    the line that asked; not while counting is off; on a GPU, not a read of a host tensor."""
    import inspect

    import torch

    from llm.observe.host_syncs import HostSyncs

    originals = (torch.Tensor.item, torch.Tensor.__bool__, torch.tensor)
    x = torch.arange(4.0)
    with HostSyncs(torch.device("cpu")) as cpu:
        cpu.counting = True
        x.sum().item(), bool(x[0]), x.tolist(), torch.tensor([1.0], device="cpu")
        line = inspect.currentframe().f_lineno - 1
        cpu.counting = False
        x.sum().item()  # not counted
    here = f"tests/test_host_reads.py:{line}"
    assert dict(cpu.counts) == {f"{w} {here}": 1 for w in ("item", "__bool__", "tolist", "torch.tensor(device=)")}
    assert (torch.Tensor.item, torch.Tensor.__bool__, torch.tensor) == originals
    with HostSyncs(torch.device("cuda")) as gpu:  # a host tensor's read waits for no GPU
        gpu.counting = True
        x.sum().item(), torch.tensor([1.0], device="cpu")
    assert gpu.total() == 0 and torch.tensor is originals[2]
