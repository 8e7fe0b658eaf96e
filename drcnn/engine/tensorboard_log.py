"""TensorBoard scalars of the training log (``train.tensorboard``), written beside
``metrics.jsonl`` into ``WORK_DIR/tensorboard/``.

Every record :class:`drcnn.engine.train.MetricsLog` appends is also written here, each of its
numbers as one scalar tagged ``<record type>/<key>`` (``train/loss``, ``train/rpn.loss_cls``,
``eval/AP``; nested numbers as ``eval/AP_per_iou/0.50``) at the record's ``iter``. The package is
an optional extra (``pip install -e '.[tensorboard]'``): ``auto`` writes when it is installed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from drcnn.errors import DrcnnError

TENSORBOARD_DIR = "tensorboard"  # the writer's folder inside the work dir


def summary_writer_class(mode: str | bool) -> type | None:
    """``train.tensorboard`` resolved: torch's ``SummaryWriter`` class, or None for no writer.

    ``auto``: the writer when the ``tensorboard`` package is importable, silently none otherwise;
    ``True``: the writer, or a one-line error saying how to install the package; ``False``: none.
    """
    if mode is False:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        if mode is True:
            raise DrcnnError(
                "config train.tensorboard: true needs the tensorboard package: "
                "pip install tensorboard (or pip install -e '.[tensorboard]'), "
                "or set train.tensorboard=false"
            ) from exc
        return None
    return SummaryWriter


def scalars(entry: dict[str, Any]) -> dict[str, float]:
    """The numbers of a log record by TensorBoard tag: ``<type>/<key>``, nested dicts' keys
    joined with ``/``; ``type`` and ``iter`` (the tag prefix and the step) and non-numbers left
    out."""
    found: dict[str, float] = {}

    def collect(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                collect(f"{prefix}/{key}", item)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            found[prefix] = float(value)

    for key, value in entry.items():
        if key not in ("type", "iter"):
            collect(f"{entry['type']}/{key}", value)
    return found


class TensorBoardLog:
    """A ``SummaryWriter`` on ``folder`` that writes log records as scalars (rank 0 only).

    ``purge_step``: the first iteration this run logs. TensorBoard drops the events of earlier
    runs in ``folder`` at that step or later (a resumed run logs them again), so each step keeps
    one value, as ``metrics.jsonl`` does.
    """

    def __init__(self, folder: Path, writer_class: type, purge_step: int) -> None:
        self.writer = writer_class(log_dir=str(folder), purge_step=purge_step)

    def write(self, entry: dict[str, Any]) -> None:
        """Every number of ``entry`` at step ``entry["iter"]``, flushed to disk at once."""
        for tag, value in scalars(entry).items():
            # new style, float64: the value itself, as metrics.jsonl holds it (not float32)
            self.writer.add_scalar(
                tag, value, global_step=entry["iter"], new_style=True, double_precision=True
            )
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
