"""Training batches grouped by aspect ratio, as mmdetection's GroupSampler groups them.

mmdetection 2.x (the official code) puts every training image in one of two groups, wider than
tall (``width / height > 1``) or not, and builds each batch from one group, so that a batch's
images pad to a common size with little waste. Each group's last incomplete batch is filled by
repeating that group's first images of the epoch (``DistributedGroupSampler``), so an epoch has
``sum(ceil(group size / batch))`` batches and every image is seen at least once.

drcnn applies the rule to whole *global* batches (all processes together), which keeps the data
order independent of the process count (see :mod:`drcnn.engine.data_order`); mmdetection groups
each GPU's share, so with one process per GPU every process's batch is single-group either way.
The batches are cut from the epoch's permutation, each group's in the order they fill up, the
padded ones last; with a single group and a dataset size divisible by the global batch this is
exactly the ungrouped order (mmdetection instead shuffles the batches once more).
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig


def aspect_ratio_groups(dataset: Any) -> list[int]:
    """Group of each sample of a :class:`~drcnn.data.coco.CocoDetection`: 1 if wider than tall.

    mmdetection's ``CustomDataset._set_group_flag``, from the sizes in the annotation file
    (which :func:`drcnn.data.coco.load_coco` has checked to be positive integers).
    """
    groups = []
    for image_id in dataset.ids:
        info = dataset.coco.imgs[image_id]
        groups.append(int(info["width"] / info["height"] > 1))
    return groups


def training_groups(cfg: DictConfig, dataset: Any) -> list[int] | None:
    """The samples' groups when ``cfg.data.group_by_aspect_ratio`` is on, else ``None``."""
    return aspect_ratio_groups(dataset) if cfg.data.group_by_aspect_ratio else None


def grouped_batches(order: Sequence[int], groups: Sequence[int], size: int) -> list[list[int]]:
    """Cut ``order`` (a permutation of sample indices) into single-group batches of ``size``.

    Walking ``order``, a batch is closed as soon as ``size`` samples of one group have gathered;
    afterwards each group's incomplete batch is completed with that group's first samples in
    ``order`` (cyclically, for a group smaller than a batch).
    """
    members: dict[int, list[int]] = {}
    filling: dict[int, list[int]] = {}
    batches = []
    for index in order:
        group = groups[index]
        members.setdefault(group, []).append(index)
        batch = filling.setdefault(group, [])
        batch.append(index)
        if len(batch) == size:
            batches.append(batch)
            filling[group] = []
    for group, batch in sorted(filling.items()):
        if batch:
            repeats = itertools.islice(itertools.cycle(members[group]), size - len(batch))
            batches.append(batch + list(repeats))
    return batches


def grouped_batch_count(groups: Sequence[int], size: int) -> int:
    """How many batches :func:`grouped_batches` makes: ``sum(ceil(group size / size))``."""
    return sum(math.ceil(n / size) for n in Counter(groups).values())
