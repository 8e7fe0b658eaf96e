"""Safe file writes: a crash or a full disk never leaves a half-written result behind.

Each atomic writer writes to a temporary file in the target's folder, flushes it to disk, then
renames it over the target (``os.replace`` is atomic on POSIX), so readers see the old file or
the new one, never a mix. A process killed mid-write leaves only its temp file (named as
:data:`TEMP_NAME` describes), which :func:`remove_stale_temp_files` clears later. Appends to a
log (:func:`append_line`) add a whole line or nothing. :class:`FolderLock` keeps two processes
from writing into one folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import socket
import tempfile
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

from drcnn.errors import DrcnnError

# The temp file of ``atomic_write(folder / name)``: ``.<name>.<8 random characters>.tmp``
# (``tempfile.mkstemp`` with the prefix and suffix used below; its random part is 8 characters
# of ``[a-z0-9_]``; tests/test_checkpoint.py checks that the pattern still matches).
TEMP_NAME = re.compile(r"\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp")


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


def remove_stale_temp_files(folder: str | Path, targets: re.Pattern[str]) -> list[Path]:
    """Delete the temp files that killed :func:`atomic_write` calls left in ``folder`` (not its
    subfolders) for target names that ``targets`` matches in full; returns the removed paths.

    Only files of exactly the :data:`TEMP_NAME` pattern are touched. Call it only while no
    writer of those targets can run (e.g. holding the folder's :class:`FolderLock`): a live
    writer's temp file looks the same.
    """
    removed = []
    for path in sorted(Path(folder).glob(".*.tmp")):
        match = TEMP_NAME.fullmatch(path.name)
        if match and targets.fullmatch(match["target"]) and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def append_line(path: str | Path, line: str) -> None:
    """Append ``line`` and a newline to ``path`` (created if missing): the whole line or nothing.

    A write that fails part-way (a full disk) is undone by truncating the file back to its
    previous size, so the file never ends in a torn line; the failure is a ``DrcnnError``.
    """
    path = Path(path)
    data = memoryview(f"{line}\n".encode())
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        size = os.fstat(fd).st_size
        try:
            while data:
                data = data[os.write(fd, data) :]
        except OSError as exc:
            with contextlib.suppress(OSError):  # a torn line is still dropped when read back
                os.ftruncate(fd, size)
            raise DrcnnError(
                f"{path}: could not append ({exc.strerror or exc}); its earlier lines are kept"
            ) from exc
    finally:
        os.close(fd)


def read_json_lines(path: str | Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file (one per non-empty line), such as a training log.

    A final line that does not parse is what a writer killed mid-append leaves: it is dropped
    with a warning. Any other line that is not a JSON object is a ``DrcnnError`` naming the file
    and the line number.
    """
    path = Path(path)
    lines = [(n, line) for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    entries = []
    for position, (number, line) in enumerate(lines):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            if position == len(lines) - 1:
                warnings.warn(
                    f"{path}: line {number} is incomplete (an interrupted write); dropped it",
                    stacklevel=2,
                )
                break
            raise DrcnnError(f"{path}: line {number} is not valid JSON ({exc.msg})") from exc
        if not isinstance(entry, dict):
            raise DrcnnError(f"{path}: line {number}: expected a JSON object")
        entries.append(entry)
    return entries


class FolderLock:
    """An exclusive lock on a folder: ``fcntl.flock`` on ``<folder>/.lock``, held until
    :meth:`release`, the end of a ``with`` block, or the end of the process.

    The kernel drops the lock when the process ends however it ends (a kill included), so a
    crashed run never leaves a stale lock; the ``.lock`` file itself stays and is reused. The
    file holds the holder's pid and host for the message a second process gets.
    """

    BUSY = (
        "{folder}: in use by another drcnn process ({holder}); wait for it to finish or use "
        "another folder"
    )

    def __init__(self, folder: str | Path, busy: str = BUSY) -> None:
        """Take the lock, or raise a one-line ``DrcnnError``: ``busy`` with ``{folder}`` and
        ``{holder}`` (the holder's pid and host) filled in."""
        self.path = Path(folder) / ".lock"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise DrcnnError(  # ends in the reason, as the CLI prints any other OSError
                f"{self.path.parent}: cannot write there (expected a writable folder): "
                f"{exc.strerror or exc}"
            ) from exc
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder()
            self.release()
            raise DrcnnError(busy.format(folder=self.path.parent, holder=holder)) from None
        with contextlib.suppress(OSError):  # the lock holds even if the note cannot be written
            os.ftruncate(self.fd, 0)
            os.write(self.fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())

    def _holder(self) -> str:
        """The holder's note, on one line; a bare number (what ``drcnn run`` wrote before it
        took this lock) is a pid."""
        note = " ".join(os.pread(self.fd, 200, 0).decode(errors="replace").split())
        return f"pid {note}" if note.isdigit() else note or "unknown"

    def release(self) -> None:
        """Give the lock up (closing the file releases the flock); a second call does nothing."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()
