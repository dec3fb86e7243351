"""The fused CPU kernels (backend="numba") equal the reference closed form (backend="torch"): values and
gradients, on random trees (internal-node classes included), chains, hard and soft targets, rho in
{1, 1.5, 2, 3}, logits or probabilities, in float64, float32, bfloat16 and float16, through both the
eight-row lane kernel and the one-row kernel; and they are the CPU default. The default suite checks each lane
block in one kernel dtype (:func:`default_kernel_dtype`), ``-m slow`` the rest of the grid."""

from __future__ import annotations

import warnings

import numba
import numpy as np
import pytest
import torch
from _helpers import random_simplex, random_tree

from emdloss import EMDLoss, Tree, backends
from emdloss._inputs import normalise
from emdloss.backends.fused_cpu import _compute_dtype
from emdloss.functional import emd

RHOS = [1.0, 1.5, 2.0, 3.0]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def has_full_edge(tree: Tree) -> bool:
    """An edge with every class below it carries the flow sum(p) - sum(q) = 0 up to rounding, where
    rho = 1's subgradient sign(0) is arbitrary: both backends are right and may disagree. Avoid such trees."""
    pos = tree.position[tree.classes]
    lo = tree.position[tree.edge_nodes]
    hi = tree.subtree_end[lo]
    return bool(np.any((lo <= pos.min()) & (hi > pos.max())))


def make_tree(kind: str, seed: int) -> Tree:
    if kind == "chain":
        rng = np.random.default_rng(seed)
        n = 23
        return Tree.chain(n, spacing=rng.uniform(0.2, 2.0, n - 1))
    for s in range(seed, seed + 1000):
        rng = np.random.default_rng(s)
        shape = {"random-internal": "recursive", "deep": "deep", "bushy": "bushy"}[kind]
        tree = random_tree(rng, 40, shape=shape, internal_classes=kind == "random-internal")
        if not has_full_edge(tree) and tree.num_classes >= 3:
            return tree
    raise AssertionError("no suitable random tree")  # pragma: no cover


def tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol of values, atol of gradients relative to their largest entry): a few roundings of ``dtype``.

    float64 gradients get 1e-7: for 1 < rho < 2 the factor |f|^(rho-1) turns the last-bit difference of a
    near-zero flow (summed in another order by each backend) into ~sqrt(eps)."""
    eps = torch.finfo(dtype).eps
    if dtype == torch.float64:
        return 1e-10, 1e-7
    return 8 * eps, 8 * eps


def inputs(tree: Tree, target: str, from_logits: bool, dtype: torch.dtype, seed: int, sparsity: float = 0.0):
    """Logits or probabilities (N, C), a hard or soft target, and an upstream gradient (N,).

    Dense distributions by default: with exact zeros, a flow can be 0 in exact arithmetic and +-1 ulp in each
    backend's summation order, where rho = 1's subgradient sign(f) legitimately differs (tested separately)."""
    rng = np.random.default_rng(seed)
    n, c = 7, tree.num_classes
    if from_logits:
        x = torch.as_tensor(rng.normal(size=(n, c)) * 2.0)
    else:
        x = torch.as_tensor(random_simplex(rng, n, c, sparsity=sparsity))
    x = x.to(dtype)
    if target == "hard":
        t = torch.as_tensor(rng.integers(0, c, n))
    else:
        t = torch.as_tensor(random_simplex(rng, n, c, sparsity=sparsity)).to(dtype)
    w = torch.as_tensor(rng.uniform(0.5, 2.0, n)).to(dtype)  # upstream gradient: a weight per row
    return x, t, w


def value_and_grad(x, t, w, tree, rho, from_logits, backend):
    x = x.clone().requires_grad_()
    loss = emd(x, t, tree, rho=rho, from_logits=from_logits, reduction="none", backend=backend)
    (loss * w).sum().backward()
    return loss.detach(), x.grad


def assert_backends_agree(tree, target, rho, from_logits, dtype, seed=0, modulo_constant=False):
    """Values and gradients agree; with ``modulo_constant`` the gradients only up to a constant per row
    (the same gradient on the probability simplex, where sum_j dp_j = 0)."""
    x, t, w = inputs(tree, target, from_logits, dtype, seed)
    v_ref, g_ref = value_and_grad(x, t, w, tree, rho, from_logits, "torch")
    v_fast, g_fast = value_and_grad(x, t, w, tree, rho, from_logits, "numba")
    assert v_fast.dtype == v_ref.dtype == dtype and g_fast.dtype == dtype
    rtol, gtol = tolerances(dtype)
    torch.testing.assert_close(
        v_fast.double(), v_ref.double(), rtol=rtol, atol=rtol * float(v_ref.double().abs().max())
    )
    g_fast, g_ref = g_fast.double(), g_ref.double()
    if modulo_constant:
        g_fast, g_ref = g_fast - g_fast.mean(1, keepdim=True), g_ref - g_ref.mean(1, keepdim=True)
    scale = float(g_ref.abs().max())
    torch.testing.assert_close(g_fast, g_ref, rtol=0, atol=gtol * max(scale, 1e-30))


@pytest.fixture(params=["lanes", "one-row"])
def kernel(request, monkeypatch):
    """Run the test through one of the two fused tree kernels (the choice is normally by batch size)."""
    from emdloss.backends.numba_kernels import lane_kernels

    monkeypatch.setattr(lane_kernels, "lanes_pay_off", lambda *args: request.param == "lanes")
    return request.param


def distance_matrix_path(target: str, rho: float, from_logits: bool) -> bool:
    """Hard targets, rho = 1, probability input: the fused backend's dL/dp is the distance row D[y], which is
    the reference's gradient plus the constant depth(y) (the same on the simplex)."""
    return target == "hard" and rho == 1.0 and not from_logits


