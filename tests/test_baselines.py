"""The baselines against their papers' definitions, computed here by hand on small trees (not by the code under
test), and the theory's counter-example (docs/theory.md) checked numerically."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from emdloss import Tree
from emdloss.functional import emd
from emdloss_lab.data import DataUnavailable
from emdloss_lab.experiments import baselines, training


def balanced_tree() -> Tree:
    #        0
    #      /   \
    #     1     2
    #    / \   / \
    #   3   4 5   6      classes 0..3 = nodes 3..6
    return Tree.from_parents([-1, 0, 0, 1, 1, 2, 2], classes=[3, 4, 5, 6])


def lopsided_tree() -> Tree:
    #      0
    #     / \
    #    1   2          classes: A = node 1 (depth 1), b1 = node 3, b2 = node 4 (depth 2)
    #       / \
    #      3   4
    return Tree.from_parents([-1, 0, 0, 2, 2], classes=[1, 3, 4])


# ---------------------------------------------------------------------- soft labels


@pytest.mark.parametrize("beta", [4.0, 30.0])
def test_soft_labels_by_hand_on_a_balanced_tree(beta: float) -> None:
    # LCA heights: 0 to itself, 1 to the sibling, 2 to the cousins; divided by the largest (2).
    w = np.array([1.0, math.exp(-beta * 1 / 2), math.exp(-beta * 2 / 2), math.exp(-beta * 2 / 2)])
    q0 = w / w.sum()
    for distance in ("lca", "path"):  # path = 2 x LCA height here: identical after the division by the max
        soft = baselines.SoftLabelLoss(balanced_tree(), beta=beta, distance=distance).soft.double().numpy()
        assert soft[0] == pytest.approx(q0, rel=1e-6)
        assert soft[3] == pytest.approx(q0[[3, 2, 1, 0]], rel=1e-6)


def test_soft_labels_lca_and_path_differ_on_a_lopsided_tree() -> None:
    # LCA height = deepest class depth (2) - depth(LCA): h(A, b1) = 2, h(b1, b2) = 1, h(A, A) = 1, h(b1, b1) = 0.
    beta = 5.0
    lca = baselines.SoftLabelLoss(lopsided_tree(), beta=beta).soft.double().numpy()
    w = np.exp(-beta * np.array([2, 0, 1]) / 2)  # row of b1: to A, to b1, to b2
    assert lca[1] == pytest.approx(w / w.sum(), rel=1e-6)
    path = baselines.SoftLabelLoss(lopsided_tree(), beta=beta, distance="path").soft.double().numpy()
    w = np.exp(-beta * np.array([3, 0, 2]) / 3)  # path lengths 3, 0, 2 over the largest, 3
    assert path[1] == pytest.approx(w / w.sum(), rel=1e-6)


def test_soft_label_loss_is_cross_entropy_against_its_labels() -> None:
    tree = balanced_tree()
    loss = baselines.SoftLabelLoss(tree, beta=10.0)
    z, y = torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 0, 2])
    expected = F.cross_entropy(z, loss.soft.double()[y])  # torch's soft-target cross-entropy
    assert loss(z, y).item() == pytest.approx(expected.item(), rel=1e-5)


def test_soft_labels_at_the_published_beta_are_not_cross_entropy() -> None:
    """The review's finding: without the division by the max, beta = 5 over path lengths gave CE exactly."""
    try:
        tree = training_tree()
    except DataUnavailable as exc:
        pytest.skip(f"shared data folder not available: {exc}")
    y = torch.randint(tree.num_classes, (64,), generator=torch.Generator().manual_seed(1))
    z = 12.0 * F.one_hot(y, tree.num_classes).float()  # confident and right: CE is ~0.001
    ce = F.cross_entropy(z, y).item()
    for beta in baselines.BETA_GRID:
        soft = baselines.SoftLabelLoss(tree, beta=beta)
        assert float(soft.soft.diagonal().max()) < 0.99, beta  # labels are soft, not one-hot
        assert soft(z, y).item() > ce + 0.05, beta  # soft labels still penalise the one-hot prediction
    # the old, unnormalised labels (beta = 5 times the path length) were one-hot to four decimals
    old = torch.softmax(-5.0 * torch.tensor(tree.distance_matrix()), dim=1)
    assert float(old.diagonal().min()) > 0.999


def training_tree() -> Tree:
    from emdloss_lab.data import imagenet_tree

    return imagenet_tree()


# ---------------------------------------------------------------------- hierarchical cross-entropy


