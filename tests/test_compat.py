"""llm/compat.py holds what the project takes from library internals; these tests fail when a
library version changes what those internals do."""

from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist

from llm import compat


def test_every_process_group_gets_the_timeout_including_groups_made_later(tmp_path):
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1, timeout=timedelta(seconds=50)
    )
    try:
        dist.new_group([0])  # as DeepSpeed does for its copy of the world group
        before = compat.process_group_timeouts()
        # one entry per group and device type; the group made later has torch's default, not 50 s
        assert set(before) == {timedelta(seconds=50), timedelta(minutes=30)}

        compat.set_timeout_of_every_process_group(timedelta(seconds=7))

        after = compat.process_group_timeouts()
        assert len(after) == len(before) and set(after) == {timedelta(seconds=7)}
    finally:
        dist.destroy_process_group()
