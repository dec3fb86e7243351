"""First use of the fused kernels: the compile notice, numba's disk cache, and the choice between the calling
thread and numba's parallel loop (same numbers either way, a forked child that runs its own parallel loops)."""

from __future__ import annotations

import logging
import multiprocessing as mp
import time

import numpy as np
import pytest
import torch
from _helpers import random_tree

from emdloss import EMDLoss, Tree
from emdloss.backends.numba_kernels import background_compile, compile_notice, lane_kernels, one_row, threads
from emdloss.functional import emd


def test_a_slow_first_call_logs_one_notice_naming_the_cache(monkeypatch, caplog):
    monkeypatch.setattr(compile_notice, "_started", set())
    monkeypatch.setattr(compile_notice, "NOTICE_AFTER_S", 0.05)
    monkeypatch.setenv("NUMBA_CACHE_DIR", "/some/cache")
    with caplog.at_level(logging.WARNING, logger="emdloss"):
        compile_notice.call("variant", time.sleep, 0.5)  # a compile that takes a while
        compile_notice.call("variant", time.sleep, 0.2)  # the same variant again: no notice
    notices = [r.getMessage() for r in caplog.records if r.name == "emdloss"]
    assert len(notices) == 1 and "compiling the fused CPU kernel" in notices[0] and "/some/cache" in notices[0]


def test_a_fast_first_call_logs_nothing(monkeypatch, caplog):
    monkeypatch.setattr(compile_notice, "_started", set())
    with caplog.at_level(logging.WARNING, logger="emdloss"):
        compile_notice.call("cached variant", lambda: None)
    time.sleep(0.05)
    assert not [r for r in caplog.records if r.name == "emdloss"]


def test_compiled_kernels_load_back_from_numbas_disk_cache():
    """Each kernel variant this process compiled (or loaded) can be loaded from numba's disk cache, which is what
    the next process does instead of compiling for seconds. A kernel that numba cannot cache (``cache=True``
    dropped, or a closure or function-valued argument, which numba refuses to cache with a mere warning) fails
    here."""
    tree = Tree.chain(20)
    x = torch.randn(16, 20, requires_grad=True)
    y = torch.randint(0, 20, (16,))
    emd(x, y, tree, rho=1.0, backend="numba").backward()  # the distance-matrix kernel
    emd(x, y, tree, rho=2.0, backend="numba").backward()  # the lane kernel (8 rows and 16 classes or more)
    emd(x[:3], y[:3], tree, rho=2.0, backend="numba").backward()  # the one-row kernel
    for kernel in (one_row._distance_kernel, lane_kernels._lanes_kernel, one_row._rows_kernel):
        assert kernel.overloads, kernel.py_func.__name__
        for args in kernel.overloads:
            loaded = kernel._cache.load_overload(tuple(args), kernel.targetctx)
            assert loaded is not None, f"{kernel.py_func.__name__}{args} is not in numba's cache or cannot be loaded"


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


@pytest.mark.parametrize("rho", [1.0, 2.0])  # the distance-matrix and the one-row kernel
def test_a_small_batch_seen_before_goes_straight_to_its_kernel_with_the_same_numbers(monkeypatch, rho):
    """The row plan skips run_rows (and the compile notice) for a small batch whose serial kernel has run."""
    from emdloss.backends import numba_kernels

    tree = Tree.chain(7)
    gen = np.random.default_rng(4)
    x, y = gen.normal(size=(9, 7)).astype(np.float32), gen.integers(0, 7, 9)
    first = numba_kernels.tree_rows(x, y, None, tree, rho, True, True, -100, 0.25)
    routed: list = []
    original = threads.run_rows
    monkeypatch.setattr(threads, "run_rows", lambda *a, **k: routed.append(a[0]) or original(*a, **k))
    again = numba_kernels.tree_rows(x, y, None, tree, rho, True, True, -100, 0.25)
    no_grad = numba_kernels.tree_rows(x, y, None, tree, rho, True, False, -100, 0.25)  # another variant
    assert len(routed) == 1  # only the variant not seen before went through run_rows
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert np.array_equal(first[0], no_grad[0]) and no_grad[1] is None


