"""First use of the fused kernels: the compile notice, and the choice between the calling thread and numba's
parallel loop (same numbers either way, a forked child that runs its own parallel loops)."""

from __future__ import annotations

import logging
import multiprocessing as mp
import time

import numpy as np
import pytest
import torch

from emdloss import EMDLoss, Tree
from emdloss.backends.numba_kernels import compile_notice, threads


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


def test_small_batches_stay_on_the_calling_thread_and_big_ones_go_parallel(monkeypatch):
    calls: list = []

    def kernel(first: int, end: int, tag: str) -> None:
        calls.append(("serial", first, end, tag))

    def parallel(n_units: int, n_threads: int, tag: str) -> None:
        calls.append(("parallel", n_units, n_threads, tag))

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    threads.run_rows(kernel, parallel, 10, threads.PARALLEL_MIN_WORK - 1, "small")
    threads.run_rows(kernel, parallel, 10, threads.PARALLEL_MIN_WORK, "big")
    threads.run_rows(kernel, parallel, 1, threads.PARALLEL_MIN_WORK, "one unit")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    threads.run_rows(kernel, parallel, 10, threads.PARALLEL_MIN_WORK, "one thread")
    assert calls == [
        ("serial", 0, 10, "small"),
        ("parallel", 10, 2, "big"),
        ("serial", 0, 1, "one unit"),
        ("serial", 0, 10, "one thread"),
    ]


@pytest.mark.parametrize("n_threads", [1, 2])
def test_split_batches_give_the_numbers_of_one_thread(n_threads):
    tree = Tree.chain(300)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 300, generator=gen, requires_grad=True)  # 256 x 300 > PARALLEL_MIN_WORK: split
    y = torch.randint(0, 300, (256,), generator=gen)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = EMDLoss(tree, rho=2.0, reduction="none")(x, y)
        torch.set_num_threads(n_threads)
        many = EMDLoss(tree, rho=2.0, reduction="none")(x, y)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, many)


def _child_loss(queue) -> None:
    x = torch.randn(256, 300, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 300, (256,), generator=torch.Generator().manual_seed(1))
    queue.put(float(EMDLoss(Tree.chain(300), rho=2.0)(x, y)))


def test_a_forked_child_runs_parallel_loops_after_its_parent_did():
    if "fork" not in mp.get_all_start_methods():
        pytest.skip("no fork start method here")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = torch.randn(256, 300, generator=torch.Generator().manual_seed(0))
        y = torch.randint(0, 300, (256,), generator=torch.Generator().manual_seed(1))
        parent = float(EMDLoss(Tree.chain(300), rho=2.0)(x, y))  # the parent ran a parallel region
        ctx = mp.get_context("fork")
        queue = ctx.Queue()
        child = ctx.Process(target=_child_loss, args=(queue,))
        child.start()
        child.join(60)
        assert child.exitcode == 0
        assert np.isclose(queue.get(timeout=5), parent, rtol=0, atol=0)
    finally:
        torch.set_num_threads(before)
