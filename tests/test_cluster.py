"""The launchers on real cluster software, on this one machine: `make slurm` on a real one-host
SLURM cluster (tests/cluster.py): a job on a CPU partition, its preemption and requeue, its time
limit, the signals as SLURM delivers them, a bad input; `make train-multinode` on two hosts with
their own addresses (network namespaces, tests/hosts.py): the losses of one node, a wrong
interface, a host that dies. Run by `make cluster-test` (as root, with Debian's slurm-wlm, munge
and iproute2), not by `make test`."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest

import hosts as hosts_module
from cluster import SlurmCluster, missing_tools
from hosts import IFNAME, Hosts
from llm.checkpointing.files import Checkpoint
from support import REPO, callbacks, data_args, finish, losses, make, program_stderr
from support import STEPS as STEPS_CANONICAL

pytestmark = pytest.mark.cluster

STEPS = 40
ZERO2 = ("NNODES=1", "DEVICES=2", "DS=zero2")  # two CPU processes on the one node


def skip_or_fail(reason: str) -> None:
    """A fork's CI or a laptop skips; a CI that installed the tools (.ci/run sets
    LLM_REQUIRE_CLUSTER=1) fails: a skip there would hide a lost test."""
    if os.environ.get("LLM_REQUIRE_CLUSTER") == "1":
        pytest.fail(f"{reason} (LLM_REQUIRE_CLUSTER=1)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if os.geteuid() != 0:
        skip_or_fail("a local SLURM cluster runs as root")
    if missing := missing_tools():
        skip_or_fail(f"no {', '.join(missing)}: apt-get install slurm-wlm munge")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    cluster.start()
    yield cluster
    cluster.stop()


def submit(slurm: SlurmCluster, *variables: str) -> tuple[str, Path, str]:
    """`make slurm ...` as a user types it: (job id, the job's log, what make printed)."""
    code, out, err = finish(make("slurm", *variables, env=slurm.env), timeout=120)
    assert code == 0, err[-3000:]
    job = re.search(r"^Submitted batch job (\d+)$", out, re.M)
    assert job, out
    return job.group(1), REPO / "runs" / f"slurm-{job.group(1)}.out", out


def log_text(log: Path) -> str:
    return log.read_text(errors="replace") if log.exists() else ""


def wait_in_log(slurm: SlurmCluster, job: str, log: Path, pattern: str, timeout: float = 240) -> str:
    deadline = time.monotonic() + timeout
    while not re.search(pattern, text := log_text(log), re.M):
        state = slurm.job(job).get("JobState")
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"job {job} {state}:\n{text[-3000:]}"
        assert time.monotonic() < deadline, f"no {pattern!r} in {log} within {timeout:.0f} s:\n{text[-3000:]}"
        time.sleep(0.3)
    return text


def restart_now(slurm: SlurmCluster, job: str) -> None:
    """SLURM holds a requeued job for 120 s before it may start again (its begin time); a test
    brings that forward, as an administrator can, and leaves the rest to SLURM. Not within the
    second in which slurmd revoked the credential of the run it ended (before the job is PENDING):
    slurmd compares whole seconds and refuses a credential issued in that one, and the job then
    FAILs without running (slurm's cred.c: ctime <= revoked), which a job waiting 120 s never meets."""
    slurm.wait_for(job, {"PENDING"}, timeout=120)
    time.sleep(1.05 - time.time() % 1)  # into the next whole second
    slurm.run("scontrol", "update", f"JobId={job}", "StartTime=now")


@pytest.fixture(scope="module")
def settings(code_corpus, data_cache) -> str:
    return f"{data_args(code_corpus, data_cache)} --data.num_workers=1 --eval_every=1000"


@pytest.fixture(scope="module")
def uninterrupted(slurm, settings):
    """`make slurm NNODES=1 DEVICES=2 DS=zero2` on the CPU partition, to its end: the run the
    interrupted ones are compared with. Its run folder is the default one, named by the job id."""
    experiment = f"test-slurm-{os.getpid()}"
    variables = ("PARTITION=cpu", "TIME=00:10:00", "ACCOUNT=proj")  # the job's, as SLURM records them
    job, log, out = submit(
        slurm, *ZERO2, *variables, f"ARGS={settings} --trainer.max_steps={STEPS} --experiment={experiment}"
    )
    run = REPO / "runs" / f"{experiment}-{job}"
    try:
        state = slurm.wait_for(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=300)
        yield {"job": job, "log": log, "run": run, "out": out, "state": state, "text": log_text(log)}
    finally:
        log.unlink(missing_ok=True)
        for folder in (REPO / "runs").glob(f"{experiment}-*"):
            shutil.rmtree(folder, ignore_errors=True)


def test_make_slurm_trains_two_cpu_processes_with_zero2_to_the_end(uninterrupted):
    out, text, state = uninterrupted["out"], uninterrupted["text"], uninterrupted["state"]
    # a CPU partition: no GPU request, which SLURM would refuse there
    assert "slurm: partition cpu has no GPUs (sinfo): one CPU process per task, no GPU request" in out
    sbatch = next(line for line in out.splitlines() if line.startswith("sbatch "))
    assert "--gpus-per-node" not in sbatch and "--nodes=1 --ntasks-per-node=2" in sbatch
    # each training option once: the launcher gives the processes their counts
    assert sbatch.count("--trainer.devices=") == 1 and sbatch.count("--trainer.num_nodes=") == 1
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0" and state["Restarts"] == "0", text[-3000:]
    assert state["NumTasks"] == "2" and state["StdOut"] == str(uninterrupted["log"])
    assert (state["Partition"], state["TimeLimit"], state["Account"]) == ("cpu", "00:10:00", "proj")
    summary = json.loads((uninterrupted["run"] / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["world_size"] == 2 and summary["strategy"] == "deepspeed zero2"
    assert sorted(losses(uninterrupted["run"])) == list(range(1, STEPS + 1))
    assert "Traceback" not in text and "auto-requeueing" not in text  # Lightning's own requeue is off


def test_a_preempted_job_saves_requeues_itself_and_continues_to_the_same_losses(
    slurm, settings, uninterrupted, experiment
):
    job, log, _ = submit(slurm, *ZERO2, f"ARGS={settings} --trainer.max_steps={STEPS} --experiment={experiment}")
    run = REPO / "runs" / f"{experiment}-{job}"
    try:
        wait_in_log(slurm, job, log, r"^step 8/")
        # to the batch shell, its children and every task: the tasks get SIGUSR1 directly and
        # again from the batch shell, which hands it on (scripts/slurm/train.sbatch)
        slurm.run("scancel", "--signal=USR1", "--full", job)
        text = wait_in_log(slurm, job, log, r"^stopped: SIGUSR1 at step \d+; saved \S+; requeueing SLURM job \d+$")
        restart_now(slurm, job)
        state = slurm.wait_for(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=300)
        text = log_text(log)
        restarted = state["JobState"] == "COMPLETED" and state["Restarts"] == "1"
        assert restarted, f"{state}\n{text[-3000:]}\n{slurm.logs()}"  # SLURM's own logs say why a start failed
        stopped = re.search(rf"^stopped: SIGUSR1 at step (\d+); saved (\S+); requeueing SLURM job {job}$", text, re.M)
        at = int(stopped.group(1))
        assert stopped.group(2) == f"runs/{experiment}-{job}/checkpoints/step-{at:06d}.ckpt"
        assert text.count("SIGUSR1: saving a checkpoint at the end of this step, then stopping") == 1
        assert "batch shell: SIGUSR1, passed on to the tasks" in text
        assert f"slurm job {job}: 1 nodes x 2 processes, start 1," in text  # the same job id, started again
        assert f"Restored all states from the checkpoint at {stopped.group(2)}" in text
        assert "Traceback" not in text, text[-3000:]
        # every step logged once, and the steps after the resume as the uninterrupted run took them
        mine, reference = losses(run), losses(uninterrupted["run"])
        assert at >= 8 and sorted(mine) == list(range(1, STEPS + 1))
        for step in range(at + 1, STEPS + 1):
            assert mine[step] == pytest.approx(reference[step], abs=1e-5), step
        assert json.loads((run / "summary.json").read_text())["steps"] == STEPS
    finally:
        slurm.run("scancel", job, check=False)
        log.unlink(missing_ok=True)


def test_a_job_warned_before_its_time_limit_saves_and_requeues_itself(slurm, settings, experiment):
    # SLURM sends the warning SIGNAL_LEAD seconds before the limit, up to a minute earlier: with a
    # 2-minute limit and 30 s, between 30 and 90 s into the job, once it is training
    job, log, _ = submit(
        slurm, "NNODES=1", "DEVICES=2", "TIME=00:02:00", "SIGNAL_LEAD=30",
        f"ARGS={settings} --trainer.max_steps=100000 --experiment={experiment}",
    )  # fmt: skip
    try:
        state = slurm.job(job)
        assert state["TimeLimit"] == "00:02:00"
        text = wait_in_log(slurm, job, log, r"^stopped: SIGUSR1 at step \d+; saved \S+; requeueing SLURM job \d+$", 150)
        at = int(re.search(r"^stopped: SIGUSR1 at step (\d+)", text, re.M).group(1))
        state = slurm.wait_for(job, {"PENDING"}, timeout=60)
        assert state["Restarts"] == "1" and state["Reason"] == "BeginTime"  # back in the queue, same id
        saved = REPO / "runs" / f"{experiment}-{job}" / "checkpoints" / f"step-{at:06d}.ckpt"
        assert Checkpoint(saved).read()["global_step"] == at
        assert "Traceback" not in text, text[-3000:]
    finally:
        slurm.run("scancel", job, check=False)
        log.unlink(missing_ok=True)


def test_sigterm_to_the_job_step_saves_on_both_tasks_and_stops(slurm, settings, experiment):
    job, log, _ = submit(slurm, *ZERO2, f"ARGS={settings} --trainer.max_steps=100000 --experiment={experiment}")
    try:
        wait_in_log(slurm, job, log, r"^step 5/")
        slurm.run("scancel", "--signal=TERM", job)  # the job step's tasks and their DataLoader workers
        state = slurm.wait_for(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=120)
        text = log_text(log)
        stopped = re.search(r"^stopped: SIGTERM at step (\d+); saved (\S+); make train .*RESUME=auto$", text, re.M)
        assert stopped and "Traceback" not in text, text[-3000:]
        assert state["Restarts"] == "0"  # a stop, not a requeue
        saved = REPO / stopped.group(2)
        # a ZeRO-2 checkpoint: each task wrote its part of the optimizer state
        assert len(list(saved.glob("**/*zero_pp_rank_[01]_*optim_states.pt"))) == 2, list(saved.rglob("*"))
    finally:
        slurm.run("scancel", job, check=False)
        log.unlink(missing_ok=True)


def test_a_bad_input_fails_the_job_once_with_one_line(slurm, settings, experiment):
    job, log, _ = submit(slurm, "MODEL=nope", f"ARGS={settings} --experiment={experiment}")
    try:
        state = slurm.wait_for(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=120)
        time.sleep(3)  # not requeued: it stays failed
        state = slurm.job(job)
        text = log_text(log)
        assert state["JobState"] == "FAILED" and state["Restarts"] == "0", text[-3000:]
        errors = [line for line in text.splitlines() if line.startswith("error: ")]
        missing = "model.config=configs/model/nope.yaml: no such config file; configs/model/ has gpt2-1.5b,"
        assert len(errors) == 1 and errors[0].startswith(f"error: {missing}"), text
        assert "Traceback" not in text
    finally:
        log.unlink(missing_ok=True)


# --- two hosts with their own addresses (tests/hosts.py) ----------------------------------------------


@pytest.fixture(scope="module")
def hosts():
    if os.geteuid() != 0:
        skip_or_fail("network namespaces are created as root")
    if missing := hosts_module.missing_tools():
        skip_or_fail(f"no {', '.join(missing)}: apt-get install iproute2 pdsh openssh-server")
    pair = Hosts()
    pair.create()
    yield pair
    pair.destroy()


def on_host(hosts: Hosts, host: int, *variables: str, env: dict | None = None):
    """`make train-multinode` on one of the two hosts, as its node `host`."""
    command = ["make", "-s", "train-multinode", "NNODES=2", f"NODE_RANK={host}", f"MASTER_ADDR={hosts.address(0)}"]
    return hosts.popen(
        host,
        [*command, *variables],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "GLOO_SOCKET_IFNAME": IFNAME, **(env or {})},
    )


def canonical_args(runs, *extra: str) -> str:
    # the canonical runs' settings (tests/support.py), less the run folder and the command
    canonical = [a for a in runs.args(Path("unused"), probes=()) if not a.startswith("--run=")][3:]
    return shlex.join([*canonical, *extra])


def test_two_hosts_train_zero2_to_the_losses_of_one_node(hosts, runs, experiment):
    args = canonical_args(runs, "--deepspeed=zero2", f"--experiment={experiment}")
    nodes = [on_host(hosts, host, "MASTER_PORT=29500", f"ARGS={args}") for host in (0, 1)]
    results = [finish(node) for node in nodes]
    for host, (code, out, err) in enumerate(results):
        assert code == 0, f"host {host}: {out[-2000:]}{err[-3000:]}"
        assert out.startswith(f"torchrun: 2 nodes x 1 processes = 2 processes; master {hosts.address(0)}:29500")
    (run,) = (REPO / "runs").glob(f"{experiment}-*")  # one folder on the filesystem both hosts share
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["strategy"] == "deepspeed zero2"
    expected, got = losses(runs("zero2")), losses(run)  # the same job, started by Lightning on one node
    assert sorted(got) == sorted(expected) == list(range(1, STEPS_CANONICAL + 1))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=1e-6), f"step {step}"


def deepspeed_launcher(hosts: Hosts, hostfile: Path, *variables: str, env: dict) -> subprocess.Popen:
    """`make train-deepspeed` on the first host, which starts both over ssh (pdsh)."""
    hostfile.write_text("".join(f"{hosts.address(h)} slots=1\n" for h in (0, 1)))
    command = ["make", "-s", "train-deepspeed", f"HOSTFILE={hostfile}", *variables]
    return hosts.popen(
        0,
        command,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "GLOO_SOCKET_IFNAME": IFNAME, **env},
    )


