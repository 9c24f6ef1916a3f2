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


def is_first_on_node() -> bool:
    """Local rank 0: the process that prepares the data on its node."""
    return local_rank() == 0
