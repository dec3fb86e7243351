"""EMDLoss as a drop-in for nn.CrossEntropyLoss: class weights, label smoothing (uniform and tree-aware), unbatched
(C,) input, arguments checked at construction, the repr, and the doctests of the loss modules.

References are independent of the code under test: torch's own cross-entropy for the meaning of ``weight`` and
``label_smoothing``, POT's exact LP (``ot.emd2``) for the EMD against explicitly smoothed targets, a path walk for
tree distances, and finite differences (``gradcheck``) for gradients."""

from __future__ import annotations

import doctest
import math

import numpy as np
import ot
import pytest
import torch
import torch.nn.functional as F
from _helpers import random_simplex, random_tree, t64

import emdloss
from emdloss import EMDLoss, Tree
from emdloss.functional import emd, smoothing_distribution

BACKENDS = ("numba", "torch")
EDGES = [("root", "animal"), ("animal", "dog"), ("animal", "cat"), ("root", "car"), ("car", "bus"), ("car", "van")]
CLASSES = ["dog", "cat", "bus", "van", "car"]  # "car" is an internal class (a coarse label)


def _tree() -> Tree:
    return Tree.from_edges(EDGES, CLASSES, weights=[1.0, 0.5, 2.0, 1.5, 0.25, 3.0])


def _path_distances(tree: Tree) -> np.ndarray:
    """(C, C) tree distances by walking both classes up to their meeting node (independent of Tree's own)."""

    def up(v: int) -> dict[int, float]:
        dist, d = {}, 0.0
        while v != -1:
            dist[v] = d
            d += float(tree.weights[v])
            v = int(tree.parents[v])
        return dist

    ups = [up(int(c)) for c in tree.classes]
    return np.array([[min(a[v] + b[v] for v in a if v in b) for b in ups] for a in ups])


def _batch(seed: int, n: int = 12, c: int = 5, spatial: bool = False):
    g = torch.Generator().manual_seed(seed)
    shape = (n, c, 3) if spatial else (n, c)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (n, 3) if spatial else (n,), generator=g)
    y.view(-1)[::4] = -100  # some ignored samples
    return x, y