def default_kernel_dtype(chain: bool, rho: float, soft: bool) -> torch.dtype:
    """The kernel dtype in which the default suite checks one lane-kernel block (chain or tree, rho = 1, 2 or
    other, hard or soft targets); the other dtype runs under ``-m slow``.

    Each (block, kernel dtype) pair is a variant numba compiles for about 5 s on 2 cores, and numba's code is
    the same for both dtypes but for the types, so the default suite compiles each block once. The dtypes
    alternate so that each tree kind, exponent and target kind is still checked in both."""
    exponent = 0 if rho == 1.0 else 1 if rho == 2.0 else 2
    return torch.float64 if (int(chain) + exponent + int(soft)) % 2 else torch.float32


def reference_cases() -> list:
    """(kind, target, rho, from_logits, dtype) for :func:`test_fused_equals_reference`: the whole grid, the
    inputs whose kernel dtype is not their block's :func:`default_kernel_dtype` marked slow."""
    cases = []
    for kind in ("random-internal", "deep", "bushy", "chain"):
        for target in ("hard", "soft"):
            for rho in RHOS:
                default = default_kernel_dtype(kind == "chain", rho, target == "soft")
                for from_logits in (True, False):
                    for dtype in DTYPES:
                        marks = () if _compute_dtype(dtype) == default else (pytest.mark.slow,)
                        ids = f"{kind}-{target}-{rho}-{'logits' if from_logits else 'probs'}-{dtype}"
                        cases.append(pytest.param(kind, target, rho, from_logits, dtype, marks=marks, id=ids))
    return cases


@pytest.mark.parametrize(("kind", "target", "rho", "from_logits", "dtype"), reference_cases())
def test_fused_equals_reference(kind, target, rho, from_logits, dtype, kernel):
    modulo = distance_matrix_path(target, rho, from_logits)
    assert_backends_agree(make_tree(kind, seed=len(kind)), target, rho, from_logits, dtype, modulo_constant=modulo)


def test_hard_rho1_probability_gradient_is_the_reference_one():
    """The distance-matrix shortcut returns the reference subgradient D[y] - depth(y), not just one equal on
    the simplex."""
    assert_backends_agree(make_tree("chain", 0), "hard", 1.0, False, torch.float64)