def test_the_deepspeed_launcher_starts_both_hosts_over_ssh_to_the_losses_of_one_node(hosts, runs, tmp_path):
    ssh = hosts.start_ssh(tmp_path / "ssh")
    run = tmp_path / "run"  # RUN= and GLOO_SOCKET_IFNAME= reach the other host's process through DS_ENV_FILE
    args = canonical_args(runs, "--deepspeed=zero2")
    code, out, err = finish(deepspeed_launcher(hosts, tmp_path / "hostfile", "MASTER_PORT=29520", f"RUN={run}",
                                               f"ARGS={args}", env=ssh))  # fmt: skip
    assert code == 0, out[-3000:] + err[-3000:]
    assert out.startswith(f"deepspeed: 2 nodes x 1 processes = 2 processes ({hosts.address(0)}, {hosts.address(1)})")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["strategy"] == "deepspeed zero2"
    expected, got = losses(runs("zero2")), losses(run)
    assert sorted(got) == sorted(expected) == list(range(1, STEPS_CANONICAL + 1))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=1e-6), f"step {step}"

    # without the key, the launcher refuses before it starts anything, naming the host
    refused = deepspeed_launcher(hosts, tmp_path / "hostfile", "MASTER_PORT=29520", f"RUN={tmp_path / 'no'}", env={})
    code, out, err = finish(refused, timeout=120)
    (line,) = program_stderr(err)
    assert code == 2 and line.startswith(
        f"error: HOSTFILE={tmp_path / 'hostfile'}: host {hosts.address(0)} does not answer ssh without a password ("
    ), err
    assert not (tmp_path / "no").exists()


