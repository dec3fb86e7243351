"""Closed-form gradients against finite differences (gradcheck) and against torch autograd of the definition."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _helpers import random_simplex, random_tree, t64

from emdloss import EMDLoss, Tree
from emdloss.functional import emd, flows

BACKENDS = ["torch", "numba"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rho", [1.5, 2.0, 3.0])
@pytest.mark.parametrize("target_kind", ["hard", "soft"])
def test_gradcheck_logits(backend: str, rho: float, target_kind: str) -> None:
    rng = np.random.default_rng(int(rho * 10))
    tree = random_tree(rng, 25, internal_classes=True)
    c = tree.num_classes
    x = t64(rng.normal(size=(4, c))).requires_grad_()
    target = torch.as_tensor(rng.integers(0, c, 4)) if target_kind == "hard" else t64(random_simplex(rng, 4, c))
    assert torch.autograd.gradcheck(
        lambda x: emd(x, target, tree, rho=rho, reduction="none", backend=backend), (x,), eps=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_rho1_away_from_kinks(backend: str) -> None:
    """rho = 1 is piecewise linear in the flows; away from f_e = 0 finite differences apply."""
    tree = Tree.chain(6)
    for seed in range(1000):  # the first draw whose flows all sit away from the kinks at f_e = 0
        rng = np.random.default_rng(seed)
        x = t64(rng.normal(size=(3, 6))).requires_grad_()
        q = t64(random_simplex(rng, 3, 6))
        if flows(torch.softmax(x.detach(), 1), q, tree).abs().min() > 1e-3:
            break
    else:
        pytest.fail("no kink-free draw found")
    assert torch.autograd.gradcheck(
        lambda x: emd(x, q, tree, reduction="none", backend=backend), (x,), eps=1e-7, atol=1e-6
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rho", [1.0, 1.5, 2.0])
def test_probability_input_gradients_match_autograd_of_definition(backend: str, rho: float) -> None:
    rng = np.random.default_rng(3)
    tree = random_tree(rng, 30, internal_classes=True)
    c = tree.num_classes
    p = t64(random_simplex(rng, 5, c)).requires_grad_()
    q = t64(random_simplex(rng, 5, c))
    w = torch.as_tensor(tree.weights[tree.edge_nodes])
    # definition through a dense (E, C) membership matrix, differentiated by autograd
    member = torch.zeros(tree.num_edges, c, dtype=torch.float64)
    for e, v in enumerate(tree.edge_nodes):
        lo, hi = tree.position[v], tree.subtree_end[tree.position[v]]
        member[e] = torch.as_tensor((tree.position[tree.classes] >= lo) & (tree.position[tree.classes] < hi))
    ref = ((((p - q) @ member.T).abs() ** rho) * w).sum()
    (g_ref,) = torch.autograd.grad(ref, p)
    ours = emd(p, q, tree, rho=rho, from_logits=False, reduction="sum", backend=backend)
    (g,) = torch.autograd.grad(ours, p)
    torch.testing.assert_close(ours, ref.detach())
    torch.testing.assert_close(g, g_ref)


def test_soft_target_gradient_flows_to_target() -> None:
    rng = np.random.default_rng(4)
    tree = random_tree(rng, 20)
    c = tree.num_classes
    x = t64(rng.normal(size=(3, c)))
    q = t64(random_simplex(rng, 3, c)).requires_grad_()
    assert torch.autograd.gradcheck(lambda q: emd(x, q, tree, rho=2.0, reduction="none"), (q,), eps=1e-6, atol=1e-6)


def test_module_matches_functional_and_backends_agree() -> None:
    rng = np.random.default_rng(5)
    tree = random_tree(rng, 40, internal_classes=True)
    c = tree.num_classes
    x = torch.randn(16, c, generator=torch.Generator().manual_seed(0))
    y = torch.as_tensor(rng.integers(0, c, 16))
    for rho in (1.0, 2.0):
        grads = []
        for backend in BACKENDS:
            xx = x.clone().requires_grad_()
            loss = EMDLoss(tree, rho=rho, backend=backend)(xx, y)
            loss.backward()
            grads.append((loss.detach(), xx.grad))
        torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-5, atol=1e-7)
