"""Multi-node launching on this CPU over gloo: torchrun as two nodes on 127.0.0.1, the DeepSpeed
launcher over a localhost hostfile (SLURM: tests/test_cluster.py, on a real one); the refusals of
impossible worlds; data prepared once by racing processes."""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from llm.compat import DEEPSPEED_SHM as SHM
from llm.compat import DEEPSPEED_SHM_PREFIX as SHM_PREFIX
from support import (
    REPO,
    STEPS,
    assert_refused,
    callbacks,
    column,
    data_args,
    finish,
    llm_here,
    losses,
    make,
    program_stderr,
)


def free_port_pair() -> int:
    """A port p such that p and p + 1 are free (the process group's and the agreement's)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        if port < 65534:
            with socket.socket() as s:
                try:
                    s.bind(("", port + 1))
                    return port
                except OSError:
                    continue
    raise RuntimeError("no two free ports in a row")


# --- torchrun ----------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.long
def test_two_torchrun_nodes_share_one_run_folder_and_match_one_node(experiment, runs):
    port = free_port_pair()
    # the canonical ZeRO-2 run's settings (tests/support.py), less its run folder: each node would
    # take a timestamp of its own, and rank 0 decides the one they share
    canonical = [a for a in runs.args(Path("unused")) if not a.startswith("--run=")][3:]  # after "fit --config x"
    args = shlex.join([*canonical, "--deepspeed=zero2", f"--experiment={experiment}"])
    nodes = [
        make("train-multinode", "NNODES=2", f"NODE_RANK={rank}", f"MASTER_PORT={port}", f"ARGS={args}")
        for rank in (0, 1)
    ]
    results = [finish(node) for node in nodes]
    for rank, (code, out, err) in enumerate(results):
        assert code == 0, f"node {rank}: {out[-2000:]}{err[-3000:]}"
        assert out.startswith(f"torchrun: 2 nodes x 1 processes = 2 processes; master 127.0.0.1:{port}")
        assert f"this is node {rank}" in out.splitlines()[0]
    (run,) = (REPO / "runs").glob(f"{experiment}-*")  # one folder, though no RUN= was given
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["strategy"] == "deepspeed zero2" and summary["steps"] == STEPS
    # not a terminal: one plain line per logging step, from rank 0 only
    assert f"step {STEPS}/{STEPS} | loss " in results[0][1] and " tokens/s | MFU " in results[0][1]
    assert f"step {STEPS}/{STEPS} | loss " not in results[1][1]
    expected, got = losses(runs("zero2")), losses(run)  # the same job, started by Lightning on one node
    assert sorted(got) == sorted(expected) == list(range(1, STEPS + 1))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=1e-6), f"step {step}"


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
@pytest.mark.long
def test_an_elastic_job_loses_a_node_restarts_on_the_other_and_finishes(tmp_path, runs):
    port, run = free_port_pair(), tmp_path / "run"
    # the canonical runs' settings (tests/support.py) at 512 tokens a step: 2 nodes x 4 sequences of 64
    # tokens, then on one node an accumulation of 2; each micro-batch 0.5 s longer, so that a node
    # can leave mid-run
    canonical = [a for a in runs.args(Path("unused"), probes=()) if not a.startswith("--run=")][3:]
    sleep = callbacks('{"class_path": "tests.helpers.StepSleep", "init_args": {"seconds": 0.5}}')
    args = shlex.join([*canonical, "--tokens_per_step=512", sleep])

    def node() -> subprocess.Popen:
        elastic = ("NNODES=1:2", f"MASTER_PORT={port}", f"RUN={run}", "MAX_RESTARTS=2", f"ARGS={args}")
        return make("train-multinode", *elastic, start_new_session=True)

    stays = node()
    deadline = time.monotonic() + 120
    while not listening(port):  # the first node serves the rendezvous: the other joins it
        assert stays.poll() is None and time.monotonic() < deadline, finish(stays)
        time.sleep(0.5)
    leaves = node()
    # past the validation after step 4 and past step 6's row in metrics.csv, which rank 0 writes
    # after that step's save: a node lost between a save and the logging of the same step takes the
    # step's row (or validation) with it, as the run continues from the save, after it
    while not ((run / "checkpoints" / "step-000006.ckpt").exists() and 6 in losses(run)):
        assert stays.poll() is None and leaves.poll() is None and time.monotonic() < deadline + 180
        time.sleep(0.5)
    # the node at once: make, torchrun's agent and the training process (torchrun starts it in a
    # session of its own)
    for process in [*psutil.Process(leaves.pid).children(recursive=True), psutil.Process(leaves.pid)]:
        process.kill()
    leaves.wait()
    code, out, err = finish(stays)
    assert code == 0, out[-3000:] + err[-5000:]
    assert out.startswith(f"torchrun: elastic, 1 to 2 nodes x 1 processes; rendezvous 127.0.0.1:{port}")
    assert out.count("tokens per step: 512 (1 x 4 x 64 tokens x 2 processes") == 1  # the first round
    assert "tokens per step: 512 (2 x 4 x 64 tokens x 1 processes" in out  # after the restart
    assert "resuming from " in out + err
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["steps"], summary["world_size"], summary["accumulate_grad_batches"]) == (STEPS, 1, 2)
    assert sorted(losses(run)) == list(range(1, STEPS + 1))  # every step once in metrics.csv: no gap, no repeat
    # validated at the steps the 2-process run validated at, though the accumulation changed
    reference = runs("ddp")
    assert sorted(column(run, "val/loss")) == sorted(column(reference, "val/loss")) == [4, 8, 12]
    # the data stream and the optimizer continued: the 2-process run's final weights (the validations
    # after the restart hold half its blocks: val_batches counts per process), up to the order of the
    # sums over 6 steps since the restart (measured 1.4e-5 at most, in an attention bias)
    weights = [
        torch.load(r / "checkpoints" / "step-000012.ckpt", weights_only=True)["state_dict"] for r in (reference, run)
    ]
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, rtol=0, atol=5e-5, msg=name)


@pytest.mark.slow
@pytest.mark.long
def test_a_refusal_of_rank_0_stops_every_node_with_its_line(tmp_path, code_corpus, data_cache):
    run = tmp_path / "busy"
    run.mkdir()
    (run / "metrics.csv").write_text("step,train/loss\n1,9.0\n")  # a run's work
    port = free_port_pair()
    args = f"{data_args(code_corpus, data_cache)} --trainer.max_steps=2"
    started = time.monotonic()
    nodes = [
        make("train-multinode", "NNODES=2", f"NODE_RANK={r}", f"MASTER_PORT={port}", f"RUN={run}", f"ARGS={args}")
        for r in (0, 1)
    ]
    for code, _, err in (finish(node, timeout=300) for node in nodes):
        lines = program_stderr(err)
        assert code == 2 and len(lines) == 1, err[-3000:]
        assert lines[0].startswith(f"error: run={run}: already holds a run")
    assert time.monotonic() - started < 120
    assert [p.name for p in run.iterdir()] == ["metrics.csv"]


# --- the DeepSpeed launcher --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.long
def test_deepspeed_launcher_over_a_localhost_hostfile_trains_and_leaves_no_shared_memory(
    tmp_path, code_corpus, data_cache
):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# one node, two processes\nlocalhost slots=2\n")
    run = tmp_path / "run"
    args = f"{data_args(code_corpus, data_cache)} --trainer.max_steps=4"
    # DeepSpeed's CPU all-reduce buffer of a run killed earlier, which no process maps any more
    stale = SHM / f"{SHM_PREFIX}_{os.getuid()}_127.0.0.1_1_0"
    stale.write_bytes(bytes(4096))
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    port = free_port_pair()
    before = set(SHM.iterdir())
    node = make(
        "train-deepspeed",
        f"HOSTFILE={hostfile}",
        f"MASTER_PORT={port}",
        "DS=zero2",
        f"RUN={run}",
        f"ARGS={args}",
    )
    code, out, err = finish(node)
    assert code == 0, out[-2000:] + err[-3000:]
    assert out.startswith("deepspeed: 1 nodes x 2 processes = 2 processes (localhost)")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["strategy"] == "deepspeed zero2" and summary["steps"] == 4
    # the launcher sets LOCAL_SIZE, so DeepSpeed made a shared-memory buffer per process: removed at the
    # end, and the stale one before the start
    assert not stale.exists()
    # none left, under the name llm/compat.py gives or any other that DeepSpeed may come to give it
    left = [p.name for p in set(SHM.iterdir()) - before if str(port) in p.name or "deepspeed" in p.name.lower()]
    assert not left, left


# --- data prepared once --------------------------------------------------------------------------------


@pytest.mark.long  # three processes each tokenizing tiny Shakespeare's cache at once
def test_processes_preparing_the_same_data_at_once_prepare_it_once(tmp_path, shakespeare):
    cache = tmp_path / "shared-cache"  # what two nodes see on a shared filesystem
    command = [
        sys.executable,
        "-m",
        "llm",
        "prepare",
        "--config",
        "configs/experiment/default.yaml",
        f"--data.text={shakespeare}",
        "--data.vocab_size=512",
        f"--data.cache_dir={cache}",
    ]
    racers = [
        subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outputs = [r.communicate(timeout=600) for r in racers]
    assert [r.returncode for r in racers] == [0, 0], [err[-2000:] for _, err in outputs]
    done = [out for out, _ in outputs if " tokens, val " in out and "(cached" not in out]
    waited = [out for out, _ in outputs if "prepared by another process" in out]
    assert len(done) == 1 and len(waited) == 1, outputs
    assert [p.name for p in cache.iterdir()] == [f.name for f in cache.glob("tinyshakespeare-*")]  # no lock, no tmp


# --- impossible worlds: one line, at once, on every node ---------------------------------------------------


def refused(*args: str, timeout: int = 120) -> tuple[str, float]:
    started = time.monotonic()
    code, _, err = finish(make(*args), timeout=timeout)
    lines = program_stderr(err)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    return lines[0], time.monotonic() - started


def refused_here(*args: str) -> tuple[str, float]:
    """make train-multinode's refusal, in this process (the same through make: test_a_bad_hostfile_through_make)."""
    started = time.monotonic()
    result = llm_here("torchrun", *args, "--")
    lines = program_stderr(result.stderr)
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    return lines[0], time.monotonic() - started


