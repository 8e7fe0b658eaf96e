"""Atomic writes keep the old file on failure; every sub-command answers --help."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from drcnn.cli import COMMANDS, main
from drcnn.errors import DrcnnError
from drcnn.io import TEMP_NAME, FolderLock, atomic_write, atomic_write_json, read_json_lines


def test_atomic_write_replaces_whole_file(tmp_path):
    target = tmp_path / "sub" / "metrics.json"
    atomic_write_json(target, {"AP": 0.5})
    atomic_write_json(target, {"AP": 0.75})
    assert json.loads(target.read_text()) == {"AP": 0.75}
    assert [p.name for p in target.parent.iterdir()] == ["metrics.json"]


def test_written_files_get_the_usual_mode(tmp_path):
    old = os.umask(0o022)
    try:
        target = atomic_write_json(tmp_path / "metrics.json", {})
    finally:
        os.umask(old)
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_failed_write_keeps_previous_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "latest.pth"
    atomic_write_json(target, {"iter": 10})

    def crash(handle):
        handle.write(b"partial")
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write(target, crash)
    assert json.loads(target.read_text()) == {"iter": 10}
    assert [p.name for p in tmp_path.iterdir()] == ["latest.pth"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert f"drcnn {command}" in capsys.readouterr().out


def test_top_level_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)


def test_temp_name_pattern_is_the_one_the_writer_uses(tmp_path):
    """remove_stale_temp_files relies on TEMP_NAME; a change in tempfile would break it."""
    seen = []

    def write(handle):
        seen.extend(p.name for p in tmp_path.iterdir())
        handle.write(b"x")

    atomic_write(tmp_path / "latest.pth", write)
    assert len(seen) == 1 and TEMP_NAME.fullmatch(seen[0])["target"] == "latest.pth"


def test_json_lines_drop_a_torn_last_line_and_refuse_a_bad_one_inside(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"iter": 1}\n\n{"iter": 2}\n{"iter": 3, "lo')
    with pytest.warns(UserWarning, match=r"metrics\.jsonl: line 4 is incomplete"):
        assert read_json_lines(log) == [{"iter": 1}, {"iter": 2}]
    log.write_text('{"iter": 1}\n{"iter": 2, "lo\n{"iter": 3}\n')
    with pytest.raises(DrcnnError, match=r"metrics\.jsonl: line 2 is not valid JSON"):
        read_json_lines(log)
    log.write_text('{"iter": 1}\n[2]\n{"iter": 3}\n')
    with pytest.raises(DrcnnError, match=r"metrics\.jsonl: line 2: expected a JSON object"):
        read_json_lines(log)


def test_folder_lock_as_a_context_manager_with_its_own_message(tmp_path):
    """``drcnn run`` holds its OUT this way (it had its own flock code): refused inside the
    block with the caller's message naming the holder's pid, free again after it."""
    busy = "{folder}: taken by ({holder})"
    with FolderLock(tmp_path) as lock:
        assert lock.fd is not None
        with pytest.raises(DrcnnError) as refused:
            FolderLock(tmp_path, busy=busy)
        assert str(refused.value).startswith(f"{tmp_path}: taken by (pid {os.getpid()} on ")
    FolderLock(tmp_path).release()  # the block released it


def test_lazy_exports_resolve_and_keep_the_import_light():
    """Every name that ``drcnn`` and ``drcnn.models`` export on first use is there, an unknown
    one is an AttributeError, and importing them loads no torch (``drcnn --help`` stays fast)."""
    code = (
        "import sys, drcnn, drcnn.models; assert 'torch' not in sys.modules\n"
        "for p in (drcnn, drcnn.models):\n"
        "    [getattr(p, name) for name in p._LAZY]; assert not hasattr(p, 'no_such_name')"
    )
    repo = Path(__file__).resolve().parents[1]  # python -c puts the cwd first on the path
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo)
    assert done.returncode == 0, done.stderr[-2000:]