@pytest.mark.parametrize("alpha", [0.0, 0.3])
@pytest.mark.parametrize("normalize", [False, True])
def test_hxe_by_hand_on_a_lopsided_tree(alpha: float, normalize: bool) -> None:
    z = torch.tensor([[0.3, -1.0, 2.0], [1.5, 0.2, -0.4]], dtype=torch.float64)
    p = torch.softmax(z, 1).numpy()
    lam_depth = lambda d: math.exp(-alpha * d)  # noqa: E731 - the weight of the edge above a node at depth d
    # the authors normalise over all nodes of the tree (root included): depths 0, 1, 1, 2, 2
    total = sum(lam_depth(d) for d in (0, 1, 1, 2, 2)) if normalize else 1.0
    # y = b1 (class 1): the edges b1 -> node 2 (depth 2) and node 2 -> root (depth 1)
    b1 = -(lam_depth(2) * math.log(p[0, 1] / (p[0, 1] + p[0, 2])) + lam_depth(1) * math.log(p[0, 1] + p[0, 2]))
    # y = A (class 0): the edge A -> root (depth 1)
    a = -lam_depth(1) * math.log(p[1, 0])
    got = baselines.HXELoss(lopsided_tree(), alpha=alpha, normalize=normalize)(z, torch.tensor([1, 0]))
    assert got.item() == pytest.approx((b1 + a) / 2 / total, rel=1e-5)


def test_hxe_alpha_zero_unnormalised_is_cross_entropy() -> None:
    z, y = torch.randn(7, 4), torch.randint(4, (7,))
    got = baselines.HXELoss(balanced_tree(), alpha=0.0, normalize=False)(z, y)
    assert torch.allclose(got, F.cross_entropy(z, y), atol=1e-5)


# ---------------------------------------------------------------------- CE + lambda * relaxed EMD, squared EMD


def test_relaxed_emd_on_a_unit_chain_is_hou_and_dlordinal() -> None:
    c = 7
    z = torch.randn(9, c, dtype=torch.float64, generator=torch.Generator().manual_seed(3))  # float64: torch backend
    y = torch.randint(c, (9,), generator=torch.Generator().manual_seed(4))
    p = torch.softmax(z, 1)
    ours = emd(z, y, Tree.chain(c), rho=2.0, reduction="none")
    # dlordinal 2.7.0 losses/emd_loss.py EMDLoss.forward, transcribed: one-hot, softmax, cumsum, sum of squares
    onehot = F.one_hot(y, c).double()
    dlordinal = ((torch.cumsum(p, 1) - torch.cumsum(onehot, 1)) ** 2).sum(1)
    assert torch.allclose(ours, dlordinal, rtol=1e-12, atol=1e-14)
    # Hou et al. (2016): (1/C) sum_k (CDF_p(k) - CDF_t(k))^2 -> ours = C x theirs
    assert torch.allclose(ours, c * baselines.hou_squared_emd(p, y), rtol=1e-12, atol=1e-14)
    q = torch.softmax(torch.randn(9, c, dtype=torch.float64), 1)  # soft targets too
    assert torch.allclose(
        emd(z, q, Tree.chain(c), rho=2.0, reduction="none"), baselines.hou_squared_emd(p, q, normalized=False)
    )


def test_ce_plus_relaxed_emd_on_a_chain() -> None:
    c, lam = 5, 0.3
    z, y = torch.randn(6, c, dtype=torch.float64), torch.randint(c, (6,))
    expected = F.cross_entropy(z, y) + lam * baselines.hou_squared_emd(torch.softmax(z, 1), y, normalized=False).mean()
    got = training.make_loss("ce+relaxed", Tree.chain(c), lam)(z, y)
    assert got.item() == pytest.approx(expected.item(), rel=1e-10)


@pytest.mark.parametrize(
    "make",
    [
        lambda: baselines.HXELoss(balanced_tree(), alpha=-1.0),
        lambda: baselines.SoftLabelLoss(balanced_tree(), beta=float("nan")),
        lambda: baselines.SoftLabelLoss(balanced_tree(), distance="hops"),
        lambda: baselines.CEPlusEMDLoss(balanced_tree(), lam=-0.5),
        lambda: baselines.CEPlusEMDLoss(balanced_tree(), rho=0.5),
    ],
)
def test_baselines_reject_bad_arguments(make) -> None:
    with pytest.raises(ValueError, match=r"alpha|beta|distance|lam|rho"):
        make()


def test_baselines_reject_a_non_tree() -> None:
    for cls in (baselines.HXELoss, baselines.SoftLabelLoss, baselines.CEPlusEMDLoss):
        with pytest.raises(TypeError, match="tree"):
            cls("not a tree")


def test_every_tuned_loss_has_its_published_grid() -> None:
    assert training.HYPER["soft"][1] == (4.0, 5.0, 10.0, 15.0, 20.0, 30.0)
    assert set(training.HYPER["hxe"][1]) >= {0.1, 0.2, 0.3, 0.4, 0.5, 0.6}
    for name, (_, grid, default) in training.HYPER.items():
        assert default in grid, name


# ---------------------------------------------------------------------- CORAL / CORN (coral-pytorch)


