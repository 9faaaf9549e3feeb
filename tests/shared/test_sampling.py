"""The resumable, sharded data order of the training loop (kd_tasks.shared.sampling)."""

import random

import torch

from kd_tasks.shared.sampling import EpochBatches, SeededSamples


def indices(sampler):
    return [i for batch in sampler for i, _ in batch]


def test_shards_cover_the_epoch_once_and_match_distributed_padding():
    a = EpochBatches(10, 2, seed=3, epoch=1, rank=0, world=2, drop_last=False)
    b = EpochBatches(10, 2, seed=3, epoch=1, rank=1, world=2, drop_last=False)
    assert sorted(indices(a) + indices(b)) == list(range(10))
    odd = [EpochBatches(7, 1, seed=0, epoch=0, rank=r, world=3, drop_last=False) for r in range(3)]
    seen = [i for s in odd for i in indices(s)]
    assert len(seen) == 9 and set(seen) == set(range(7))  # padded to a multiple of the world size


def test_order_depends_on_seed_and_epoch_and_resume_starts_at_the_same_batch():
    full = indices(EpochBatches(32, 4, seed=1, epoch=2))
    assert full != indices(EpochBatches(32, 4, seed=1, epoch=3))
    assert full == indices(EpochBatches(32, 4, seed=1, epoch=2))
    resumed = indices(EpochBatches(32, 4, seed=1, epoch=2, start_batch=3))
    assert resumed == full[12:]


def test_per_sample_seed_makes_augmentation_independent_of_read_order():
    class Noisy:
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.rand(1).item() + random.random()

    ds = SeededSamples(Noisy())
    batches = list(EpochBatches(4, 4, seed=5, epoch=0, shuffle=False))[0]
    first = [ds[k][0] for k in batches]
    second = [ds[k][0] for k in reversed(batches)][::-1]
    assert first == second and len(set(first)) == 4
