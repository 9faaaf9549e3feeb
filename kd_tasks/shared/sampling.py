"""Data order the training loop can resume exactly, on one or several processes.

Each epoch's order is a permutation drawn from a generator seeded by ``(seed, epoch)``, padded (by
repeating its head) to a multiple of the number of processes and dealt out round-robin, as
``DistributedSampler`` does; process ``r`` takes ``order[r::world]``. A run resumed at batch ``b``
of epoch ``e`` starts from the same permutation at the same batch, without reading the skipped
samples.

Random augmentation is made reproducible per sample: each read of sample ``i`` in epoch ``e`` runs
with the Python, NumPy and torch generators seeded from ``(seed, epoch, i)`` (and restored
afterwards), so the view a sample gets does not depend on worker processes, prefetching or where a
run was resumed. Batches arrive as ``(batch, index)`` with the samples' dataset indices.
"""

from __future__ import annotations

import math
import random
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from .checkpoint import preserved_rng
from .errors import KDConfigError


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 32-bit seed for one read of one sample."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


class EpochBatches:
    """Batch sampler yielding lists of ``(index, sample_seed)`` for one epoch of one process."""

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: int,
        epoch: int,
        rank: int = 0,
        world: int = 1,
        shuffle: bool = True,
        drop_last: bool = True,
        start_batch: int = 0,
        seed_samples: bool = True,
    ):
        if num_samples <= 0:
            raise KDConfigError("the training dataset is empty")
        self.num_samples, self.batch_size = int(num_samples), int(batch_size)
        self.seed, self.epoch, self.rank, self.world = int(seed), int(epoch), int(rank), int(world)
        self.shuffle, self.drop_last, self.start_batch = shuffle, drop_last, int(start_batch)
        self.seed_samples = seed_samples

    def shard(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        total = math.ceil(self.num_samples / self.world) * self.world
        order += order[: total - len(order)]
        return order[self.rank::self.world]

    def batches_per_epoch(self) -> int:
        per_rank = math.ceil(self.num_samples / self.world)
        return per_rank // self.batch_size if self.drop_last else math.ceil(per_rank / self.batch_size)

    def __len__(self) -> int:
        return max(self.batches_per_epoch() - self.start_batch, 0)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        shard = self.shard()
        for b in range(self.start_batch, self.batches_per_epoch()):
            indices = shard[b * self.batch_size: (b + 1) * self.batch_size]
            yield [(i, sample_seed(self.seed, self.epoch, i) if self.seed_samples else -1) for i in indices]


class SeededSamples(Dataset):
    """Reads ``dataset[index]`` with the generators seeded per read; returns ``(sample, index)``."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Any, int]:
        index, seed = key
        if seed < 0:
            return self.dataset[index], index
        with preserved_rng():
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
            return self.dataset[index], index


class IndexedCollate:
    """``[(sample, index), ...] -> (collate(samples), LongTensor(indices))``."""

    def __init__(self, collate_fn: Callable[[Sequence[Any]], Any] | None = None):
        self.collate_fn = collate_fn or default_collate

    def __call__(self, items: Sequence[tuple[Any, int]]) -> tuple[Any, torch.Tensor]:
        return self.collate_fn([s for s, _ in items]), torch.tensor([i for _, i in items], dtype=torch.long)


def epoch_loader(
    dataset: Any,
    sampler: EpochBatches,
    collate_fn: Callable | None = None,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader over one epoch (from ``sampler.start_batch``) that never touches the global RNG."""
    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise KDConfigError(
            "the training loop needs a map-style dataset (with __len__ and __getitem__) so that it can resume "
            "exactly and pass sample indices; wrap an iterable dataset in a list or a map-style Dataset"
        )
    generator = torch.Generator().manual_seed(sampler.seed * 100_003 + sampler.epoch + 1)
    return DataLoader(
        SeededSamples(dataset),
        batch_sampler=sampler,
        collate_fn=IndexedCollate(collate_fn),
        num_workers=num_workers,
        pin_memory=pin_memory,
        generator=generator,
    )


__all__ = ["EpochBatches", "SeededSamples", "IndexedCollate", "epoch_loader", "sample_seed"]