def test_an_interface_that_is_not_there_is_one_line_naming_the_right_one(hosts):
    process = on_host(hosts, 1, "MASTER_PORT=29500", env={"GLOO_SOCKET_IFNAME": "eth9"})
    code, out, err = finish(process, timeout=120)
    assert code == 2 and program_stderr(err) == [
        f"error: GLOO_SOCKET_IFNAME=eth9: no interface eth9 on this host (it has {IFNAME}, lo); "
        f"MASTER_ADDR={hosts.address(0)} is reached through {IFNAME}; give the interface on the nodes' network"
    ], err


def test_a_host_that_dies_stops_the_other_within_the_collective_timeout_and_resume_continues(hosts, runs, tmp_path):
    run = tmp_path / "run"
    sleep = callbacks('{"class_path": "tests.helpers.StepSleep", "init_args": {"seconds": 0.3}}')
    args = canonical_args(runs, "--deepspeed=zero2", "--collective_timeout=20", "--save_every=2", sleep)
    variables = ("MASTER_PORT=29510", f"RUN={run}", f"ARGS={args}")
    stays, dies = (on_host(hosts, host, *variables, env={"PYTHONUNBUFFERED": "1"}) for host in (0, 1))
    deadline = time.monotonic() + 240
    while not (run / "checkpoints" / "step-000004.ckpt").exists():
        assert stays.poll() is None and dies.poll() is None and time.monotonic() < deadline, finish(stays)
        time.sleep(0.3)
    # the host goes silent: its link down first (no connection is closed, nothing more is sent), then
    # its processes go
    hosts.unplug(1)
    gone = time.monotonic()
    hosts.kill_all(1)
    code, out, err = finish(stays, timeout=300)
    waited = time.monotonic() - gone
    dies.wait()
    stopped = [line for line in err.splitlines() if line.startswith("stopped: ")]
    assert code != 0 and len(stopped) == 1, err[-4000:]
    assert "within 20 s (collective_timeout)" in stopped[0], stopped
    assert waited < 20 + 60, waited  # the timeout, and the ending of what the process started

    hosts.plug(1)
    again = [on_host(hosts, host, *variables, "RESUME=auto") for host in (0, 1)]
    for host, (code, out, err) in enumerate(finish(node) for node in again):
        assert code == 0, f"host {host}: {out[-2000:]}{err[-3000:]}"
    assert json.loads((run / "summary.json").read_text())["steps"] == STEPS_CANONICAL
    assert sorted(losses(run)) == list(range(1, STEPS_CANONICAL + 1))  # every step once, across the stop