# ---------------------------------------------------------------------- class weights


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spatial", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_class_weights_have_cross_entropys_meaning_for_class_indices(backend, spatial, label_smoothing) -> None:
    """Per sample, the weighted loss over the unweighted one is torch's own ratio (w[y], 0 for ignored samples);
    "mean" divides the weighted sum by the divisor torch uses (sum of w[y] over the kept samples), also with
    label smoothing on."""
    tree = _tree()
    x, y = _batch(1, spatial=spatial)
    w = torch.tensor([0.5, 2.0, 1.0, 3.0, 0.0], dtype=torch.float64)
    kw = dict(backend=backend, label_smoothing=label_smoothing)
    plain = emd(x, y, tree, reduction="none", **kw)
    weighted = emd(x, y, tree, reduction="none", weight=w, **kw)
    kept = y != -100
    ce_ratio = F.cross_entropy(x, y, weight=w, reduction="none") / F.cross_entropy(x, y, reduction="none")
    torch.testing.assert_close(weighted[kept], (plain * ce_ratio)[kept], rtol=1e-12, atol=0)
    assert (weighted[~kept] == 0).all() and (plain[~kept] == 0).all()

    ce = {r: F.cross_entropy(x, y, weight=w, reduction=r, label_smoothing=label_smoothing) for r in ("sum", "mean")}
    divisor = ce["sum"] / ce["mean"]
    total = emd(x, y, tree, reduction="sum", weight=w, **kw)
    torch.testing.assert_close(total, weighted.sum(), rtol=1e-12, atol=0)
    torch.testing.assert_close(emd(x, y, tree, weight=w, **kw), total / divisor, rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_class_weights_with_soft_targets_weigh_by_the_expected_class_weight_and_mean_over_samples(backend) -> None:
    """Soft q: r = sum_c w_c q_c (torch's CE weighs each class term by w_c; for the EMD, not linear in q, the row
    gets the target's expected class weight) and "mean" divides by the number of samples, as torch does."""
    tree = _tree()
    rng = np.random.default_rng(2)
    x = torch.randn(6, 5, 2, dtype=torch.float64)
    q = t64(random_simplex(rng, 12, 5)).reshape(6, 2, 5).movedim(-1, 1)
    w = torch.tensor([0.5, 2.0, 1.0, 3.0, 0.25], dtype=torch.float64)
    plain = emd(x, q, tree, reduction="none", backend=backend)
    r = torch.einsum("nck,c->nk", q, w)
    torch.testing.assert_close(emd(x, q, tree, reduction="none", weight=w, backend=backend), plain * r)
    ce_divisor = F.cross_entropy(x, q, weight=w, reduction="sum") / F.cross_entropy(x, q, weight=w)
    assert ce_divisor.item() == pytest.approx(12.0)
    torch.testing.assert_close(emd(x, q, tree, weight=w, backend=backend), (plain * r).sum() / ce_divisor)
    # a one-hot soft target weighs its row as its class index does (the divisors differ, as in torch)
    onehot = F.one_hot(torch.tensor([1, 3]), 5).double()
    x2 = x[:2, :, 0]
    torch.testing.assert_close(
        emd(x2, onehot, tree, weight=w, reduction="sum", backend=backend),
        emd(x2, torch.tensor([1, 3]), tree, weight=w, reduction="sum", backend=backend),
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("rho", [1.0, 2.0])
def test_weighted_gradients_match_the_unweighted_loss_times_the_weights(backend, reduction, rho) -> None:
    """The fused backend pre-scales its gradient for an unweighted mean; weights reach it as a non-uniform
    incoming gradient, which it must rescale. Reference: autograd of sum_m (w[y_m] / W) * loss_m from the
    unweighted per-sample losses of the torch backend."""
    tree = _tree()
    x, y = _batch(3)
    w = torch.tensor([0.5, 2.0, 1.0, 3.0, 0.0], dtype=torch.float64)
    xa = x.clone().requires_grad_()
    out = emd(xa, y, tree, rho=rho, weight=w, reduction=reduction, backend=backend)
    out.backward(torch.linspace(0.5, 2.0, out.numel(), dtype=x.dtype).reshape(out.shape))
    xb = x.clone().requires_grad_()
    kept = y != -100
    r = torch.where(kept, w[y.clamp(min=0)], 0.0)
    ref = emd(xb, y, tree, rho=rho, reduction="none", backend="torch") * r
    ref = {"mean": ref.sum() / r.sum(), "sum": ref.sum(), "none": ref}[reduction]
    torch.testing.assert_close(out, ref.detach(), rtol=1e-12, atol=1e-15)
    ref.backward(torch.linspace(0.5, 2.0, ref.numel(), dtype=x.dtype).reshape(ref.shape))
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("smoothing", ["uniform", "tree"])
def test_weighted_and_smoothed_gradients_pass_finite_differences(backend, smoothing) -> None:
    tree = _tree()
    x, y = _batch(4, n=5)
    w = torch.tensor([0.5, 2.0, 1.0, 3.0, 0.25], dtype=torch.float64)
    for reduction in ("mean", "none"):

        def loss(z: torch.Tensor, reduction: str = reduction) -> torch.Tensor:
            return emd(z, y, tree, rho=1.5, weight=w, label_smoothing=0.3, smoothing=smoothing,
                       reduction=reduction, backend=backend)  # fmt: skip

        assert torch.autograd.gradcheck(loss, (x.clone().requires_grad_(),), eps=1e-6, atol=1e-7)


def test_weights_of_zero_give_a_nan_mean_with_zero_gradient_as_nothing_counts() -> None:
    x = torch.randn(3, 5, requires_grad=True)
    loss = emd(x, torch.tensor([0, 1, 1]), _tree(), weight=torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0]))
    assert math.isnan(loss.item())
    loss.backward()
    assert (x.grad == 0).all()


def test_weight_buffer_follows_the_module_and_the_state_dict() -> None:
    w = torch.tensor([0.5, 2.0, 1.0, 3.0, 0.25])
    loss = EMDLoss(_tree(), weight=w)
    assert torch.equal(loss.state_dict()["weight"], w)
    assert loss.double().weight.dtype == torch.float64
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 4])
    torch.testing.assert_close(loss(x, y), emd(x, y, _tree(), weight=w.double()))
    other = EMDLoss(_tree(), weight=torch.ones(5))
    other.load_state_dict(loss.state_dict())
    assert torch.equal(other.weight, w.double())


# ---------------------------------------------------------------------- label smoothing


def _smoothed(y: torch.Tensor, eps: float, s: torch.Tensor) -> torch.Tensor:
    """(1 - eps) onehot(y) + eps s[y], written out."""
    return (1 - eps) * F.one_hot(y, s.shape[0]).to(s.dtype) + eps * s[y]


