"""First use of the fused kernels: the compile notice, and the thread split of big batches (same numbers as one
thread, exceptions raised after every chunk ended, a forked child that starts its own pool)."""

from __future__ import annotations

import logging
import multiprocessing as mp
import threading
import time

import numpy as np
import pytest
import torch

from emdloss import EMDLoss, Tree
from emdloss.backends.numba_kernels import compile_notice, pool


def test_a_slow_first_call_logs_one_notice_naming_the_cache(monkeypatch, caplog):
    monkeypatch.setattr(compile_notice, "_started", set())
    monkeypatch.setattr(compile_notice, "NOTICE_AFTER_S", 0.05)
    monkeypatch.setenv("NUMBA_CACHE_DIR", "/some/cache")
    with caplog.at_level(logging.WARNING, logger="emdloss"):
        with compile_notice.first_call("variant"):
            time.sleep(0.5)  # a compile that takes a while
        with compile_notice.first_call("variant"):
            time.sleep(0.2)  # the same variant again: no notice
    notices = [r.getMessage() for r in caplog.records if r.name == "emdloss"]
    assert len(notices) == 1 and "compiling the fused CPU kernel" in notices[0] and "/some/cache" in notices[0]


def test_a_fast_first_call_logs_nothing(monkeypatch, caplog):
    monkeypatch.setattr(compile_notice, "_started", set())
    with caplog.at_level(logging.WARNING, logger="emdloss"), compile_notice.first_call("cached variant"):
        pass
    time.sleep(0.05)
    assert not [r for r in caplog.records if r.name == "emdloss"]


def _chunks_seen(first: int, end: int, seen: list, lock: threading.Lock) -> None:
    with lock:
        seen.append((first, end))


def test_run_rows_covers_every_unit_once_in_one_chunk_per_thread(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    seen: list = []
    pool.run_rows(_chunks_seen, 10, pool.PARALLEL_MIN_WORK, seen, threading.Lock())
    assert sorted(seen) == [(0, 3), (3, 6), (6, 10)]
    seen.clear()
    pool.run_rows(_chunks_seen, 10, pool.PARALLEL_MIN_WORK - 1, seen, threading.Lock())  # small: one call
    assert seen == [(0, 10)]


def test_a_failing_chunk_is_raised_after_all_chunks_end(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    done = []

    def kernel(first: int, end: int) -> None:
        if first:
            time.sleep(0.2)
            done.append(first)
            raise RuntimeError("chunk failed")

    with pytest.raises(RuntimeError, match="chunk failed"):
        pool.run_rows(kernel, 4, pool.PARALLEL_MIN_WORK)
    assert done == [2]


@pytest.mark.parametrize("threads", [1, 2])
def test_split_batches_give_the_numbers_of_one_thread(threads):
    tree = Tree.chain(300)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 300, generator=gen, requires_grad=True)  # 256 x 300 > PARALLEL_MIN_WORK: split
    y = torch.randint(0, 300, (256,), generator=gen)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = EMDLoss(tree, rho=2.0, reduction="none")(x, y)
        torch.set_num_threads(threads)
        many = EMDLoss(tree, rho=2.0, reduction="none")(x, y)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, many)


def _child_loss(queue) -> None:
    x = torch.randn(256, 300, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 300, (256,), generator=torch.Generator().manual_seed(1))
    queue.put(float(EMDLoss(Tree.chain(300), rho=2.0)(x, y)))


def test_a_forked_child_splits_its_batches_on_its_own_threads():
    if "fork" not in mp.get_all_start_methods():
        pytest.skip("no fork start method here")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = torch.randn(256, 300, generator=torch.Generator().manual_seed(0))
        y = torch.randint(0, 300, (256,), generator=torch.Generator().manual_seed(1))
        parent = float(EMDLoss(Tree.chain(300), rho=2.0)(x, y))  # the parent's pool now has a worker thread
        ctx = mp.get_context("fork")
        queue = ctx.Queue()
        child = ctx.Process(target=_child_loss, args=(queue,))
        child.start()
        child.join(60)
        assert child.exitcode == 0
        assert np.isclose(queue.get(timeout=5), parent, rtol=0, atol=0)
    finally:
        torch.set_num_threads(before)