@pytest.mark.parametrize("rho", [1.0, 2.0])
@pytest.mark.parametrize("kind", ["chain", "random"])
def test_fused_equals_reference_beyond_the_distance_matrix_size(kind, rho):
    """Hard rho=1 targets use a cached C x C distance matrix only up to a size; past it the row kernel runs."""
    from emdloss.backends import numba_kernels

    limit = numba_kernels.DISTANCE_MATRIX_MAX_CLASSES
    if kind == "chain":
        tree = Tree.chain(limit + 100)
    else:
        rng = np.random.default_rng(7)
        n = 3 * limit  # about half the nodes of a random recursive tree are leaves
        parents = np.concatenate([[-1], rng.integers(0, np.arange(1, n))])  # 2 or more root children w.h.p.
        tree = Tree.from_parents(parents, weights=rng.uniform(0.5, 1.5, n))
        assert not has_full_edge(tree)
    assert tree.num_classes > limit
    for target in ("hard", "soft"):
        for from_logits in (True, False):
            x, t, w = inputs(tree, target, from_logits, torch.float32, seed=1)
            v_ref, g_ref = value_and_grad(x[:3], t[:3], w[:3], tree, rho, from_logits, "torch")
            v_fast, g_fast = value_and_grad(x[:3], t[:3], w[:3], tree, rho, from_logits, "numba")
            torch.testing.assert_close(v_fast, v_ref, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(g_fast, g_ref, rtol=0, atol=1e-5 * float(g_ref.abs().max()))


def test_imagenet_tree_agrees(kernel):
    from _helpers import shared_data_or_skip

    shared_data_or_skip()
    from emdloss_lab.data import imagenet_tree

    tree = imagenet_tree()
    for target in ("hard", "soft"):
        for rho in (1.0, 2.0):
            assert_backends_agree(tree, target, rho, True, default_kernel_dtype(False, rho, target == "soft"), seed=3)


def chosen(x: torch.Tensor, target: torch.Tensor, backend: str = "auto") -> str:
    """The name of the backend the registry picks for this call."""
    batch = normalise(x, target, x.shape[1], from_logits=True, ignore_index=-100, validate=None, reduction="mean")
    return backends.select(backend, batch).name


def test_fused_is_the_cpu_default_and_falls_back_when_it_must(monkeypatch):
    x = torch.zeros(2, 5)
    soft = torch.full((2, 5), 0.2)
    labels = torch.tensor([0, 4])
    assert backends.names() == ("numba", "triton", "torch")  # triton: CUDA tensors only under "auto"
    assert chosen(x, labels) == "numba"
    assert chosen(x, soft) == "numba"
    assert chosen(x, soft.clone().requires_grad_()) == "torch"  # a target that needs a gradient
    assert chosen(x, labels, "torch") == "torch"
    with pytest.raises(ValueError, match="backend='numba' cannot run this call: it does not differentiate"):
        chosen(x, soft.clone().requires_grad_(), "numba")
    monkeypatch.setenv("EMDLOSS_BACKEND", "torch")
    assert chosen(x, labels) == "torch"
    assert chosen(x, labels, "numba") == "numba"  # an explicit choice wins over the environment


def test_unknown_backend_names_are_errors_that_list_the_registered_ones(monkeypatch):
    x, labels = torch.zeros(2, 5), torch.tensor([0, 4])
    with pytest.raises(
        ValueError, match=r"backend must be 'auto' or one of \('numba', 'triton', 'torch'\), got 'cuda'"
    ):
        emd(x, labels, Tree.chain(5), backend="cuda")
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        EMDLoss(Tree.chain(5), backend="numpy")
    monkeypatch.setenv("EMDLOSS_BACKEND", "fast")
    with pytest.raises(ValueError, match=r"environment variable EMDLOSS_BACKEND must be 'auto' or one of .*got 'fast'"):
        emd(x, labels, Tree.chain(5))


def _reference_result(tree, x, target, rho):
    xr = x.detach().clone().requires_grad_()
    loss = emd(xr, target, tree, rho=rho, backend="torch")
    loss.backward()
    return loss.detach(), xr.grad


@pytest.mark.parametrize("soft", [False, True])
def test_lane_kernels_that_fail_to_compile_fall_back_to_the_one_row_kernel(monkeypatch, soft):
    """Any exception from the lane kernels (numba's extension API changing, say) warns once, and the one-row
    kernel computes the same batch; later calls go straight to it."""
    from emdloss.backends import numba_kernels
    from emdloss.backends.numba_kernels import lane_kernels

    def broken(*args):
        raise numba.core.errors.TypingError("simulated: the lane type no longer compiles")

    monkeypatch.setattr(numba_kernels, "_lanes_state", {})
    monkeypatch.setattr(lane_kernels, "_lanes_kernel", broken)
    tree = Tree.chain(40) if soft else random_tree(np.random.default_rng(0), 60, internal_classes=True)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, tree.num_classes, generator=gen, dtype=torch.float64, requires_grad=True)
    target = torch.softmax(torch.randn(64, tree.num_classes, generator=gen, dtype=torch.float64), 1) if soft else \
        torch.randint(0, tree.num_classes, (64,), generator=gen)  # fmt: skip
    with pytest.warns(backends.BackendWarning, match="8-row SIMD kernels are unavailable.*TypingError"):
        loss = emd(x, target, tree, rho=2.0, backend="numba")
    loss.backward()
    ref_loss, ref_grad = _reference_result(tree, x, target, 2.0)
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(x.grad, ref_grad, rtol=1e-10, atol=1e-14)
    assert numba_kernels.load_lane_kernels() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        emd(x, target, tree, rho=2.0, backend="numba")