def test_node_rank_not_below_nnodes():
    line, _ = refused_here("--nnodes=2", "--node_rank=2")
    assert line == "error: NODE_RANK=2: must be below NNODES=2 (node ranks run from 0 to 1)"


def test_master_port_in_use_on_node_0():
    port = free_port_pair()
    with socket.socket() as taken:
        taken.bind(("", port + 1))  # the agreement's port
        line, _ = refused_here("--nnodes=2", f"--master_port={port}")
    assert f"MASTER_PORT={port}: port {port + 1} is already in use" in line and "choose another MASTER_PORT" in line


def test_a_master_that_does_not_answer_stops_the_node_within_the_timeout():
    line, seconds = refused_here("--nnodes=2", "--node_rank=1", f"--master_port={free_port_pair()}", "--timeout=2")
    assert "MASTER_ADDR=127.0.0.1: no answer on port" in line and "within 2 s" in line and "LAUNCH_TIMEOUT=" in line
    assert seconds < 30


def test_an_unknown_master_host():
    line, _ = refused_here("--nnodes=2", "--node_rank=1", "--master_addr=no-such-host.invalid")
    assert line.startswith("error: MASTER_ADDR=no-such-host.invalid: unknown host")


@pytest.mark.parametrize(
    "text, fragment",
    [
        (None, "no such file"),
        ("localhost slot=2\n", "line 1 'localhost slot=2' is not \"host slots=N\""),
        ("node1 slots=2\nnode1 slots=2\n", "host node1 is listed twice"),
        ("node1 slots=2\nnode2 slots=4\n", "slots differ (node1=2, node2=4)"),
        ("# nothing\n", "names no host"),
    ],
)
def test_a_bad_hostfile(tmp_path, text, fragment):
    # the launcher's arguments as make train-deepspeed gives them, in this process (the same refusal
    # through make is test_a_bad_hostfile_through_make's)
    hostfile = tmp_path / "hostfile"
    if text is not None:
        hostfile.write_text(text)
    answer = llm_here("deepspeed", f"--hostfile={hostfile}", "--master_port=29500", "--timeout=300", "--")
    line = assert_refused(answer, f"HOSTFILE={hostfile}: ")
    assert line.startswith(f"error: HOSTFILE={hostfile}: ") and fragment in line, line