def test_uniform_smoothing_builds_the_target_cross_entropy_smooths_to() -> None:
    """Our explicit target is torch's: cross-entropy with label_smoothing equals CE against it."""
    x, y = torch.randn(7, 5, dtype=torch.float64), torch.randint(0, 5, (7,))
    q = _smoothed(y, 0.15, torch.full((5, 5), 0.2, dtype=torch.float64))
    torch.testing.assert_close(F.cross_entropy(x, y, label_smoothing=0.15), F.cross_entropy(x, q))
    torch.testing.assert_close(smoothing_distribution(_tree(), "uniform"), torch.full((5, 5), 0.2, dtype=torch.float64))


def test_tree_smoothing_distribution_decays_with_tree_distance() -> None:
    tree = _tree()
    d = _path_distances(tree)
    assert d[0, 1] == 2.5  # dog - animal - cat
    tau = d[d > 0].min()  # the default scale: the nearest two distinct classes (bus and car, 0.25 apart)
    assert tau == 0.25
    for scale in (None, 1.7):
        k = np.exp(-d / (scale or tau))
        expected = k / k.sum(1, keepdims=True)
        np.testing.assert_allclose(smoothing_distribution(tree, "tree", scale).numpy(), expected, rtol=1e-14)
    chain = smoothing_distribution(Tree.chain(7)).numpy()  # a discrete Laplace profile around the label
    np.testing.assert_allclose(chain[3, [2, 4, 1, 5]] / chain[3, 3], np.exp([-1, -1, -2, -2]), rtol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("smoothing", ["uniform", "tree"])
@pytest.mark.parametrize("rho", [1.0, 2.0])
def test_smoothed_loss_equals_the_loss_of_the_explicit_smoothed_target(backend, smoothing, rho) -> None:
    """Hard labels with ignore_index, spatial input: value and gradient equal those of the explicit soft target
    (rows of ignored samples excluded), and for rho = 1 the value is POT's exact EMD against that target."""
    tree = _tree()
    x, y = _batch(5, spatial=True)
    eps = 0.25
    s = smoothing_distribution(tree, smoothing, 0.8 if smoothing == "tree" else None)
    kept = y != -100
    q = _smoothed(y.clamp(min=0), eps, s).movedim(-1, 1)  # (N, C, d)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    kw = dict(rho=rho, backend=backend)
    got = emd(xa, y, tree, label_smoothing=eps, smoothing=smoothing, smoothing_scale=0.8 if smoothing == "tree" else None,
              reduction="none", **kw)  # fmt: skip
    ref = emd(xb, q, tree, reduction="none", **kw) * kept
    torch.testing.assert_close(got, ref.detach(), rtol=1e-12, atol=1e-14)
    got[kept].sum().backward()
    ref[kept].sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-10, atol=1e-14)
    assert (got[~kept] == 0).all()
    if rho == 1.0:
        p = torch.softmax(x, 1).movedim(1, -1)[kept].numpy()
        qq = q.movedim(1, -1)[kept].numpy()
        d = _path_distances(tree)
        lp = [ot.emd2(p[i], qq[i], d) for i in range(p.shape[0])]
        np.testing.assert_allclose(got[kept].detach().numpy(), lp, rtol=1e-9, atol=1e-12)
    mean = emd(x, y, tree, label_smoothing=eps, smoothing=smoothing, smoothing_scale=0.8 if smoothing == "tree" else None,
               **kw)  # fmt: skip
    torch.testing.assert_close(mean, ref[kept].mean().detach())


@pytest.mark.parametrize("smoothing", ["uniform", "tree"])
def test_smoothing_soft_targets_mixes_the_smoothing_of_each_class(smoothing) -> None:
    tree = _tree()
    rng = np.random.default_rng(6)
    x, q = torch.randn(8, 5, dtype=torch.float64), t64(random_simplex(rng, 8, 5, sparsity=0.5))
    s = smoothing_distribution(tree, smoothing)
    expected = emd(x, 0.9 * q + 0.1 * (q @ s), tree, reduction="none")
    torch.testing.assert_close(emd(x, q, tree, label_smoothing=0.1, smoothing=smoothing, reduction="none"), expected)


