"""Fixed-length blocks of prepared tokens, sampled deterministically from (step, rank).

Training sample number i (counted over the whole run, all ranks) reads a block of the split chosen
from (seed, i) alone, every block once per epoch (llm/data/epochs.py). Rank r's k-th micro-batch
holds samples (k·W + r)·B ... + B - 1,
so the batch a rank sees at a given step depends on nothing but the step: a resumed run sees exactly
the data an uninterrupted run would have, whatever the number of loader workers.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from llm import signals
from llm.config import LoaderConfig, PrepareConfig
from llm.data.epochs import Epochs
from llm.data.prepare import load_meta, prepare, prepared_dir


class TokenBlocks(Dataset):
    """Block number i: block_size + 1 tokens (inputs and their next-token targets) from a memmap.

    `offsets`: "epochs" reads every block of the file once per epoch, in an order drawn from the seed
    (training); "spread" places `length` blocks evenly over the file, the same every time (validation)."""

    def __init__(
        self,
        path: Path,
        dtype: str,
        n_tokens: int,
        block_size: int,
        seed: int = 0,
        offsets: Literal["epochs", "spread"] = "epochs",
        length: int | None = None,
    ):
        if n_tokens < block_size + 1:
            raise ValueError(f"{path} holds {n_tokens} tokens, fewer than block_size + 1 = {block_size + 1}")
        self.path, self.dtype, self.n_tokens = path, dtype, n_tokens
        self.block_size, self.seed, self.offsets, self.length = block_size, seed, offsets, length
        self._epochs: Epochs | None = None
        self._data: np.ndarray | None = None  # opened lazily, once per loader worker

    @property
    def epochs(self) -> Epochs:
        """The blocks of an epoch, for the tokens this dataset has now (a subclass may give it fewer
        after it is built, docs/extending.md's data budget)."""
        if self._epochs is None or self._epochs.n_tokens != self.n_tokens:
            self._epochs = Epochs(self.n_tokens, self.block_size, self.seed)
        return self._epochs

    def __len__(self) -> int:
        return self.length if self.length is not None else 2**62  # training: indexed by sample number

    def start(self, i: int) -> int:
        span = self.n_tokens - self.block_size  # valid starts: 0 .. span-1
        if self.offsets == "spread":
            return (i * span) // max(self.length or 1, 1)
        return self.epochs.start(i)

    def __getitem__(self, i: int) -> torch.Tensor:
        data = self._data
        if data is None:
            data = self._data = np.memmap(self.path, dtype=self.dtype, mode="r")[: self.n_tokens]
        s = self.start(i)
        return torch.from_numpy(data[s : s + self.block_size + 1].astype(np.int64))


class StepSampler(Sampler[int]):
    """Sample numbers of one rank for micro-batches start_batch .. end_batch - 1.

    Its length counts the whole run (end_batch micro-batches) even when it starts later: Lightning
    restores how many batches a resumed epoch has done and expects the loader's length to count
    them too, while the data itself must continue where the checkpoint left off."""

    def __init__(self, batch_size: int, rank: int, world_size: int, start_batch: int, end_batch: int):
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.start_batch, self.end_batch = start_batch, end_batch

    def __iter__(self):
        for k in range(self.start_batch, self.end_batch):
            first = (k * self.world_size + self.rank) * self.batch_size
            yield from range(first, first + self.batch_size)

    def __len__(self) -> int:
        return self.end_batch * self.batch_size


class StepDataLoader(DataLoader):
    """The training DataLoader. It counts the seconds the training loop spends waiting for it
    (`wait_seconds`, read by the performance monitor), and Lightning may treat it as resumable: it
    is, because it is rebuilt from the restored global step (see StepSampler), so it has no other
    state to keep."""

    wait_seconds = 0.0

    def __iter__(self):
        batches = super().__iter__()
        while True:
            start = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                return
            finally:
                self.wait_seconds += time.perf_counter() - start
            yield batch

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class TokenDataModule(L.LightningDataModule):
    def __init__(
        self,
        block_size: int = LoaderConfig.block_size,
        batch_size: int | Literal["auto"] = LoaderConfig.batch_size,
        num_workers: int = LoaderConfig.num_workers,
        val_batches: int = LoaderConfig.val_batches,
        seed: int = LoaderConfig.seed,
        **prepare,
    ):
        """The data: how it is loaded (LoaderConfig's fields) and what is prepared (PrepareConfig's).

        Args:
            block_size: tokens per training sequence (linked to model.config.block_size)
            batch_size: sequences per micro-batch per device; auto: the largest that fits the device's memory
                and divides tokens_per_step (llm/preflight/autosize.py)
            num_workers: DataLoader worker processes
            val_batches: micro-batches per validation run per device, the same blocks every time
            seed: seed of the training sample positions
            prepare: PrepareConfig's fields (text, hf, tokenizer, vocab_size, ...), each its own --data.<name>
        """
        super().__init__()
        # jsonargparse follows `prepare` into PrepareConfig: its fields are the CLI's --data.<name>
        self.prepare_config = PrepareConfig(**prepare)
        self.block_size, self.batch_size, self.num_workers = block_size, batch_size, num_workers
        self.val_batches, self.seed = val_batches, seed
        self.folder: Path | None = None
        self.meta: dict = {}  # the prepared data's meta.json, read in setup

    def prepare_data(self) -> None:
        # the CLI has prepared already, before any process group existed: this finds the cache
        prepare(self.prepare_config, log=lambda *_: None)

    def setup(self, stage: str | None = None) -> None:
        self.folder = prepared_dir(self.prepare_config)
        self.meta = load_meta(self.folder)

    def blocks(self, split: str, **kwargs) -> TokenBlocks:
        """The blocks of a split that the loaders sample from: what a subclass changes to train on
        other blocks (docs/extending.md, "A DataModule")."""
        info = self.meta["splits"][split]
        return TokenBlocks(self.folder / info["file"], self.meta["dtype"], info["tokens"], self.block_size, **kwargs)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        assert trainer is not None, "a training loader is made for a trainer"
        accumulate = trainer.accumulate_grad_batches
        # resume: continue at the micro-batch after the checkpoint's last optimizer step
        start = trainer.global_step * accumulate
        return self.train_loader(trainer.global_rank, trainer.world_size, start, trainer.max_steps * accumulate)

    def train_loader(self, rank: int, world_size: int, start_batch: int, end_batch: int) -> DataLoader:
        """Micro-batches start_batch .. end_batch - 1 of this rank."""
        sampler = StepSampler(self.micro_batch, rank, world_size, start_batch, end_batch)
        return self._loader(self.blocks("train", seed=self.seed, offsets="epochs"), sampler, StepDataLoader)

    def val_dataloader(self) -> DataLoader:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        n = self.val_batches * self.micro_batch * world
        blocks = self.blocks("val", offsets="spread", length=n)
        return self._loader(blocks, list(range(rank, n, world)))  # disjoint share per rank

    @property
    def micro_batch(self) -> int:
        """batch_size as a number: "auto" is resolved before the data module is built (llm/preflight/autosize.py)."""
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int):
            raise ValueError(f"data.batch_size={self.batch_size}: not resolved to a number of sequences")
        return self.batch_size

    def _loader(self, dataset, sampler, loader_class=DataLoader) -> DataLoader:
        return loader_class(
            dataset,
            batch_size=self.micro_batch,
            sampler=sampler,
            num_workers=self.num_workers,
            # Ctrl-C, scancel and SLURM's warning reach every process of the group: a worker they killed
            # would end training mid-step, before the checkpoint at its end. Workers end with the run
            worker_init_fn=signals.ignore,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
            prefetch_factor=4 if self.num_workers > 0 else None,
        )