def test_a_big_first_call_runs_on_the_calling_thread_while_its_twin_compiles(monkeypatch):
    from numba import njit, prange

    @njit
    def kernel(first, end, out):  # pragma: no cover - compiled
        for i in range(first, end):
            out[i] = 1.0

    @njit(parallel=True)
    def parallel(n, n_threads, out):  # pragma: no cover - compiled
        for t in prange(n_threads):
            for i in range(t * n // n_threads, (t + 1) * n // n_threads):
                out[i] = 2.0

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    out = np.zeros(4)
    threads.run_rows(kernel, parallel, 4, threads.PARALLEL_MIN_WORK, out, variant="test")
    assert (out == 1.0).all()  # the serial kernel ran; the twin is compiling, or done already
    background_compile.wait()
    assert background_compile.ready((parallel, "test"), parallel)
    threads.run_rows(kernel, parallel, 4, threads.PARALLEL_MIN_WORK, out, variant="test")
    assert (out == 2.0).all()


def test_a_twin_that_fails_to_compile_leaves_its_variant_on_the_calling_thread(monkeypatch):
    from numba import njit

    @njit
    def kernel(first, end, out):  # pragma: no cover - compiled
        for i in range(first, end):
            out[i] = 1.0

    @njit
    def parallel(n, n_threads, out):  # pragma: no cover - compiled
        out[0] = undefined_name  # noqa: F821 - a typing error when compiled

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    out = np.zeros(4)
    for _ in range(2):
        threads.run_rows(kernel, parallel, 4, threads.PARALLEL_MIN_WORK, out, variant="broken")
        background_compile.wait()
    assert (out == 1.0).all() and not background_compile.ready((parallel, "broken"), parallel)


TWIN_CASES = {
    # name: (tree, rho, target kind, batch): each batch is above PARALLEL_MIN_WORK numbers
    "chain, rho 2, lanes": (lambda: Tree.chain(300), 2.0, "hard", 256),
    "tree, rho 1.5, soft, lanes": (
        lambda: random_tree(np.random.default_rng(4), 400, internal_classes=True),
        1.5,
        "soft",
        256,
    ),
    "chain, rho 1, distance matrix": (lambda: Tree.chain(300), 1.0, "hard", 256),
    "tree, rho 2, one row": (
        lambda: random_tree(np.random.default_rng(5), 30_000),
        2.0,
        "hard",
        16,
    ),  # lanes' scratch too big
}
QUICK_TWINS = ["chain, rho 2, lanes"]  # the others compile variants of their own: slow suite


def _check_twin_gives_the_numbers_of_one_thread(monkeypatch, case):
    make_tree, rho, target, n = TWIN_CASES[case]
    tree = make_tree()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, tree.num_classes, generator=gen) * 3
    if target == "soft":
        y = torch.softmax(torch.randn(n, tree.num_classes, generator=gen), 1)
    else:
        y = torch.randint(0, tree.num_classes, (n,), generator=gen)

    def run():
        xx = x.clone().requires_grad_()
        loss = emd(xx, y, tree, rho=rho, reduction="none")
        loss.sum().backward()
        return loss.detach(), xx.grad

    twin_runs = []
    original = threads.follow_torch_threads
    monkeypatch.setattr(threads, "follow_torch_threads", lambda t: (twin_runs.append(t), original(t)))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(2)
        first = run()  # on the calling thread while the twin compiles (or already split, if it was compiled)
        background_compile.wait()
        split = run()
    finally:
        torch.set_num_threads(before)
    assert twin_runs, "the parallel twin never ran"
    for got in (first, split):
        assert torch.equal(one[0], got[0]) and torch.equal(one[1], got[1])


@pytest.mark.parametrize("case", QUICK_TWINS)
def test_split_batches_give_the_numbers_of_one_thread(monkeypatch, case):
    _check_twin_gives_the_numbers_of_one_thread(monkeypatch, case)


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(set(TWIN_CASES) - set(QUICK_TWINS)))
def test_split_batches_give_the_numbers_of_one_thread_every_kernel(monkeypatch, case):
    _check_twin_gives_the_numbers_of_one_thread(monkeypatch, case)


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
