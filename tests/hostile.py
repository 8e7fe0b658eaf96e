"""The contract every hostile-input test checks (the ``tests/test_hostile_*.py`` catalogue).

A bad input given to a public ``drcnn`` command must end in exit status 2 and exactly one
``error: ...`` line on stderr (no traceback), change no file that existed before, and write
nothing outside the places the command was asked to write to. :func:`expect_refusal` runs the
command in-process through :func:`drcnn.cli.main` and checks all of that.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import pytest

from drcnn.cli import main


def snapshot(roots: Iterable[Path]) -> dict[Path, str]:
    """Content digest of every file under ``roots`` (a root may be a file or be missing)."""
    files: dict[Path, str] = {}
    for root in roots:
        root = Path(root)
        paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in paths:
            files[path.resolve()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def expect_refusal(
    argv: Sequence[object],
    capsys: pytest.CaptureFixture[str],
    watch: Iterable[Path],
    may_create: Iterable[Path] = (),
) -> str:
    """Run ``drcnn argv``; assert exit 2, one ``error:`` line, no existing file under ``watch``
    changed or removed, and no new file under ``watch`` except below a ``may_create`` folder.
    Returns the error line."""
    watch = [Path(p) for p in watch]
    allowed = [Path(p).resolve() for p in may_create]
    capsys.readouterr()
    before = snapshot(watch)
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2, f"exit {code}, stderr: {err}"
    assert err.startswith("error: ") and "\n" not in err, err
    assert "Traceback" not in captured.err + captured.out
    after = snapshot(watch)
    changed = [str(p) for p, digest in before.items() if after.get(p) != digest]
    assert not changed, f"existing files changed or removed: {changed}"
    created = [
        str(p) for p in after if p not in before and not any(p.is_relative_to(a) for a in allowed)
    ]
    assert not created, f"files written outside the output folder: {created}"
    return err