def test_tree_smoothing_on_a_random_tree_matches_the_lp() -> None:
    rng = np.random.default_rng(7)
    tree = random_tree(rng, 40, internal_classes=True)
    c = tree.num_classes
    x, y = torch.randn(6, c, dtype=torch.float64), torch.as_tensor(rng.integers(0, c, 6))
    got = emd(x, y, tree, label_smoothing=0.3, smoothing="tree", reduction="none").numpy()
    d = _path_distances(tree)
    positive = d[d > 0].min()
    k = np.exp(-d / positive)
    k /= k.sum(1, keepdims=True)
    q = 0.7 * np.eye(c)[y.numpy()] + 0.3 * k[y.numpy()]
    p = torch.softmax(x, 1).numpy()
    np.testing.assert_allclose(got, [ot.emd2(p[i], q[i], d) for i in range(6)], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kwargs", [dict(label_smoothing=0.1), dict(weight=torch.ones(5))])
def test_classes_out_of_range_with_validate_off_are_named_when_indexing_by_class(kwargs) -> None:
    with pytest.raises(ValueError, match=r"target contains class index 7, outside \[0, 5\)"):
        emd(torch.randn(2, 5), torch.tensor([1, 7]), _tree(), validate=False, **kwargs)


# ---------------------------------------------------------------------- unbatched input


@pytest.mark.parametrize("backend", BACKENDS)
def test_unbatched_input_equals_a_batch_of_one(backend) -> None:
    tree = _tree()
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    w = torch.tensor([0.5, 2.0, 1.0, 3.0, 0.25], dtype=torch.float64)
    for target in (torch.tensor(3), torch.softmax(torch.randn(5, dtype=torch.float64), 0)):
        for reduction in ("none", "mean", "sum"):
            kw = dict(reduction=reduction, weight=w, label_smoothing=0.1, backend=backend)
            got = EMDLoss(tree, **kw)(x, target)
            assert got.shape == ()
            ref = EMDLoss(tree, **kw)(x[None], target[None])
            torch.testing.assert_close(got, ref.reshape(()))
            (g,) = torch.autograd.grad(got, x)
            (gr,) = torch.autograd.grad(ref.sum(), x)
            torch.testing.assert_close(g, gr)
    torch.testing.assert_close(
        F.cross_entropy(x, torch.tensor(3), reduction="none").shape, torch.Size([])
    )  # torch's convention


@pytest.mark.parametrize(
    "input, target, message",
    [
        (torch.randn(5), torch.tensor([3]), r"unbatched input of shape \(5,\): a class-index target must be 0-d"),
        (torch.randn(5), torch.rand(4), r"unbatched input of shape \(5,\): a soft \(floating\) target must have"),
        (
            torch.tensor(1.0),
            torch.tensor(0),
            r"input must have shape \(N, C\), \(N, C, d1, \.\.\., dk\) or, unbatched, \(C,\) with C = 5, got shape \(\)",
        ),
        (torch.randn(4), torch.tensor(0), r"input has 4 classes along dim 1"),
    ],
)
def test_bad_unbatched_shapes_are_named(input, target, message) -> None:
    with pytest.raises(ValueError, match=message):
        emd(input, target, _tree())


# ---------------------------------------------------------------------- construction checks and repr


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(rho=0.5), ValueError, "rho must be a finite number >= 1"),
        (dict(rho="x"), TypeError, "rho must be a real number"),
        (dict(reduction="avg"), ValueError, "reduction must be one of"),
        (dict(ignore_index=1.5), TypeError, "ignore_index must be an integer class index, got 1.5"),
        (dict(ignore_index=True), TypeError, "ignore_index must be an integer"),
        (dict(ignore_index=2**64), ValueError, "ignore_index must fit in int64"),
        (dict(weight=torch.ones(4)), ValueError, r"weight must have shape \(5,\), one entry per class, got \(4,\)"),
        (dict(weight=torch.ones(5, 1)), ValueError, r"weight must have shape \(5,\)"),
        (dict(weight=torch.ones(5, dtype=torch.long)), TypeError, "weight must be a floating tensor, got dtype"),
        (dict(weight=torch.tensor([1.0, -1.0, 1, 1, 1])), ValueError, r"weight must be >= 0, got a negative entry"),
        (dict(weight=torch.tensor([1.0, math.nan, 1, 1, 1])), ValueError, "weight contains NaN or infinite"),
        (dict(weight=torch.tensor([1.0, math.inf, 1, 1, 1])), ValueError, "weight contains NaN or infinite"),
        (dict(weight="heavy"), TypeError, "weight must be a \\(C,\\) floating tensor"),
        (dict(label_smoothing=1.0), ValueError, r"label_smoothing must be in \[0, 1\)"),
        (dict(label_smoothing=-0.1), ValueError, r"label_smoothing must be in \[0, 1\)"),
        (dict(label_smoothing=math.nan), ValueError, r"label_smoothing must be in \[0, 1\)"),
        (dict(label_smoothing="0.1"), TypeError, "label_smoothing must be a number"),
        (dict(smoothing="gaussian"), ValueError, r"smoothing must be one of \('uniform', 'tree'\)"),
        (dict(smoothing="tree", smoothing_scale=0.0), ValueError, "smoothing_scale must be a finite number > 0"),
        (dict(smoothing_scale="wide"), TypeError, "smoothing_scale must be a positive number or None"),
        (dict(validate="yes"), TypeError, "validate must be True, False or None"),
        (dict(backend="cuda"), ValueError, r"backend must be 'auto' or one of \(.*'numba'.*, got 'cuda'"),
        (dict(backend=None), TypeError, "backend must be a string"),
        (dict(from_logits="no"), TypeError, "from_logits must be True or False"),
    ],
)
def test_bad_arguments_are_refused_at_construction_naming_the_argument(kwargs, error, message) -> None:
    with pytest.raises(error, match=message):
        EMDLoss(_tree(), **kwargs)
    with pytest.raises(error, match=message):  # the functional form checks the same, with the same message
        emd(torch.randn(2, 5), torch.tensor([0, 1]), _tree(), **kwargs)