@pytest.mark.long  # through make, in a process of its own (the in-process twin runs in make test)
def test_a_bad_hostfile_through_make(tmp_path):
    line, _ = refused("train-deepspeed", f"HOSTFILE={tmp_path / 'none'}")
    assert line.startswith(f"error: HOSTFILE={tmp_path / 'none'}: ") and "no such file" in line, line


@pytest.mark.parametrize(
    "args, line",
    [
        (("torchrun", "--devices=0"), "error: DEVICES=0: processes per node must be at least 1"),
        (("torchrun", "--nnodes=0"), "error: NNODES=0: nodes must be at least 1"),
        (("torchrun", "--nnodes=two"), "error: NNODES=two: give a number of nodes, or MIN:MAX for an elastic job"),
        (("torchrun", "--nnodes=3:2"), "error: NNODES=3:2: the most nodes is below the fewest; give MIN:MAX, e.g. 3:4"),
        (
            ("torchrun", "--nnodes=1:2"),
            "error: NNODES=1:2: an elastic job restarts into the same run folder on every node; give RUN=runs/<name>",
        ),
        (
            ("torchrun", "--nnodes=1:2", "--", "--run=runs/x", "--resume=runs/y/last.ckpt"),
            "error: RESUME=runs/y/last.ckpt: an elastic job continues from its newest checkpoint after each restart",
        ),
        (("torchrun", "--nnodes=2", "--master_port=80"), "error: MASTER_PORT=80: not a usable port"),
        (("torchrun", "--nnodes=2", "--master_port=70000"), "error: MASTER_PORT=70000: not a usable port"),
        (("deepspeed", "--hostfile="), "error: HOSTFILE=: give a file of"),
        (("slurm", "--nnodes=0"), "error: NNODES=0: nodes must be at least 1"),
        (("slurm", "--signal_lead=0"), "error: SIGNAL_LEAD=0: give the seconds before the time limit"),
    ],
    ids=[
        "devices-0",
        "nnodes-0",
        "nnodes-word",
        "nnodes-max-below-min",
        "elastic-without-run",
        "elastic-resume",
        "port-low",
        "port-high",
        "hostfile-empty",
        "slurm-nnodes-0",
        "slurm-signal-lead-0",
    ],
)
def test_launcher_inputs_that_cannot_form_a_job(args, line):
    result = llm_here(*args)
    lines = program_stderr(result.stderr)
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith(line), result.stderr[-2000:]


