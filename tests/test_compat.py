"""llm/compat.py holds what the project takes from library internals; these tests fail when a
library version changes what those internals do."""

from __future__ import annotations

from datetime import timedelta

import torch
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


def test_fused_adamw_leaves_everything_unchanged_while_found_inf_is_set():
    # guards.skip_update_if_nonfinite hands a non-finite gradient norm to torch's fused AdamW as a grad
    # scaler does; if torch stops reading the attribute, a NaN step would write NaN into the weights
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(4, 4))
    optimizer = torch.optim.AdamW([weight], lr=0.1, fused=True)
    weight.grad = torch.ones(4, 4)
    optimizer.step()  # one real step: moments and a step count exist
    before = weight.detach().clone(), {k: v.clone() for k, v in optimizer.state[weight].items()}

    weight.grad = torch.full((4, 4), float("nan"))
    compat.skip_fused_update_if(optimizer, torch.tensor(True))
    optimizer.step()
    compat.end_fused_skip(optimizer)
    assert torch.equal(weight.detach(), before[0])
    for key, value in optimizer.state[weight].items():
        assert torch.equal(value, before[1][key]), key

    weight.grad = torch.ones(4, 4)
    compat.skip_fused_update_if(optimizer, torch.tensor(False))
    optimizer.step()
    compat.end_fused_skip(optimizer)
    assert not torch.equal(weight.detach(), before[0]) and not hasattr(optimizer, "found_inf")
