"""Where every number of an experiment comes from: step records, code version, file digests.

``drcnn run`` writes one record per finished (or failed) step to ``OUT/steps/<step>.json``:
the step, its model, its parameters, status, executed notebook, the git commit of the code and
start / end times (UTC). The report reads them back to give each table and figure its
provenance, and the runner uses them to skip steps that are already complete.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from datetime import datetime, timezone
from pathlib import Path

from drcnn.io import atomic_write_json

STEPS_DIR = "steps"


def _git(*args: str) -> str:
    """Output of ``git ARGS`` run in the drcnn source tree."""
    root = Path(__file__).resolve().parents[2]
    return subprocess.run(
        ["git", *args], cwd=root, capture_output=True, text=True, check=True, timeout=10
    ).stdout.strip()


def git_commit() -> str:
    """The commit of the drcnn source tree (``+dirty`` if it has local changes), or ``unknown``."""
    try:
        commit = _git("rev-parse", "--short=12", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no", "--", "drcnn", "notebooks")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}+dirty" if dirty else commit


def now_utc() -> str:
    """The current time, ISO 8601 in UTC to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def file_digest(path: str | Path, length: int = 12) -> str:
    """The first ``length`` hex digits of a file's SHA-256 (identifies a checkpoint)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:length]


def record_path(exp_dir: str | Path, step_id: str) -> Path:
    return Path(exp_dir) / STEPS_DIR / f"{step_id}.json"


def write_record(exp_dir: str | Path, step_id: str, record: dict) -> Path:
    """Store one step's record (atomically)."""
    return atomic_write_json(record_path(exp_dir, step_id), record)


def read_record(exp_dir: str | Path, step_id: str) -> dict | None:
    """One step's record, or None when the step never finished (or its record is unreadable)."""
    path = record_path(exp_dir, step_id)
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def read_records(exp_dir: str | Path) -> list[dict]:
    """All step records of an experiment, in the order they started."""
    records = [read_record(exp_dir, p.stem) for p in (Path(exp_dir) / STEPS_DIR).glob("*.json")]
    return sorted((r for r in records if r), key=lambda r: r.get("started", ""))
