"""Atomic file writes: a crash or a full disk never leaves a half-written result behind.

Each writer writes to a temporary file in the target's folder, flushes it to disk, then renames
it over the target (``os.replace`` is atomic on POSIX), so readers see the old file or the new
one, never a mix.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

from drcnn.errors import DrcnnError


def read_json(path: str | Path, what: str) -> Any:
    """Parse the JSON file ``path`` (a ``what``, e.g. "annotation file").

    A missing or malformed file is a one-line ``DrcnnError`` naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise DrcnnError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DrcnnError(f"{path}: not a valid JSON {what} ({exc})") from exc


def _identity(path: Path) -> tuple:
    """What makes two paths the same file: device and inode when it exists (links, case-
    insensitive file systems), else the absolute path with symlinks and ``..`` resolved."""
    if path.exists():
        info = path.stat()
        return (info.st_dev, info.st_ino)
    return (str(path.resolve()),)


def refuse_collisions(
    inputs: Iterable[tuple[str | Path | None, str]], outputs: Iterable[tuple[str | Path, str]]
) -> None:
    """Refuse (one-line ``DrcnnError``) a command whose output files would overwrite one of its
    inputs or each other. Both are ``(path, what it is)`` pairs; ``None`` inputs are skipped."""
    seen: dict[tuple, str] = {}
    for path, what in inputs:
        if path is not None:
            seen.setdefault(_identity(Path(path)), f"{what} {path}")
    for path, what in outputs:
        key = _identity(Path(path))
        if key in seen:
            raise DrcnnError(f"{path}: {what} would overwrite {seen[key]}; choose another output")
        seen[key] = f"{what} {path}"


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(fileobj)`` on a temp file beside ``path``, then rename it to ``path``.

    An ``OSError`` on the way (full disk, read-only folder) is re-raised naming ``path``, the file
    the user asked for, not the temp file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual file mode
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        if exc.errno is None:
            raise
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    import torch

    return atomic_write(path, lambda handle: torch.save(obj, handle))
