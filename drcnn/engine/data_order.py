"""The order and the random augmentation of training samples, fixed by seed and epoch.

The data order of epoch ``e`` is a permutation drawn from ``(train.seed, e)``; every sample's
random augmentation is drawn from its own generator seeded by ``(train.seed, e, index)`` (inside
``torch.random.fork_rng``, so neither the worker count nor the model's own random sampling
changes it). The global batch of iteration ``i`` is the same whatever the number of processes:
rank ``r`` takes every ``world``-th sample of it. This is what lets a resumed run continue
exactly where the interrupted one stopped.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset, Sampler

from drcnn.engine import distributed as dist


def mix_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part (numpy's SeedSequence hashing)."""
    return int(
        np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1
    )


class EpochSeededDataset(Dataset):
    """Draws each sample's augmentation from a generator seeded by ``(seed, epoch, index)``."""

    def __init__(self, dataset: Dataset, seed: int, epoch: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix_seed(self.seed, self.epoch, index))
            return self.dataset[index]


class GlobalBatchSampler(Sampler[int]):
    """This rank's samples of an epoch, in global-batch order, from batch ``start_batch`` on.

    The epoch's permutation comes from ``(seed, epoch)``; global batch ``b`` is
    ``perm[b * global_batch : (b + 1) * global_batch]`` and rank ``r`` gets its elements
    ``r, r + world, ...``. Only complete global batches are used.
    """

    def __init__(
        self,
        size: int,
        per_rank: int,
        rank: int,
        world: int,
        seed: int,
        epoch: int,
        start_batch: int,
    ) -> None:
        self.per_rank, self.rank, self.world = per_rank, rank, world
        generator = torch.Generator().manual_seed(mix_seed(seed, epoch))
        self.perm = torch.randperm(size, generator=generator).tolist()
        self.num_batches = size // (per_rank * world)
        self.start_batch = start_batch

    def __iter__(self) -> Iterator[int]:
        global_batch = self.per_rank * self.world
        for b in range(self.start_batch, self.num_batches):
            yield from self.perm[b * global_batch + self.rank : (b + 1) * global_batch : self.world]

    def __len__(self) -> int:
        return (self.num_batches - self.start_batch) * self.per_rank


def seed_worker(worker_id: int) -> None:
    """Seed python/numpy in a loader worker from the torch seed the loader gave it."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def epoch_loader(
    base: DataLoader, cfg: DictConfig, epoch: int, start_batch: int, device: torch.device
) -> DataLoader:
    """The training loader of ``epoch`` starting at (per-rank) batch ``start_batch``.

    Reuses the dataset, collate function and worker count of the data part's loader ``base``
    and replaces only the order and the seeding (see the module docstring).
    """
    seed = cfg.train.seed
    sampler = GlobalBatchSampler(
        len(base.dataset),
        cfg.data.batch_size,
        dist.get_rank(),
        dist.get_world_size(),
        seed,
        epoch,
        start_batch,
    )
    return DataLoader(
        EpochSeededDataset(base.dataset, seed, epoch),
        batch_size=cfg.data.batch_size,
        sampler=sampler,
        collate_fn=base.collate_fn,
        num_workers=base.num_workers,
        worker_init_fn=seed_worker,
        generator=torch.Generator().manual_seed(mix_seed(seed, epoch, dist.get_rank())),
        pin_memory=device.type == "cuda",
    )
