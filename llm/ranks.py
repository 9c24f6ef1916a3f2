"""Which process this is, as launchers announce it in the environment before any process group exists.

torchrun sets RANK and LOCAL_RANK, SLURM sets SLURM_PROCID and SLURM_LOCALID, Lightning's own
launcher sets LOCAL_RANK (and NODE_RANK across nodes) in the processes it starts; the process a
user started by hand has none of them.
"""

import os


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))


def is_first_process() -> bool:
    """Rank 0 of the whole job: the process that checks and creates the run folder."""
    for var in ("RANK", "SLURM_PROCID"):
        if var in os.environ:
            return int(os.environ[var]) == 0
    return int(os.environ.get("NODE_RANK", 0)) == 0 and local_rank() == 0


def say(*lines: str) -> None:
    """Print once per job, from the first process: every message of a run that is not an error."""
    if is_first_process():
        print(*lines, sep="\n", flush=True)


def is_first_on_node() -> bool:
    """Local rank 0: the process that prepares the data on its node."""
    return local_rank() == 0


def slurm_job_id() -> str | None:
    """The id of the SLURM job whose tasks srun started (not of an interactive allocation's shell)."""
    if "SLURM_PROCID" not in os.environ or os.environ.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return None
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    return f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else os.environ.get("SLURM_JOB_ID")


def requeue_slurm_job(job: str) -> str:
    """Put the job back in SLURM's queue (`scontrol requeue`; SLURM then ends this run of it, and the
    next one keeps the id): '' when done, else what went wrong, for the stop line."""
    import subprocess

    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"scontrol requeue {job} failed ({exc})"
    if result.returncode:
        return f"scontrol requeue {job} failed (status {result.returncode}: {result.stderr.strip()})"
    return ""