def test_weight_may_be_a_list_and_ignore_index_a_numpy_integer() -> None:
    loss = EMDLoss(_tree(), weight=[1, 2, 3, 4, 5], ignore_index=np.int64(-1))
    assert loss.weight.dtype == torch.get_default_dtype() and loss.ignore_index == -1
    assert type(loss.ignore_index) is int


def test_repr_shows_every_setting() -> None:
    plain = repr(EMDLoss(Tree.chain(4)))
    assert plain == (
        "EMDLoss(Tree(chain, num_nodes=4, num_classes=4), rho=1.0, reduction='mean', ignore_index=-100, "
        "weight=None, label_smoothing=0.0, from_logits=True, validate=None, backend='auto')"
    )
    full = EMDLoss(_tree(), rho=2, reduction="sum", ignore_index=-1, validate=False, backend="torch",
                   weight=torch.ones(5, dtype=torch.float64), label_smoothing=0.1, smoothing="tree",
                   smoothing_scale=0.5)  # fmt: skip
    assert repr(full) == (
        "EMDLoss(Tree(tree, num_nodes=7, num_classes=5), rho=2.0, reduction='sum', ignore_index=-1, "
        "weight=(5,) float64, label_smoothing=0.1, smoothing='tree', smoothing_scale=0.5, from_logits=True, "
        "validate=False, backend='torch')"
    )


@pytest.mark.parametrize("module", [emdloss, emdloss.losses, emdloss.functional])
def test_docstring_examples_run(module) -> None:
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 or module is emdloss.functional
    assert result.failed == 0


def test_class_docstring_has_torch_style_sections() -> None:
    doc = EMDLoss.__doc__
    for section in ("Args:", "Shape:", "Examples::"):
        assert section in doc
    for argument in ("weight:", "label_smoothing:", "smoothing:", "smoothing_scale:", "ignore_index:", "backend:"):
        assert argument in doc


# ---------------------------------------------------------------------- tracing


def test_weights_and_smoothing_work_under_torch_func() -> None:
    """grad and vmap(grad) (per-sample gradients) trace the weighting and smoothing: no value is read there."""
    crit = EMDLoss(_tree(), weight=torch.tensor([0.5, 2.0, 1.0, 3.0, 0.25]), label_smoothing=0.2, smoothing="tree")
    x, y = torch.randn(6, 5), torch.tensor([0, 4, 2, -100, 1, 3])
    xa = x.clone().requires_grad_()
    crit(xa, y).backward()
    torch.testing.assert_close(torch.func.grad(lambda z: crit(z, y))(x), xa.grad)
    kept = y != -100
    per_sample = torch.func.vmap(torch.func.grad(lambda z, t: crit(z[None], t[None])))(x[kept], y[kept])
    for i, (xi, yi) in enumerate(zip(x[kept], y[kept])):
        torch.testing.assert_close(per_sample[i], torch.func.grad(lambda z, t=yi: crit(z, t))(xi))


@pytest.mark.slow
@pytest.mark.parametrize("smoothing", ["uniform", "tree"])
def test_weights_and_smoothing_compile_to_one_graph(smoothing) -> None:
    """A fresh tree, compiled first: EMDLoss builds the tree-smoothing table at construction (dynamo cannot
    trace its numpy construction), and with validate=False the loss is one graph. 3 s each here."""
    tree = Tree.chain(6, spacing=[1.0, 0.5, 2.0, 1.0, 1.0])
    crit = EMDLoss(tree, validate=False, weight=torch.rand(6), label_smoothing=0.2, smoothing=smoothing)
    x, y = torch.randn(5, 6), torch.tensor([0, 5, -100, 2, 3])
    compiled = torch.compile(lambda z: crit(z, y), backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(compiled, crit(x, y))