def test_fused_backend_that_fails_falls_back_to_the_reference(monkeypatch):
    """If the one-row kernels fail too, "auto" warns once and the reference backend computes the call; an
    explicit backend="numba" is then an error saying why."""
    from emdloss.backends import numba_kernels

    def broken(*args):
        raise numba.core.errors.LoweringError("simulated: no code for this CPU")

    fused = backends.get("numba")
    monkeypatch.setattr(fused, "_broken", None)
    monkeypatch.setattr(numba_kernels, "_lanes_state", {"module": None})
    monkeypatch.setattr(numba_kernels.one_row, "_rows_kernel", broken)
    tree = random_tree(np.random.default_rng(1), 25)
    x = torch.randn(16, tree.num_classes, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, tree.num_classes, (16,))
    with pytest.warns(backends.BackendWarning, match="fused CPU backend is unavailable.*LoweringError"):
        loss = emd(x, target, tree, rho=2.0)
    loss.backward()
    ref_loss, ref_grad = _reference_result(tree, x, target, 2.0)
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, ref_grad, rtol=0, atol=0)
    assert chosen(x, target) == "torch"
    with pytest.raises(ValueError, match="backend='numba' cannot run this call: its kernels fail to compile"):
        emd(x, target, tree, backend="numba")


def test_numba_that_cannot_be_imported_leaves_the_reference_working(monkeypatch):
    """A broken numba install (any exception on import, not only ImportError) warns and uses the reference."""
    import builtins

    real_import = builtins.__import__

    def failing_import(name, *args, **kwargs):
        fromlist = args[2] if len(args) > 2 else kwargs.get("fromlist")
        if "numba_kernels" in name or "numba_kernels" in (fromlist or ()):
            raise AttributeError("simulated: module 'numba.core' has no attribute 'cgutils'")
        return real_import(name, *args, **kwargs)

    fused = backends.get("numba")
    monkeypatch.setattr(fused, "_broken", None)
    monkeypatch.setattr(fused, "_kernels", None)
    monkeypatch.setattr(builtins, "__import__", failing_import)
    with pytest.warns(backends.BackendWarning, match="numba cannot be imported.*AttributeError"):
        assert chosen(torch.zeros(2, 5), torch.tensor([0, 1])) == "torch"


def test_target_gradient_through_the_fallback_matches_autograd():
    """Soft targets that need a gradient take the reference path; the loss module gives the same values."""
    tree = make_tree("bushy", 3)
    x, t, _ = inputs(tree, "soft", True, torch.float64, seed=5)
    t = t.clone().requires_grad_()
    loss = EMDLoss(tree, rho=2.0)(x, t)
    loss.backward()
    assert t.grad is not None and torch.isfinite(t.grad).all()
    assert float(loss.detach()) == pytest.approx(float(emd(x, t.detach(), tree, rho=2.0, backend="numba")), rel=1e-12)


