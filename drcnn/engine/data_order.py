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
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset, Sampler

from drcnn.data.group_sampler import grouped_batches, training_groups
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

    The epoch's permutation ``perm`` comes from ``(seed, epoch)``; global batch ``b`` is
    ``perm[b * global_batch : (b + 1) * global_batch]`` (only complete global batches are used)
    and rank ``r`` gets its elements ``r, r + world, ...``. With ``groups`` (one group id per
    sample) the global batches are cut from ``perm`` one group at a time instead
    (:func:`drcnn.data.group_sampler.grouped_batches`: every global batch single-group, each
    group's last one padded with repeats).
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
        groups: Sequence[int] | None = None,
    ) -> None:
        self.per_rank, self.rank, self.world = per_rank, rank, world
        generator = torch.Generator().manual_seed(mix_seed(seed, epoch))
        perm = torch.randperm(size, generator=generator).tolist()
        global_batch = per_rank * world
        if groups is None:
            self.batches = [
                perm[b * global_batch : (b + 1) * global_batch] for b in range(size // global_batch)
            ]
        else:
            self.batches = grouped_batches(perm, groups, global_batch)
        self.num_batches = len(self.batches)
        self.start_batch = start_batch

    def __iter__(self) -> Iterator[int]:
        for batch in self.batches[self.start_batch :]:
            yield from batch[self.rank :: self.world]

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
        training_groups(cfg, base.dataset),
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
