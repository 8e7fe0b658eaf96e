"""Training data order: a global batch is the same whatever the process count or resume point."""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from types import SimpleNamespace

import torch
from hostile import expect_refusal
from test_train import FASTER, tiny_overrides

from drcnn.config import load_config
from drcnn.data.group_sampler import aspect_ratio_groups, grouped_batch_count
from drcnn.data.loader import build_dataloader, build_dataset
from drcnn.engine.data_order import EpochSeededDataset, GlobalBatchSampler, TrainingLoader
from drcnn.engine.optim import build_schedule


def global_batches(
    world: int, per_rank: int, epoch: int, start_batch: int = 0, groups: list[int] | None = None
) -> list[list[int]]:
    """Each global batch as the concatenation of the ranks' shares (rank 0's first); ``groups``:
    the samples' aspect-ratio groups, if grouped."""
    ranks = [
        list(GlobalBatchSampler(50, per_rank, rank, world, 7, epoch, start_batch, groups))
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


def test_sample_augmentation_leaves_the_gpu_generators_alone(monkeypatch):
    """Loading in the training process (data.workers=0) must not reseed the CUDA generator the
    model's samplers draw from: fork_rng(devices=[]) restores only the CPU's."""
    reseeded = []
    for module in (torch.cuda, torch.xpu, torch.mtia):
        monkeypatch.setattr(module, "manual_seed_all", reseeded.append)
    monkeypatch.setattr(torch.mps, "manual_seed", reseeded.append)
    data = EpochSeededDataset(RandomSample(), seed=7)
    first = data[2, 1]
    assert reseeded == []
    assert data[2, 1] == first  # still seeded by (seed, epoch, index)


# --- Batches grouped by aspect ratio (mmdetection's GroupSampler) ---------------------------

SIZES = {0: 31, 1: 19}  # group sizes of the 50 samples below


def sample_groups(seed: int = 0) -> list[int]:
    """50 samples, 31 of group 0 and 19 of group 1, in shuffled positions."""
    groups = [0] * SIZES[0] + [1] * SIZES[1]
    random.Random(seed).shuffle(groups)
    return groups


def grouped_global_batches(world: int, per_rank: int, epoch: int, start_batch: int = 0):
    """As :func:`global_batches`, with the samples' aspect-ratio groups."""
    return global_batches(world, per_rank, epoch, start_batch, sample_groups())


def test_grouped_batches_are_single_group_and_cover_every_sample():
    groups = sample_groups()
    batches = grouped_global_batches(world=1, per_rank=6, epoch=3)
    # each group padded to whole batches, as mmdetection does: ceil(31/6) + ceil(19/6)
    assert len(batches) == math.ceil(31 / 6) + math.ceil(19 / 6) == 10
    assert all(len({groups[i] for i in batch}) == 1 for batch in batches)
    seen = Counter(i for batch in batches for i in batch)
    assert set(seen) == set(range(50))  # every sample at least once
    # the repeats fill each group's one incomplete batch: 6 - 31 % 6 and 6 - 19 % 6 of them
    assert sum(seen.values()) - 50 == (6 - 31 % 6) + (6 - 19 % 6)
    assert max(seen.values()) == 2


def test_grouped_batches_do_not_depend_on_the_number_of_processes_and_resume():
    one = grouped_global_batches(world=1, per_rank=6, epoch=3)
    assert grouped_global_batches(world=2, per_rank=3, epoch=3) == one
    assert grouped_global_batches(world=3, per_rank=2, epoch=3) == one
    assert grouped_global_batches(world=2, per_rank=3, epoch=3, start_batch=4) == one[4:]
    assert grouped_global_batches(world=1, per_rank=6, epoch=4) != one


def test_one_group_gives_the_ungrouped_order():
    """All images of one shape (the synthetic dataset): grouping changes nothing when the
    dataset size is a multiple of the global batch."""
    for world, per_rank in ((1, 6), (2, 3)):
        grouped = [
            list(GlobalBatchSampler(48, per_rank, r, world, 7, 2, 0, [0] * 48))
            for r in range(world)
        ]
        plain = [list(GlobalBatchSampler(48, per_rank, r, world, 7, 2, 0)) for r in range(world)]
        assert grouped == plain


def test_aspect_ratio_rule_is_width_over_height_above_one():
    images = SimpleNamespace(
        ids=[10, 11, 12, 13],
        coco=SimpleNamespace(
            imgs={
                10: {"width": 640, "height": 480},
                11: {"width": 480, "height": 640},
                12: {"width": 500, "height": 500},  # square: group 0, as mmdetection's > 1
                13: {"width": 501, "height": 500},
            }
        ),
        ann_file="ann.json",
    )

    assert aspect_ratio_groups(images) == [1, 0, 0, 1]


def test_synthetic_images_are_one_group(synthetic_root):
    cfg = load_config(
        "configs/synthetic/faster_rcnn_r18_fpn_synthetic.yaml", [f"data.root={synthetic_root}"]
    )
    dataset = build_dataset(cfg, "train")
    assert set(aspect_ratio_groups(dataset)) == {0}
    assert cfg.data.group_by_aspect_ratio is False  # the synthetic configs keep the plain order


def test_schedule_counts_the_grouped_batches(synthetic_root):
    groups = sample_groups()
    cfg = load_config(
        "configs/synthetic/faster_rcnn_r18_fpn_synthetic.yaml",
        [f"data.root={synthetic_root}", "data.batch_size=6", "train.accumulate=3"],
    )
    sampler = GlobalBatchSampler(50, 6, 0, 1, 7, 0, 0, groups)
    schedule = build_schedule(cfg, 50, groups)
    assert schedule.iters_per_epoch == sampler.num_batches // 3 == 10 // 3
    assert build_schedule(cfg, 50).iters_per_epoch == 50 // 18  # ungrouped: as before


def annotations_with_sizes(root, tmp_path, size_of) -> str:
    """A copy of the synthetic train annotations whose image sizes are ``size_of(entry)``."""
    data = json.loads((root / "annotations" / "instances_train.json").read_text())
    for entry in data["images"]:
        entry.update(size_of(entry))
    path = tmp_path / "instances_train.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_training_loader_groups_when_configured(synthetic_root, tmp_path):
    def size_of(entry):  # every third image wide; only the sampler reads these sizes
        return {"width": 256 if entry["id"] % 3 == 0 else 128, "height": 128}

    ann = annotations_with_sizes(synthetic_root, tmp_path, size_of)
    cfg = load_config(
        "configs/synthetic/faster_rcnn_r18_fpn_synthetic.yaml",
        [
            f"data.root={synthetic_root}",
            f"data.train_ann={ann}",
            "data.workers=0",
            "data.batch_size=4",
            "data.group_by_aspect_ratio=true",
        ],
    )
    base = build_dataloader(cfg, "train")
    groups = aspect_ratio_groups(base.dataset)
    assert set(groups) == {0, 1}
    sampler = TrainingLoader(base, cfg, torch.device("cpu")).sampler.order(1, 0)
    assert sampler.num_batches == grouped_batch_count(groups, 4)
    assert all(len({groups[i] for i in batch}) == 1 for batch in sampler.batches)


def test_cli_refuses_images_without_sizes_before_grouping(synthetic_root, tmp_path, capsys):
    ann = annotations_with_sizes(synthetic_root, tmp_path, lambda entry: {"width": None})
    work = tmp_path / "work"
    argv = [
        "train",
        "configs/synthetic/faster_rcnn_r18_fpn_synthetic.yaml",
        "--work-dir",
        work,
        "--device",
        "cpu",
        "--set",
        f"data.root={synthetic_root}",
        f"data.train_ann={ann}",
        "data.workers=0",
        "data.group_by_aspect_ratio=true",
    ]
    err = expect_refusal(argv, capsys, watch=[tmp_path, synthetic_root], may_create=[work])
    assert "images[0].width must be a positive integer" in err


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