@pytest.mark.parametrize("rho", RHOS)
@pytest.mark.parametrize("kind", ["random-internal", "chain"])
def test_sparse_distributions(kind, rho, kernel):
    """Exact zeros in p and q: values agree; gradients too where the cost is smooth at f = 0 (rho >= 2)."""
    tree = make_tree(kind, seed=11)
    for target in ("hard", "soft"):
        dtype = default_kernel_dtype(kind == "chain", rho, target == "soft")
        rtol, gtol = (1e-10, 1e-9) if dtype == torch.float64 else tolerances(dtype)
        x, t, w = inputs(tree, target, False, dtype, seed=4, sparsity=0.5)
        v_ref, g_ref = value_and_grad(x, t, w, tree, rho, False, "torch")
        v_fast, g_fast = value_and_grad(x, t, w, tree, rho, False, "numba")
        torch.testing.assert_close(v_fast, v_ref, rtol=rtol, atol=rtol * 1e-2)
        if rho >= 2.0:
            if distance_matrix_path(target, rho, False):  # pragma: no cover - rho >= 2 never takes it
                continue
            torch.testing.assert_close(g_fast, g_ref, rtol=0, atol=gtol * float(g_ref.abs().max()))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("n", [1, 8, 13])
@pytest.mark.parametrize("kind", ["random-internal", "chain"])
def test_ignored_rows_partial_blocks_and_reductions(kind, n, reduction, kernel):
    """Rows with ignore_index inside a block of lanes, blocks that end past the last row, every reduction and
    an upstream gradient other than 1: the same values and gradients as the reference."""
    tree = make_tree(kind, seed=2)
    rng = np.random.default_rng(n)
    x0 = torch.as_tensor(rng.normal(size=(n, tree.num_classes)) * 2, dtype=torch.float32)
    y = torch.as_tensor(rng.integers(0, tree.num_classes, n))
    y[::3] = -100 if n > 1 else y[::3]
    for rho in (1.0, 2.0, 1.5):
        results = []
        for backend in ("torch", "numba"):
            x = x0.clone().requires_grad_()
            loss = emd(x, y, tree, rho=rho, reduction=reduction, backend=backend)
            (loss * 1.7).sum().backward()
            results.append((loss.detach(), x.grad))
        (v_ref, g_ref), (v_fast, g_fast) = results
        torch.testing.assert_close(v_fast, v_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g_fast, g_ref, rtol=0, atol=1e-5 * max(float(g_ref.abs().max()), 1e-6))
        if n > 1:
            assert float(g_fast[0].abs().max()) == 0.0  # an ignored row has no gradient


def test_loss_backward_hands_back_the_kernel_gradient():
    """With reduction="mean" and loss.backward(), the gradient is the kernel's, already divided by the number
    of kept rows; a second backward through a retained graph gives it again."""
    tree = Tree.chain(6)
    x = torch.randn(4, 6).requires_grad_()
    y = torch.tensor([0, 5, -100, 2])
    loss = emd(x, y, tree, rho=2.0, backend="numba")
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward()
    torch.testing.assert_close(x.grad, 2 * first)
    x.grad = None
    emd(x, y, tree, rho=2.0, backend="torch").backward()
    torch.testing.assert_close(first, x.grad, rtol=0, atol=1e-6)


@pytest.mark.parametrize("n_cls", [2, 3, 7, 8, 9, 16, 17])
@pytest.mark.parametrize("kind", ["tree", "chain"])
def test_class_counts_around_the_lane_width(kind, n_cls, kernel):
    """The lane kernel pads the classes to a multiple of 8 and reads soft targets' last partial block through
    a copy: counts below, at and just past multiples of 8 agree with the reference, hard and soft targets."""
    rng = np.random.default_rng(n_cls)
    if kind == "chain":
        tree = Tree.chain(n_cls, spacing=rng.uniform(0.2, 2.0, n_cls - 1))
    else:  # n_cls leaves under a random tree of internal nodes
        tree = next(
            t
            for t in (random_tree(rng, 2 * n_cls + 1, shape="recursive") for _ in range(1000))
            if t.num_classes == n_cls
        )
    for target in ("hard", "soft"):
        for rho in (1.5, 2.0):
            dtype = default_kernel_dtype(kind == "chain", rho, target == "soft")
            assert_backends_agree(tree, target, rho, True, dtype)
            assert_backends_agree(tree, target, rho, False, dtype)


