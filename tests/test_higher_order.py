"""Second and forward-mode derivatives: exact on the reference backend (gradgradcheck, torch.func.hessian and
jvp against autograd), and a clear error, never a silently wrong number, on the fused CPU backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _helpers import random_simplex, random_tree, t64

from emdloss import EMDLoss, Tree
from emdloss.functional import emd


def _problem(seed: int, soft: bool):
    rng = np.random.default_rng(seed)
    tree = random_tree(rng, 12, internal_classes=True)
    x = torch.randn(3, tree.num_classes, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    target = t64(random_simplex(rng, 3, tree.num_classes)) if soft else torch.randint(0, tree.num_classes, (3,))
    return tree, x.requires_grad_(), target


@pytest.mark.parametrize("rho", [1.5, 2.0, 3.0])
@pytest.mark.parametrize("soft", [False, True])
def test_gradgradcheck_on_the_reference_backend(rho: float, soft: bool) -> None:
    tree, x, target = _problem(int(rho * 10) + soft, soft)
    assert torch.autograd.gradgradcheck(lambda x: emd(x, target, tree, rho=rho, backend="torch"), (x,))


def test_second_derivatives_through_a_soft_target() -> None:
    tree, x, _ = _problem(3, True)
    q = torch.softmax(torch.randn(3, tree.num_classes, dtype=torch.float64), 1).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda x, q: emd(x, q, tree, rho=2.0, backend="torch"), (x, q))


def test_rho1_second_derivative_is_zero_off_the_kinks() -> None:
    """rho = 1 is piecewise linear in the flows: its Hessian w.r.t. probabilities is 0 almost everywhere."""
    tree, _, target = _problem(4, False)
    p = torch.softmax(torch.randn(3, tree.num_classes, dtype=torch.float64), 1).requires_grad_()
    hess = torch.autograd.functional.hessian(lambda p: emd(p, target, tree, from_logits=False, backend="torch"), p)
    assert hess.abs().max() == 0


def test_torch_func_hessian_and_jvp_match_autograd() -> None:
    tree, x, target = _problem(5, True)

    def loss(x):
        return emd(x, target, tree, rho=2.0, backend="torch")

    torch.testing.assert_close(torch.func.hessian(loss)(x), torch.autograd.functional.hessian(loss, x))
    v = torch.randn_like(x)
    _, tangent = torch.func.jvp(loss, (x,), (v,))
    (grad,) = torch.autograd.grad(loss(x), x)
    torch.testing.assert_close(tangent, (grad * v).sum())


def test_hessian_vector_product_equals_finite_differences_of_the_gradient() -> None:
    tree, x, target = _problem(6, False)
    v = torch.randn_like(x)
    (g,) = torch.autograd.grad(emd(x, target, tree, rho=2.0, backend="torch"), x, create_graph=True)
    (hv,) = torch.autograd.grad((g * v).sum(), x)
    eps = 1e-6

    def grad_at(z):
        z = z.detach().requires_grad_()
        return torch.autograd.grad(emd(z, target, tree, rho=2.0, backend="torch"), z)[0]

    fd = (grad_at(x + eps * v) - grad_at(x - eps * v)) / (2 * eps)
    torch.testing.assert_close(hv, fd, rtol=1e-5, atol=1e-8)


def test_fused_backend_refuses_create_graph_instead_of_a_wrong_answer() -> None:
    tree = Tree.chain(6)
    x = torch.randn(16, 6, requires_grad=True)
    loss = EMDLoss(tree, rho=2.0, backend="numba")(x, torch.randint(0, 6, (16,)))
    with pytest.raises(RuntimeError, match=r"second derivatives .* need backend='torch'"):
        torch.autograd.grad(loss, x, create_graph=True)
