"""Which blocks training reads (llm/data/datamodule.py, llm/data/epochs.py): windows of the token
stream, every block once per epoch, and batches that depend on the step and rank alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from llm.data.datamodule import StepSampler, TokenBlocks, TokenDataModule


def blocks_file(tmp_path: Path, n: int = 5000) -> TokenBlocks:
    data = np.arange(n, dtype=np.uint16)
    data.tofile(tmp_path / "train.bin")
    return TokenBlocks(tmp_path / "train.bin", "uint16", n, block_size=16, seed=7)


def batches(dataset, sampler, workers: int) -> list[torch.Tensor]:
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, sampler=sampler, num_workers=workers)
    return list(loader)


def test_batches_depend_only_on_step_and_rank_whatever_the_worker_count(tmp_path):
    dataset = blocks_file(tmp_path)
    one = batches(dataset, StepSampler(4, rank=1, world_size=2, start_batch=0, end_batch=6), workers=0)
    three = batches(dataset, StepSampler(4, rank=1, world_size=2, start_batch=0, end_batch=6), workers=2)
    assert all(torch.equal(a, b) for a, b in zip(one, three, strict=True))
    # a resumed loader that starts at batch 4 sees what the uninterrupted one saw at batch 4
    resumed = batches(dataset, StepSampler(4, rank=1, world_size=2, start_batch=4, end_batch=6), workers=2)
    assert torch.equal(resumed[0], one[4]) and torch.equal(resumed[1], one[5])
    # the other rank sees other blocks
    rank0 = batches(dataset, StepSampler(4, rank=0, world_size=2, start_batch=0, end_batch=6), workers=0)
    assert not any(torch.equal(a, b) for a, b in zip(one, rank0, strict=True))


def test_blocks_are_contiguous_windows_of_the_token_stream(tmp_path):
    dataset = blocks_file(tmp_path)
    for i in range(50):
        block = dataset[i]
        assert block.shape == (17,) and torch.equal(block, torch.arange(block[0], block[0] + 17))


def test_blocks_given_fewer_tokens_after_they_are_built_read_only_those(tmp_path):
    dataset = blocks_file(tmp_path)  # 5000 tokens
    dataset.n_tokens = 400  # as docs/extending.md's data budget does
    starts = [dataset.start(i) for i in range(200)]
    assert max(starts) + 17 <= 400 and len(set(starts[: (400 - 16) // 16])) == (400 - 16) // 16  # an epoch


@pytest.mark.parametrize("n_tokens, block_size", [(5000, 16), (17, 16), (40, 16), (100_003, 7), (64, 64 - 1)])
def test_each_epoch_reads_every_block_once_in_an_order_of_its_own(n_tokens, block_size):
    from llm.data.epochs import Epochs

    epochs = Epochs(n_tokens, block_size, seed=7)
    n = epochs.blocks
    assert n == max(1, (n_tokens - block_size) // block_size)
    orders, offsets = [], set()
    for epoch in range(4):
        starts = [epochs.start(epoch * n + k) for k in range(n)]
        offset = min(starts)
        # the epoch's blocks, each once, none overlapping the next but for the target token
        assert sorted(starts) == [offset + j * block_size for j in range(n)]
        assert 0 <= offset and max(starts) + block_size + 1 <= n_tokens
        orders.append([(s - offset) // block_size for s in starts])
        offsets.add(offset)
    if n >= 20:  # an order of its own each epoch, and block edges that move
        assert len({tuple(o) for o in orders}) == 4 and orders[0] != sorted(orders[0])
    if block_size >= 16 and n_tokens - n * block_size >= block_size:
        assert len(offsets) > 1
    # a sample's block depends on (seed, sample number) alone: the same asked again, in any order
    assert [epochs.start(i) for i in (3 * n + 1, 5, 0)] == [epochs.start(i) for i in (3 * n + 1, 5, 0)]
    assert Epochs(n_tokens, block_size, seed=8).start(0) != epochs.start(0) or n < 20


def test_datamodule_serves_the_prepared_tokens(tmp_path, code_corpus):
    dm = TokenDataModule(
        text=str(code_corpus),
        vocab_size=512,
        cache_dir=str(tmp_path),
        block_size=32,
        batch_size=4,
        num_workers=0,
        val_batches=3,
    )
    dm.prepare_data()
    dm.setup("fit")
    (batch,) = list(dm.train_loader(rank=0, world_size=1, start_batch=0, end_batch=1))
    assert batch.shape == (4, 33) and batch.dtype == torch.long
    # each row is a window of 33 consecutive tokens of train.bin, each from another place in it
    info = dm.meta["splits"]["train"]
    stream = np.fromfile(dm.folder / "train.bin", dtype=dm.meta["dtype"])[: info["tokens"]].tobytes()
    itemsize = np.dtype(dm.meta["dtype"]).itemsize
    places = set()
    for i, row in enumerate(batch):
        found = stream.find(row.numpy().astype(dm.meta["dtype"]).tobytes())
        while found >= 0 and found % itemsize:  # a match must start on a token, not inside one
            found = stream.find(row.numpy().astype(dm.meta["dtype"]).tobytes(), found + 1)
        assert found >= 0, f"row {i} is not a window of train.bin"
        places.add(found)
    assert len(places) == len(batch)
    val = list(dm.val_dataloader())
    assert len(val) == 3 and torch.equal(val[0], list(dm.val_dataloader())[0])  # the same blocks each time
