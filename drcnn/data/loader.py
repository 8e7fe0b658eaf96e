"""Datasets and data loaders from the config: paths, class-count check, batching, DDP sampling."""

from __future__ import annotations

import multiprocessing
from multiprocessing.context import BaseContext
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, DistributedSampler

from drcnn.data.coco import CocoDetection
from drcnn.data.transforms import build_transforms
from drcnn.errors import DrcnnError

SPLITS = ("train", "val")


def split_paths(cfg: DictConfig, split: str) -> tuple[Path, Path]:
    """``(annotation file, image folder)`` of ``split``: relative to ``cfg.data.root`` unless
    absolute. A missing annotation file fails here with the command that creates the synthetic
    dataset."""
    if split not in SPLITS:
        raise DrcnnError(f"data split {split!r}: expected one of {', '.join(SPLITS)}")
    root = Path(cfg.data.root)
    ann = root / cfg.data[f"{split}_ann"]
    images = root / cfg.data[f"{split}_images"]
    if not ann.is_file():
        raise DrcnnError(
            f"data.root {root}: {ann} not found; run `drcnn data synth --out {root}` for the "
            "synthetic dataset or set data.root to a COCO-format dataset"
        )
    return ann, images


def build_dataset(cfg: DictConfig, split: str) -> CocoDetection:
    """The ``split`` dataset with its transforms; its class count must match the model's."""
    ann, images = split_paths(cfg, split)
    train = split == "train"
    dataset = CocoDetection(
        ann,
        images,
        transforms=build_transforms(cfg, train),
        train=train,
        max_images=None if train else cfg.data.max_val_images,
    )
    if train and len(dataset) == 0:
        raise DrcnnError(f"{ann}: the training split has no image with a box to train on")
    expected = cfg.model.roi_head.num_classes
    if dataset.num_classes != expected:
        raise DrcnnError(
            f"{ann}: the dataset has {dataset.num_classes} categories but "
            f"model.roi_head.num_classes is {expected}"
        )
    return dataset


def collate(batch: list[tuple]) -> tuple[list[torch.Tensor], list[dict]]:
    """``(list of (3, H, W) image tensors, list of target dicts)``; tv_tensors become plain."""
    images = [image.as_subclass(torch.Tensor) for image, _ in batch]
    targets = [
        {k: v.as_subclass(torch.Tensor) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
        for _, t in batch
    ]
    return images, targets


def worker_context() -> BaseContext:
    """How loader workers start: from a fork server (spawned where there is none), never by
    forking this process.

    A forked child copies the parent's memory mid-flight, locks included: a lock that another
    thread (tqdm's monitor, the :func:`~drcnn.models.threads.thread_map` pool, a pin-memory
    thread, CPython's own thread-state lock) held at the moment of the fork stays held in the
    child forever, and the worker hangs before it loads a sample (seen in DDP training after an
    evaluation). The fork server is a single-threaded process, started once by fork+exec; it
    imports the data modules up front, so workers forked from it do not import torch again, and
    it does not import ``__main__`` (no script is re-run; workers only load drcnn's own
    datasets). The preload list is process-wide: it applies to the fork server of every later
    user.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


def build_dataloader(
    cfg: DictConfig,
    split: str,
    distributed: bool = False,
    shuffle: bool | None = None,
    pin_memory: bool = False,
) -> DataLoader:
    """Loader of ``split``: ``cfg.data.batch_size`` (train) or ``test_batch_size`` (val) images
    per process, ``cfg.data.workers`` workers (val: ``test_workers`` when set; started as
    :func:`worker_context` says, and kept between iterations), shuffled for training unless
    ``shuffle`` says otherwise. With ``distributed=True`` a ``DistributedSampler`` shards the
    data. ``pin_memory``: page-locked batches, for a run on CUDA only (pinning starts a CUDA
    context, which a CPU run on a GPU machine should not take)."""
    dataset = build_dataset(cfg, split)
    shuffle = split == "train" if shuffle is None else shuffle
    sampler = DistributedSampler(dataset, shuffle=shuffle) if distributed else None
    workers = cfg.data.workers
    if split != "train" and cfg.data.test_workers is not None:
        workers = cfg.data.test_workers
    return DataLoader(
        dataset,
        batch_size=cfg.data.batch_size if split == "train" else cfg.data.test_batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        persistent_workers=workers > 0,
        multiprocessing_context=worker_context() if workers > 0 else None,
        pin_memory=pin_memory,
    )
