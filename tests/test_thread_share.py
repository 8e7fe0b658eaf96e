"""The CPU threads that ``drcnn run --jobs N`` shares among its running steps."""

from __future__ import annotations

import os

import pytest
import torch

from drcnn.engine import thread_share
from drcnn.engine.thread_share import SHARE_ENV, ThreadShare, follow_thread_share


@pytest.fixture
def four_cores(monkeypatch):
    """A 4-core machine, no share in the environment, torch's thread count restored after."""
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv(SHARE_ENV, raising=False)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_a_training_follows_the_share_the_runner_writes(four_cores):
    """Two steps at once get 2 threads each; when one is left it gets all 4; the environment
    and the share file are gone after the block."""
    torch.set_num_threads(1)
    with ThreadShare(2) as share:
        assert os.environ["OMP_NUM_THREADS"] == "2"
        assert os.environ[SHARE_ENV] == str(share.path)
        follow_thread_share()
        assert torch.get_num_threads() == 2
        share.running(1)
        follow_thread_share()
        assert torch.get_num_threads() == 4
        share.running(3)  # more steps than cores: at least one thread each
        follow_thread_share()
        assert torch.get_num_threads() == 1
        folder = share.path.parent
    assert "OMP_NUM_THREADS" not in os.environ and SHARE_ENV not in os.environ
    assert not folder.exists()


def test_the_environment_before_the_block_comes_back(four_cores, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    with ThreadShare(4):
        assert os.environ["OMP_NUM_THREADS"] == "1"
    assert os.environ["OMP_NUM_THREADS"] == "3" and SHARE_ENV not in os.environ


@pytest.mark.parametrize("content", [None, "", "two"])
def test_no_share_or_an_unreadable_one_leaves_the_threads_alone(
    four_cores, monkeypatch, tmp_path, content
):
    """Outside the runner (nothing named), a share file being rewritten (empty) or removed, or
    a malformed one: the thread count stays."""
    torch.set_num_threads(3)
    follow_thread_share()
    path = tmp_path / "threads"
    if content is not None:
        path.write_text(content)
    monkeypatch.setenv(SHARE_ENV, str(path))
    follow_thread_share()
    assert torch.get_num_threads() == 3


def test_threads_per_step_divides_the_cores(four_cores):
    assert [thread_share.threads_per_step(n) for n in (0, 1, 2, 3, 4, 8)] == [4, 4, 2, 1, 1, 1]


def test_the_training_loop_reads_the_share(four_cores, monkeypatch, synthetic_root, tmp_path):
    """A training under a share of 1 thread, started with 2, trains on 1."""
    from test_train import FASTER, tiny_overrides

    from drcnn.config import load_config
    from drcnn.engine.train import train

    share = tmp_path / "threads"
    share.write_text("1")
    monkeypatch.setenv(SHARE_ENV, str(share))
    torch.set_num_threads(2)
    cfg = load_config(FASTER, [*tiny_overrides(synthetic_root), "train.max_iters=1"])
    train(cfg, tmp_path / "work", device="cpu")
    assert torch.get_num_threads() == 1