def test_lane_kernel_choice(monkeypatch):
    """The lane kernel runs from LANES rows up while its scratch is cache-sized or at most the input; fewer
    rows, or small batches of huge trees, go one row at a time. (Scratch is per thread: two here.)"""
    from emdloss.backends.numba_kernels import lane_kernels
    from emdloss.backends.numba_kernels.lane_kernels import LANES, lanes_pay_off

    monkeypatch.setattr(lane_kernels.kernel_threads, "threads", lambda: 2)

    assert not lanes_pay_off(LANES - 1, 1000, 372, 4)  # the lanes would repeat the last row
    assert lanes_pay_off(LANES, 1000, 372, 4) and lanes_pay_off(64, 1000, 372, 4)  # ImageNet-sized, any batch
    assert not lanes_pay_off(8, 10**6, 0, 4) and not lanes_pay_off(64, 10**5, 0, 4)  # scratch > input, > 1 MiB
    assert lanes_pay_off(1024, 10**5, 0, 4)  # the input outweighs the scratch


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lane_transposes_and_arithmetic(dtype):
    """lanes_columns / lanes_store_columns move an 8 x 8 block between rows and lanes exactly (float32 widened
    and rounded back losslessly), and the lane arithmetic matches numpy lane by lane (to one rounding, where
    LLVM may contract a multiply-add)."""
    from numba import njit

    from emdloss.backends.numba_kernels.lanes import (
        LANES,
        lanes_abs,
        lanes_clamp_unit,
        lanes_columns,
        lanes_fill,
        lanes_load,
        lanes_one_hot,
        lanes_store,
        lanes_store_columns,
        lanes_to_tuple,
    )

    @njit
    def columns_and_back(a, offsets, j, out):  # pragma: no cover - compiled
        cols = lanes_columns(a, offsets, j)
        lanes_store_columns(out, offsets, j, cols)
        table = np.empty((LANES, LANES))
        for c in range(LANES):
            lanes_store(table[c], 0, cols[c])
        return table

    @njit
    def arithmetic(u, v, labels):  # pragma: no cover - compiled
        a, b = lanes_load(u, 0), lanes_load(v, 0)
        return (
            lanes_to_tuple(a + b), lanes_to_tuple(a - b), lanes_to_tuple(2.0 * a * b - 1.0),
            lanes_to_tuple(lanes_abs(a)), lanes_to_tuple(lanes_clamp_unit(a * 3.0)),
            lanes_to_tuple(lanes_one_hot(3, labels)), lanes_to_tuple(lanes_fill(np.float32(0.5))),
        )  # fmt: skip

    rng = np.random.default_rng(0)
    a = rng.normal(size=400).astype(dtype)
    offsets = (0, 50, 97, 150, 203, 260, 311, 390 - 11)  # uneven row starts, the last near the end
    out = np.zeros_like(a)
    table = columns_and_back(a, offsets, 3, out)
    expected = np.array([[a[o + 3 + c] for o in offsets] for c in range(8)], dtype=np.float64)
    assert np.array_equal(table, expected)
    written = np.zeros(a.size, dtype=bool)
    for o in offsets:
        written[o + 3 : o + 11] = True
    assert np.array_equal(out[written], a[written]) and not out[~written].any()

    u, v = rng.normal(size=8), rng.normal(size=8)
    labels = (3, 0, 3, -1, 7, 3, 2, 1)
    got = [np.array(t) for t in arithmetic(u, v, labels)]
    for value, want in zip(
        got,
        (u + v, u - v, 2 * u * v - 1, np.abs(u), np.clip(3 * u, -1, 1), np.array(labels) == 3, np.full(8, 0.5)),
    ):
        np.testing.assert_allclose(value, want, rtol=1e-15, atol=1e-15)  # 2ab - 1 may round once (an FMA)


