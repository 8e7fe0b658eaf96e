"""Training data order: a global batch is the same whatever the process count or resume point."""

from __future__ import annotations

import torch
from test_train import FASTER, tiny_overrides

from drcnn.config import load_config
from drcnn.data.loader import build_dataloader
from drcnn.engine.data_order import EpochSeededDataset, GlobalBatchSampler, TrainingLoader


def global_batches(world: int, per_rank: int, epoch: int, start_batch: int = 0) -> list[list[int]]:
    """Each global batch as the concatenation of the ranks' shares (rank 0's first)."""
    ranks = [
        list(GlobalBatchSampler(50, per_rank, rank, world, 7, epoch, start_batch))
        for rank in range(world)
    ]
    batches = []
    for b in range(len(ranks[0]) // per_rank):
        shares = [r[b * per_rank : (b + 1) * per_rank] for r in ranks]
        # rank r holds elements r, r + world, ... of the global batch: interleave them back
        batches.append([shares[i % world][i // world] for i in range(world * per_rank)])
    return batches


def test_global_batches_do_not_depend_on_the_number_of_processes():
    one = global_batches(world=1, per_rank=6, epoch=3)
    assert global_batches(world=2, per_rank=3, epoch=3) == one
    assert global_batches(world=3, per_rank=2, epoch=3) == one
    assert len(one) == 50 // 6  # complete global batches only
    flat = [i for batch in one for i in batch]
    assert len(set(flat)) == len(flat)  # no sample twice in an epoch


def test_start_batch_skips_the_batches_already_done():
    full = global_batches(world=2, per_rank=3, epoch=1)
    assert global_batches(world=2, per_rank=3, epoch=1, start_batch=5) == full[5:]
    assert len(GlobalBatchSampler(50, 3, 0, 2, 7, 1, 5)) == (8 - 5) * 3


def test_each_epoch_has_its_own_order():
    assert global_batches(1, 6, epoch=0) != global_batches(1, 6, epoch=1)


class RandomSample(torch.utils.data.Dataset):
    """A sample drawn from torch's global generator, as random augmentations are."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> float:
        return torch.rand(()).item()


def test_sample_augmentation_depends_on_seed_epoch_and_index_only():
    data = EpochSeededDataset(RandomSample(), seed=7)
    first = [data[2, i] for i in range(4)]
    torch.rand(5)  # whatever else drew from the global generator in between
    assert [data[2, i] for i in reversed(range(4))] == first[::-1]
    assert len(set(first)) == 4
    assert data[3, 0] != first[0]
    assert EpochSeededDataset(RandomSample(), seed=8)[2, 0] != first[0]
    before = torch.get_rng_state()
    data[2, 0]
    assert torch.equal(torch.get_rng_state(), before)  # the global generator is left untouched


def test_training_loader_batches_do_not_depend_on_workers_or_restarts(synthetic_root):
    """One loader for the run (persistent workers, iterator re-created for each epoch, resume or
    evaluation) gives the batches that the one-process loader gives for the same plan, and a
    restart at batch ``b`` continues the epoch exactly."""
    plan = [(0, 0, 4), (0, 2, 2), (1, 0, 2), (0, 3, 1)]  # (epoch, start batch, batches taken)

    def run_plan(workers: int) -> list[list]:
        cfg = load_config(FASTER, [*tiny_overrides(synthetic_root), f"data.workers={workers}"])
        loader = TrainingLoader(build_dataloader(cfg, "train"), cfg, torch.device("cpu"))
        taken = []
        for epoch, start, count in plan:
            batches = loader.epoch(epoch, start)
            taken.append([next(batches) for _ in range(count)])
        return taken

    def same(a, b) -> bool:
        (images_a, targets_a), (images_b, targets_b) = a, b
        return all(torch.equal(x, y) for x, y in zip(images_a, images_b, strict=True)) and all(
            ta["image_id"] == tb["image_id"] and torch.equal(ta["boxes"], tb["boxes"])
            for ta, tb in zip(targets_a, targets_b, strict=True)
        )

    alone, with_workers = run_plan(0), run_plan(2)
    for taken_alone, taken_with_workers in zip(alone, with_workers, strict=True):
        assert all(same(a, b) for a, b in zip(taken_alone, taken_with_workers, strict=True))
    assert same(alone[1][0], alone[0][2]) and same(alone[3][0], alone[0][3])
    assert not same(alone[2][0], alone[0][0])  # another epoch, another order
