"""Numerics at the edges: extreme logits, half precision at 10^4-10^5 classes, 10^6-node hierarchies, determinism."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from emdloss import EMDLoss, Tree
from emdloss.functional import emd

BACKENDS = ["torch", "numba"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rho", [1.0, 1.5, 2.0])
@pytest.mark.parametrize("scale", [1e4, -1e4, 1e3])
def test_extreme_logits_are_finite(backend: str, rho: float, scale: float) -> None:
    g = torch.Generator().manual_seed(0)
    tree = Tree.from_parents([-1, 0, 0, 1, 1, 2, 2, 0], weights=[0, 1, 2, 0.5, 1, 3, 1, 2])
    x = (torch.randn(16, tree.num_classes, generator=g) * scale).requires_grad_()
    y = torch.randint(0, tree.num_classes, (16,), generator=g)
    loss = emd(x, y, tree, rho=rho, backend=backend)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    # a saturated softmax is one-hot: the loss is the tree distance from the argmax to the target
    expected = tree.distance_matrix()[x.argmax(1).numpy(), y.numpy()]
    if rho == 1.0 and abs(scale) >= 1e4:
        np.testing.assert_allclose(loss.item(), expected.mean(), rtol=1e-5)


#: documented bound (docs/numerics.md): relative error of a half-precision call against float64 on the same
#: (already rounded) input, per sample. The loss is accumulated in float32/float64 and rounded once to the
#: input dtype, so the bound is a few units of that dtype's rounding.
HALF_BOUND = {torch.float16: 4 * 2.0**-11, torch.bfloat16: 4 * 2.0**-8}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_classes", [10**4, 10**5])
@pytest.mark.parametrize("rho", [1.0, 2.0])
def test_half_precision_error_bound(backend: str, dtype: torch.dtype, num_classes: int, rho: float) -> None:
    g = torch.Generator().manual_seed(num_classes)
    tree = Tree.chain(num_classes)
    x = (torch.randn(4, num_classes, generator=g) * 3).to(dtype).requires_grad_()
    y = torch.randint(0, num_classes, (4,), generator=g)
    got = emd(x, y, tree, rho=rho, reduction="none", backend=backend)
    assert got.dtype == dtype
    x64 = x.detach().double().requires_grad_()
    ref = emd(x64, y, tree, rho=rho, reduction="none")
    rel = ((got.double() - ref.detach()).abs() / ref.detach()).max().item()
    assert rel <= HALF_BOUND[dtype], rel
    got.sum().backward()
    ref.sum().backward()
    assert x.grad.dtype == dtype
    scale = x64.grad.abs().max()
    assert ((x.grad.double() - x64.grad).abs().max() / scale).item() <= 8 * HALF_BOUND[dtype]


@pytest.mark.parametrize("kind", ["chain", "random"])
def test_million_node_hierarchies(kind: str) -> None:
    """Build, run and differentiate on a 10^6-node chain and random tree: no recursion, nothing quadratic."""
    n = 10**6
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    if kind == "chain":
        tree = Tree.chain(n)
    else:
        parents = np.concatenate([[-1], rng.integers(0, np.arange(1, n))])
        tree = Tree.from_parents(parents)
    built = time.perf_counter() - start
    x = torch.randn(2, tree.num_classes, requires_grad=True)
    y = torch.as_tensor(rng.integers(0, tree.num_classes, 2))
    for backend in BACKENDS:
        x.grad = None
        loss = EMDLoss(tree, rho=2.0, backend=backend)(x, y)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    print(f"{kind}: built {n} nodes in {built:.2f}s")


@pytest.mark.parametrize("backend", BACKENDS)
def test_repeated_runs_are_bitwise_identical(backend: str) -> None:
    g = torch.Generator().manual_seed(3)
    tree = Tree.chain(777)
    x = torch.randn(64, 777, generator=g)
    q = torch.softmax(torch.randn(64, 777, generator=g), 1)
    results = []
    for _ in range(3):
        xx = x.clone().requires_grad_()
        loss = emd(xx, q, tree, rho=1.5, backend=backend)
        loss.backward()
        results.append((loss.detach(), xx.grad))
    for loss, grad in results[1:]:
        assert torch.equal(loss, results[0][0]) and torch.equal(grad, results[0][1])
