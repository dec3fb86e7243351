"""The common call's short path (emdloss.backends.fast_path): taken when it should be, the general path's numbers
bit for bit when it is, and the general path's errors and results whenever the call is anything else."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _helpers import random_tree

from emdloss import EMDLoss, Tree, backends
from emdloss.backends import fast_path
from emdloss.functional import emd


@pytest.fixture
def spy(monkeypatch):
    """Counts the calls that the short path answered."""
    answered = []
    original = fast_path.try_loss

    def counting(*args, **kwargs):
        out = original(*args, **kwargs)
        answered.append(out is not None)
        return out

    monkeypatch.setattr(fast_path, "try_loss", counting)
    return answered


def _general(monkeypatch, *args, **kwargs):
    with monkeypatch.context() as m:
        m.setattr(backends, "fast_loss", lambda *a, **k: None)
        return _loss_and_grad(*args, **kwargs)


def _loss_and_grad(x, y, tree, **options):
    xx = x.clone().requires_grad_()
    loss = emd(xx, y, tree, **options)
    loss.backward()
    return loss.detach(), xx.grad


TREES = {
    "chain10": lambda: Tree.chain(10),  # one-row kernel
    "chain40": lambda: Tree.chain(40),  # lane kernel; distance-matrix kernel for rho = 1
    "tree": lambda: random_tree(np.random.default_rng(0), 30, internal_classes=True),
}
#: (tree, rho, reduction, dtype): each kernel the short path can reach, both reductions and dtypes, few enough
#: new compiled variants for the default suite (each costs seconds in a cold cache)
CASES = [
    ("chain10", 2.0, "mean", torch.float32),
    ("chain40", 1.0, "sum", torch.float32),
    ("chain40", 2.0, "sum", torch.float32),
    ("tree", 2.0, "mean", torch.float64),
]


@pytest.mark.parametrize(("tree_name", "rho", "reduction", "dtype"), CASES)
def test_the_short_path_gives_the_general_paths_numbers_bit_for_bit(monkeypatch, spy, tree_name, rho, reduction, dtype):
    tree = TREES[tree_name]()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(37, tree.num_classes, generator=gen, dtype=dtype) * 3
    y = torch.randint(0, tree.num_classes, (37,), generator=gen)
    y[[3, 10]] = -100  # ignored rows change the mean's divisor
    fast = _loss_and_grad(x, y, tree, rho=rho, reduction=reduction)
    assert spy == [True]
    general = _general(monkeypatch, x, y, tree, rho=rho, reduction=reduction)
    assert fast[0].dtype == general[0].dtype == dtype
    assert torch.equal(fast[0], general[0]) and torch.equal(fast[1], general[1])


@pytest.mark.parametrize("rows", [1024, 1025])  # math.fsum over a list, then numpy's pairwise sum (sum_rows)
def test_both_ways_of_summing_the_rows_agree_between_the_paths(monkeypatch, spy, rows):
    from emdloss.backends import fused_cpu

    tree = Tree.chain(5)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(rows, 5, generator=gen) * 3
    y = torch.randint(0, 5, (rows,), generator=gen)
    fast = _loss_and_grad(x, y, tree, rho=2.0, reduction="sum")
    general = _general(monkeypatch, x, y, tree, rho=2.0, reduction="sum")
    assert spy == [True] and torch.equal(fast[0], general[0]) and torch.equal(fast[1], general[1])
    per_row = emd(x, y, tree, rho=2.0, reduction="none").numpy()
    small = rows <= fused_cpu.EXACT_SUM_MAX_ROWS
    assert fused_cpu.sum_rows(per_row) == (math.fsum(per_row.tolist()) if small else per_row.sum(dtype=np.float64))


def test_the_module_and_a_non_default_gradient_take_the_short_path(monkeypatch, spy):
    tree = Tree.chain(7)
    x = torch.randn(16, 7, requires_grad=True)
    y = torch.randint(0, 7, (16,))
    (EMDLoss(tree, rho=2.0)(x, y) * 3.0).backward()
    fast_grad = x.grad.clone()
    assert spy == [True]
    x.grad = None
    with monkeypatch.context() as m:
        m.setattr(backends, "fast_loss", lambda *a, **k: None)
        (EMDLoss(tree, rho=2.0)(x, y) * 3.0).backward()
    assert torch.equal(fast_grad, x.grad)


def test_the_module_checks_its_settings_again_after_any_change(spy):
    """EMDLoss skips emd()'s option checks while its settings are those it checked: a setting changed later is
    checked (its error) and used (a weight or a reduction leaves the short path) on the next call."""
    tree = Tree.chain(5)
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(6, 5, generator=gen), torch.randint(0, 5, (6,), generator=gen)
    criterion = EMDLoss(tree, rho=2.0)
    assert torch.equal(criterion(x, y), emd(x, y, tree, rho=2.0)) and spy == [True, True]
    criterion.rho = -1.0
    with pytest.raises(ValueError, match="rho"):
        criterion(x, y)
    criterion.rho = 1.0
    assert torch.equal(criterion(x, y), emd(x, y, tree, rho=1.0))
    criterion.weight = torch.rand(5, generator=gen)
    assert torch.equal(criterion(x, y), emd(x, y, tree, weight=criterion.weight))
    criterion.weight, criterion.reduction = None, "none"
    assert criterion(x, y).shape == (6,)
    criterion.tree = "chain"
    with pytest.raises(TypeError, match=r"tree must be an emdloss\.Tree"):
        criterion(x, y)
    spy.clear()
    criterion.tree, criterion.reduction = tree, "sum"
    assert torch.equal(criterion(x, y), emd(x, y, tree, reduction="sum")) and spy == [True, True]


def test_without_gradients_the_short_path_returns_a_plain_tensor(spy):
    tree = Tree.chain(6)
    x = torch.randn(8, 6, requires_grad=True)
    with torch.no_grad():
        loss = emd(x, torch.randint(0, 6, (8,)), tree)
    assert spy == [True] and loss.grad_fn is None and loss.shape == ()


@pytest.mark.parametrize(
    "case",
    [
        "probabilities",
        "none",
        "int32 target",
        "soft target",
        "spatial",
        "unbatched",
        "float16",
        "weight",
        "smoothing",
        "torch backend",
        "all ignored",
        "empty",
        "non-contiguous",
    ],
)
def test_other_calls_take_the_general_path_with_its_results(monkeypatch, spy, case):
    tree = Tree.chain(5)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, 5, generator=gen)
    y = torch.randint(0, 5, (6,), generator=gen)
    options: dict = {}
    if case == "probabilities":
        x, options["from_logits"] = torch.softmax(x, 1), False
    elif case == "none":
        options["reduction"] = "none"
    elif case == "int32 target":
        y = y.int()
    elif case == "soft target":
        y = torch.softmax(torch.randn(6, 5, generator=gen), 1)
    elif case == "spatial":
        x, y = torch.randn(2, 5, 3, generator=gen), torch.randint(0, 5, (2, 3), generator=gen)
    elif case == "unbatched":
        x, y = x[0], y[0]
    elif case == "float16":
        x = x.half()
    elif case == "weight":
        options["weight"] = torch.rand(5, generator=gen)
    elif case == "smoothing":
        options["label_smoothing"] = 0.1
    elif case == "torch backend":
        options["backend"] = "torch"
    elif case == "all ignored":
        y = torch.full((6,), -100)
    elif case == "empty":
        x, y = x[:0], y[:0]
    elif case == "non-contiguous":
        x = torch.randn(5, 6, generator=gen).t()  # the short path copies it; same numbers
    loss = emd(x.clone().requires_grad_(), y, tree, **options)
    if case == "non-contiguous":
        assert spy == [True]
    else:
        assert not any(spy)
    with monkeypatch.context() as m:
        m.setattr(backends, "fast_loss", lambda *a, **k: None)
        expected = emd(x.clone().requires_grad_(), y, tree, **options)
    assert torch.equal(loss, expected) or (loss.isnan().all() and expected.isnan().all())


def test_the_environment_variable_still_chooses_the_backend(monkeypatch, spy):
    monkeypatch.setenv("EMDLOSS_BACKEND", "torch")
    emd(torch.randn(4, 5), torch.randint(0, 5, (4,)), Tree.chain(5))
    assert not any(spy)


def test_bad_values_get_the_general_paths_errors():
    tree = Tree.chain(5)
    with pytest.raises(ValueError, match="class index 7"):
        emd(torch.randn(3, 5), torch.tensor([0, 7, 1]), tree)
    with pytest.raises(ValueError, match="4 classes along dim 1"):
        emd(torch.randn(3, 4), torch.tensor([0, 1, 1]), tree)
    logits = torch.randn(3, 5)
    logits[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        emd(logits, torch.tensor([0, 1, 1]), tree)


def test_second_derivatives_through_the_short_path_name_the_torch_backend(spy):
    x = torch.randn(4, 5, requires_grad=True)
    loss = emd(x, torch.randint(0, 5, (4,)), Tree.chain(5), rho=2.0)
    assert spy == [True]
    with pytest.raises(RuntimeError, match="backend='torch'"):
        torch.autograd.grad(loss, x, create_graph=True)