def test_vectorised_exp_is_accurate_and_handles_the_extremes():
    """simd.exp_f32 (the fused softmax's exp): within 3e-7 of exp over the float32 range of softmax arguments,
    exactly 0 where float32 exp underflows and at -inf, NaN for NaN."""
    from numba import njit

    from emdloss.backends.numba_kernels.simd import exp_f32

    @njit
    def apply(xs):  # pragma: no cover - compiled
        out = np.empty_like(xs)
        for i in range(xs.size):
            out[i] = exp_f32(xs[i])
        return out

    xs = np.linspace(-87.3, 0.0, 200_001).astype(np.float32)
    exact = np.exp(xs.astype(np.float64))
    assert np.max(np.abs(apply(xs) - exact) / exact) < 3e-7
    extremes = apply(np.array([-87.4, -1e30, -np.inf, np.nan, 0.0], dtype=np.float32))
    assert extremes[:3].tolist() == [0.0, 0.0, 0.0] and np.isnan(extremes[3]) and extremes[4] == 1.0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_row_maximum_through_the_integers(dtype):
    """simd.row_max (the fused softmax's shift) equals numpy's max on mixed-sign, all-negative and -inf rows,
    and a (positive) NaN wins."""
    from numba import njit

    from emdloss.backends.numba_kernels.simd import row_max

    @njit
    def apply(row):  # pragma: no cover - compiled
        return row_max(row)

    rng = np.random.default_rng(0)
    for row in (
        rng.normal(size=1001),
        -rng.uniform(0.1, 5.0, size=17),
        np.array([-np.inf, -3.0, -np.inf]),
        np.zeros(1),
    ):
        row = row.astype(dtype)
        assert apply(row) == row.max()
    assert np.isnan(apply(np.array([1.0, np.nan, 2.0], dtype=dtype)))


@pytest.mark.slow
def test_lane_kernels_on_the_baseline_x86_target(tmp_path):
    """The lanes are target-independent LLVM vectors: compiled for the baseline x86-64 CPU (SSE2 only, where
    LLVM splits each 8-lane vector into four registers) the lane kernels still equal the reference. Runs in
    a subprocess with its own numba cache (the target is fixed when numba starts); about a minute."""
    import os
    import platform
    import subprocess
    import sys

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the baseline target checked here is x86-64's")
    script = """
import numba, numpy as np, torch
from emdloss import Tree
from emdloss.backends.numba_kernels.lane_kernels import lanes_pay_off
from emdloss.functional import emd
assert numba.config.CPU_NAME == "generic"
rng = np.random.default_rng(0)
n = 512
for tree in (Tree.chain(29), Tree.from_parents(np.r_[-1, rng.integers(0, np.arange(1, 60))])):
    assert lanes_pay_off(n, tree.num_classes, tree.num_nodes, 4)  # the lane kernel runs
    for soft in (False, True):
        x = torch.randn(n, tree.num_classes, dtype=torch.float32, requires_grad=True)
        t = torch.softmax(torch.randn(n, tree.num_classes), 1) if soft else torch.randint(0, tree.num_classes, (n,))
        grads = []
        for backend in ("torch", "numba"):
            x.grad = None
            loss = emd(x, t, tree, rho=2.0, reduction="none", backend=backend)
            loss.sum().backward()
            grads.append((loss.detach().double(), x.grad.double()))
        (l0, g0), (l1, g1) = grads
        torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g1, g0, rtol=0, atol=1e-5 * float(g0.abs().max()))
print("ok")
"""
    env = dict(os.environ, NUMBA_CPU_NAME="generic", NUMBA_CACHE_DIR=str(tmp_path))
    done = subprocess.run(
        [sys.executable, "-c", script], check=False, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


@pytest.mark.parametrize("seed", range(4))
def test_distance_table_in_float32_is_the_float64_one_rounded_once(seed: int) -> None:
    """The hard rho = 1 kernel's (C, C) table is built in the input's dtype, each path length summed in float64
    and rounded once (equal to the float64 table cast), without building the float64 table on the way: it
    would stay cached on the tree beside it (192 MiB instead of 64 at 4,096 classes)."""
    from emdloss.backends.numba_kernels.tree_arrays import distance_rows

    rng = np.random.default_rng(seed)
    base = random_tree(rng, 80, shape=("recursive", "deep", "bushy", "recursive")[seed], internal_classes=seed % 2 == 1)
    weights = 10.0 ** rng.uniform(-4, 4, base.num_nodes)  # sums that float32 must round
    tree = Tree.from_parents(base.parents, weights=weights, classes=base.classes)
    table, _ = distance_rows(tree, np.dtype(np.float32))
    assert "distance_matrix" not in tree._derived
    assert table.dtype == np.float32 and table.flags.c_contiguous
    np.testing.assert_array_equal(table, tree.distance_matrix().astype(np.float32))
    np.testing.assert_array_equal(distance_rows(tree, np.dtype(np.float64))[0], tree.distance_matrix())