def test_coral_and_corn_probabilities_and_predictions() -> None:
    dataset = pytest.importorskip("coral_pytorch.dataset")
    z = torch.tensor([[2.0, 0.5, -1.0], [-0.3, -2.0, -3.0], [3.0, 2.0, 0.1]], dtype=torch.float64)
    s = torch.sigmoid(z)
    for name, gt in (("coral", s), ("corn", torch.cumprod(s, 1))):
        p, pred = baselines.ordinal_probabilities(name, z)
        # by hand: p_0 = 1 - P(y > 0), p_k = P(y > k-1) - P(y > k), p_3 = P(y > 2)
        by_hand = torch.stack([1 - gt[:, 0], gt[:, 0] - gt[:, 1], gt[:, 1] - gt[:, 2], gt[:, 2]], 1)
        assert torch.allclose(p, by_hand.clamp_min(0) / by_hand.clamp_min(0).sum(1, keepdim=True))
        rule = dataset.proba_to_label(s) if name == "coral" else dataset.corn_label_from_logits(z)
        assert torch.equal(pred, rule)


@pytest.mark.slow
def test_coral_and_corn_losses_train() -> None:
    pytest.importorskip("coral_pytorch")
    torch.manual_seed(0)
    x = torch.randn(200, 3)
    y = torch.clamp((x[:, 0] * 1.5 + 2).round().long(), 0, 4)
    for name in baselines.ORDINAL:
        model = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.ReLU(), baselines.ordinal_head(name, 16, 5))
        fn = baselines.ordinal_loss(name, 5)
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        first = fn(model(x), y).item()
        for _ in range(40):
            opt.zero_grad()
            fn(model(x), y).backward()
            opt.step()
        _, pred = baselines.ordinal_probabilities(name, model(x))
        assert fn(model(x), y).item() < 0.7 * first and (pred - y).abs().float().mean() < 0.6, name


# ---------------------------------------------------------------------- docs/theory.md, the counter-example


def theory_tree() -> Tree:
    #         0
    #       /   \
    #      1     2            classes: a = node 3; b1, b2, b3 = nodes 4, 5, 6 (all at depth 2)
    #      |    /|\
    #      3   4 5 6
    return Tree.from_parents([-1, 0, 0, 1, 2, 2, 2], classes=[3, 4, 5, 6])


def _expected_loss(z: torch.Tensor, q: torch.Tensor, tree: Tree, rho: float) -> torch.Tensor:
    """E_{y ~ q} EMD_rho(softmax(z), y): the population loss of one input whose class posterior is q."""
    c = q.numel()
    rows = emd(z.expand(c, c), torch.arange(c), tree, rho=rho, reduction="none")
    return (q * rows).sum()


THEORY_Q = torch.tensor([0.35, 0.65 / 3, 0.65 / 3, 0.65 / 3], dtype=torch.float64)  # the mode is a (class 0)


def test_theory_exact_emd_is_linear_in_p_and_relaxed_is_stationary_at_q() -> None:
    tree, q = theory_tree(), THEORY_Q
    d = torch.tensor(tree.distance_matrix())
    assert (d @ q).tolist() == pytest.approx([2.6, 34 / 15, 34 / 15, 34 / 15])  # docs/theory.md's numbers
    # rho = 1: E_y EMD(p, y) = sum_c p_c E_y D[c, y], linear in p, for any p
    p = torch.softmax(torch.randn(1, 4, dtype=torch.float64), 1)
    assert _expected_loss(p.log(), q, tree, 1.0).item() == pytest.approx(float(p[0] @ d @ q), rel=1e-12)
    # rho = 2: the gradient vanishes at p = q (and only the mode of q is its top-1)
    z = q.log()[None].clone().requires_grad_(True)
    _expected_loss(z, q, tree, 2.0).backward()
    assert float(z.grad.abs().max()) < 1e-12
    # ... while rho = 1 at p = q pushes mass off the mode a: its logit's gradient is positive
    z = q.log()[None].clone().requires_grad_(True)
    _expected_loss(z, q, tree, 1.0).backward()
    assert float(z.grad[0, 0]) > 0.05


@pytest.mark.slow
def test_exact_emd_is_improper_for_top1_and_relaxed_is_proper() -> None:
    tree, q = theory_tree(), THEORY_Q
    results = {}
    for rho in (1.0, 2.0):
        z = torch.zeros(1, 4, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.Adam([z], lr=0.2)
        for _ in range(600):
            opt.zero_grad()
            _expected_loss(z, q, tree, rho).backward()
            opt.step()
        results[rho] = (torch.softmax(z.detach(), 1)[0], _expected_loss(z.detach(), q, tree, rho).item())
    p1, v1 = results[1.0]
    assert v1 == pytest.approx(34 / 15, abs=1e-3)  # the least expected distance, reached at a vertex of b's
    assert p1[0] < 0.01 and int(p1.argmax()) != 0  # exact EMD: top-1 is not the most probable class
    p2, _ = results[2.0]
    assert torch.allclose(p2, q, atol=1e-3) and int(p2.argmax()) == 0  # relaxed: p* = q, top-1 is the mode
