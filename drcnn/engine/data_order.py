"""The order and the random augmentation of training samples, fixed by seed and epoch.

The data order of epoch ``e`` is a permutation drawn from ``(train.seed, e)``; every sample's
random augmentation is drawn from the CPU generator seeded by ``(train.seed, e, index)``
(inside ``torch.random.fork_rng``, so neither the worker count nor the model's own random
sampling changes it, and the model's random state, on the CPU or a GPU, is left as it was). The
global batch of iteration ``i`` is the same whatever the number of processes: rank ``r`` takes
every ``world``-th sample of it. This is what lets a resumed run continue exactly where the
interrupted one stopped.

One loader serves the whole run (:class:`TrainingLoader`): its sampler yields ``(epoch, index)``
pairs, so its workers, started once, need no per-epoch state, and starting an epoch (or going on
after an evaluation) re-creates only the iterator, never the worker processes.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset, Sampler

from drcnn.data.group_sampler import grouped_batches, training_groups
from drcnn.data.loader import worker_context
from drcnn.engine import distributed as dist


def mix_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part (numpy's SeedSequence hashing)."""
    return int(
        np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1
    )


class EpochSeededDataset(Dataset):
    """Draws each sample's augmentation from a generator seeded by ``(seed, epoch, index)``.

    Items are addressed by ``(epoch, index)`` pairs (what :class:`EpochSampler` yields).
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        # The CPU generator only: torch.manual_seed would also reseed the GPU's, which the
        # model's samplers draw from, and fork_rng(devices=[]) would not restore it (with
        # data.workers=0 every batch would reset the training's CUDA random stream).
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(mix_seed(self.seed, epoch, index))
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


class EpochSampler(Sampler[tuple[int, int]]):
    """The samples of the epoch chosen by :meth:`start`, as ``(epoch, index)`` pairs.

    ``order(epoch, start_batch)`` gives the epoch's indices (a :class:`GlobalBatchSampler`).
    The DataLoader iterates this sampler in the main process each time an iterator is made, so
    one long-lived loader follows :meth:`start` without restarting its workers.
    """

    def __init__(self, order: Callable[[int, int], Sampler[int]]) -> None:
        self.order = order
        self.epoch, self.start_batch = 0, 0

    def start(self, epoch: int, start_batch: int) -> None:
        """Let the next iterator run through ``epoch`` from (per-rank) batch ``start_batch``."""
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return ((epoch, index) for index in self.order(epoch, self.start_batch))

    def __len__(self) -> int:
        return len(self.order(self.epoch, self.start_batch))


class TrainingLoader:
    """The training data of a whole run: one DataLoader, its workers started once and kept.

    Reuses the dataset, collate function and worker count of the data part's loader ``base``
    and replaces only the order and the seeding (see the module docstring). Workers start as
    :func:`~drcnn.data.loader.worker_context` says (never by forking this threaded process) and
    persist: a DataLoader per epoch started new workers each time, each start a chance to hang.
    """

    def __init__(self, base: DataLoader, cfg: DictConfig, device: torch.device) -> None:
        seed, rank = cfg.train.seed, dist.get_rank()
        # each sample's aspect-ratio group (None: no grouping); the schedule counts batches by it
        self.groups = training_groups(cfg, base.dataset)
        order = partial(
            GlobalBatchSampler,
            len(base.dataset),
            cfg.data.batch_size,
            rank,
            dist.get_world_size(),
            seed,
            groups=self.groups,
        )
        self.sampler = EpochSampler(order)
        workers = base.num_workers
        self.loader = DataLoader(
            EpochSeededDataset(base.dataset, seed),
            batch_size=cfg.data.batch_size,
            sampler=self.sampler,
            collate_fn=base.collate_fn,
            num_workers=workers,
            worker_init_fn=seed_worker,
            # only the workers' base seeds come from it; samples are seeded by (seed, epoch, index)
            generator=torch.Generator().manual_seed(mix_seed(seed, rank)),
            pin_memory=device.type == "cuda",
            persistent_workers=workers > 0,
            multiprocessing_context=worker_context() if workers > 0 else None,
        )

    def epoch(self, epoch: int, start_batch: int) -> Iterator[Any]:
        """An iterator over ``epoch``'s batches from (per-rank) batch ``start_batch`` on."""
        self.sampler.start(epoch, start_batch)
        return iter(self.loader)