def test_the_deepspeed_environment_file_carries_the_run_and_never_a_key(tmp_path, monkeypatch):
    from llm.launch.hosts import deepspeed_env_file

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / ".deepspeed_env").write_text("MY_SETTING=1\n\n")  # the user's own, as DeepSpeed reads it from here
    environ = {
        "LLM_RUN_DIR": "runs/my run",
        "GLOO_SOCKET_IFNAME": "eth1",
        "WANDB_MODE": "offline",
        "WANDB_API_KEY": "secret",
        "HF_TOKEN": "secret",
        "PATH": "/usr/bin",
    }
    path = deepspeed_env_file(environ)
    try:
        assert path.stat().st_mode & 0o077 == 0  # private to the user
        lines = path.read_text().splitlines()
        # as DeepSpeed's runner reads it: every line NAME=value
        assert dict(line.split("=", 1) for line in lines) == {
            "MY_SETTING": "1",
            "GLOO_SOCKET_IFNAME": "eth1",
            "LLM_RUN_DIR": "runs/my run",
            "WANDB_MODE": "offline",
        }
        alone = deepspeed_env_file({"PATH": "/usr/bin"})
        assert alone.read_text() == "MY_SETTING=1\n"  # and no empty line, which the runner cannot read
        alone.unlink()
    finally:
        path.unlink()
