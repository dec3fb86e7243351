"""Every bad loss input raises a ValueError/TypeError naming the argument and the problem (docs/bad-input.md)."""

from __future__ import annotations

import pytest
import torch

from emdloss import EMDLoss, Tree
from emdloss.functional import emd

TREE = Tree.from_parents([-1, 0, 0, 1, 1])  # 3 leaf classes
C = TREE.num_classes


def logits(n: int = 4) -> torch.Tensor:
    return torch.randn(n, C, generator=torch.Generator().manual_seed(0))


def soft(n: int = 4) -> torch.Tensor:
    return torch.softmax(torch.randn(n, C, generator=torch.Generator().manual_seed(1)), 1)


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: (torch.tensor(1.0), torch.tensor(0)), ValueError, "shape \\(N, C\\)"),  # 0-d: (C,) is unbatched input
        (lambda: (torch.randn(4, C + 1), torch.zeros(4, dtype=torch.long)), ValueError, "classes along dim 1"),
        (lambda: (torch.zeros(4, C, dtype=torch.long), torch.zeros(4, dtype=torch.long)), TypeError, "integer dtype"),
        (lambda: (torch.zeros(4, C, dtype=torch.complex64), torch.zeros(4, dtype=torch.long)), TypeError, "complex"),
        (lambda: (logits().numpy(), torch.zeros(4, dtype=torch.long)), TypeError, "input must be a torch.Tensor"),
        (lambda: (logits(), [0, 1, 2, 0]), TypeError, "target must be a torch.Tensor"),
        (lambda: (logits(), torch.zeros(4, dtype=torch.bool)), TypeError, "target must be integer"),
        (lambda: (logits(), torch.zeros(5, dtype=torch.long)), ValueError, "class-index target must have shape"),
        (lambda: (logits(), torch.zeros(4, C + 1)), ValueError, "soft \\(floating\\) target must have"),
        (lambda: (logits(), torch.tensor([0, 1, 3, 0])), ValueError, "class index 3, outside \\[0, 3\\)"),
        (lambda: (logits(), torch.tensor([0, -1, 2, 0])), ValueError, "class index -1"),
        (lambda: (logits(), -soft()), ValueError, "target has negative entries"),
        (lambda: (logits(), soft() * 1.1), ValueError, "target rows must sum to 1"),
        (
            lambda: (logits(), soft().masked_fill(torch.eye(4, C, dtype=torch.bool), float("nan"))),
            ValueError,
            "target contains NaN",
        ),
        (
            lambda: (
                logits().masked_fill(torch.eye(4, C, dtype=torch.bool), float("nan")),
                torch.zeros(4, dtype=torch.long),
            ),
            ValueError,
            "NaN or infinite logits",
        ),
        (
            lambda: (
                logits().masked_fill(torch.eye(4, C, dtype=torch.bool), float("inf")),
                torch.zeros(4, dtype=torch.long),
            ),
            ValueError,
            "NaN or infinite logits",
        ),
        (
            lambda: (logits(), torch.zeros(4, dtype=torch.long, device="meta")),
            ValueError,
            "input is on cpu but target is on meta",
        ),
    ],
)
def test_bad_loss_inputs(make, error, message) -> None:
    x, y = make()
    with pytest.raises(error, match=message):
        emd(x, y, TREE)


@pytest.mark.parametrize(
    "probs, message",
    [
        (-soft(), "input \\(probabilities, from_logits=False\\) has negative entries"),
        (soft() * 0.5, "input \\(probabilities, from_logits=False\\) rows must sum to 1"),
        (soft().masked_fill(torch.eye(4, C, dtype=torch.bool), float("inf")), "NaN or infinite"),
    ],
)
def test_bad_probabilities(probs, message) -> None:
    with pytest.raises(ValueError, match=message):
        emd(probs, torch.zeros(4, dtype=torch.long), TREE, from_logits=False)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(rho=0.5), ValueError, "rho must be a finite number >= 1"),
        (dict(rho=float("nan")), ValueError, "rho must be"),
        (dict(rho=float("inf")), ValueError, "rho must be"),
        (dict(rho="two"), TypeError, "rho must be a real number"),
        (dict(reduction="avg"), ValueError, "reduction must be one of"),
        (dict(backend="cuda"), ValueError, "backend must be 'auto' or one of \\('numba', 'triton', 'torch'\\)"),
    ],
)
def test_bad_options(kwargs, error, message) -> None:
    with pytest.raises(error, match=message):
        emd(logits(), torch.zeros(4, dtype=torch.long), TREE, **kwargs)


def test_bad_tree_argument() -> None:
    with pytest.raises(TypeError, match=r"tree must be an emdloss\.Tree"):
        emd(logits(), torch.zeros(4, dtype=torch.long), {"parents": [-1]})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"tree must be an emdloss\.Tree"):
        EMDLoss([-1, 0, 0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rho"):
        EMDLoss(TREE, rho=0)


def test_empty_batch_matches_cross_entropy() -> None:
    x = torch.zeros(0, C, requires_grad=True)
    y = torch.zeros(0, dtype=torch.long)
    ce = torch.nn.functional.cross_entropy(x, y)
    ours = emd(x, y, TREE)
    assert torch.isnan(ce) and torch.isnan(ours)
    assert emd(x, y, TREE, reduction="sum").item() == 0.0
    assert emd(x, y, TREE, reduction="none").shape == (0,)
    emd(x, y, TREE, reduction="sum").backward()
    assert x.grad.shape == (0, C)


def test_all_ignored_matches_cross_entropy() -> None:
    """Like CrossEntropyLoss: mean over zero kept samples is NaN, sum is 0, and gradients are zero."""
    x = logits().requires_grad_()
    y = torch.full((4,), -100)
    ce = torch.nn.functional.cross_entropy(x, y)
    ours = emd(x, y, TREE)
    assert torch.isnan(ce) and torch.isnan(ours)
    total = emd(x, y, TREE, reduction="sum")
    assert total.item() == 0.0
    total.backward()
    assert torch.count_nonzero(x.grad) == 0


def test_custom_ignore_index_and_validation_flag() -> None:
    y = torch.tensor([0, 7, 2, 7])
    full = emd(logits(), y, TREE, ignore_index=7, reduction="none")
    assert full[1] == 0 and full[3] == 0 and full[0] > 0
    # validate=False skips value checks: an out-of-range index is then the caller's responsibility
    emd(logits(), torch.tensor([0, 1, 2, 0]), TREE, validate=False)


def test_fused_cpu_path_checks_class_indices_even_without_validation() -> None:
    """The fused CPU kernel reads every label anyway, so it never indexes out of range: validate=False or not."""
    for validate in (None, False):
        with pytest.raises(ValueError, match="class index 5, outside \\[0, 3\\)"):
            emd(logits(), torch.tensor([0, 5, 2, 0]), TREE, validate=validate, backend="numba")


def test_minus_infinity_logits_mask_classes_like_cross_entropy() -> None:
    """-inf logits mean probability 0 (a common masking idiom) and are accepted, as by cross_entropy;
    a row that is -inf everywhere has no distribution and raises."""
    x = logits()
    x[:, 2] = float("-inf")
    y = torch.tensor([0, 1, 0, 1])
    masked = emd(x, y, TREE, reduction="none")
    assert torch.isfinite(masked).all()
    p = torch.softmax(x, 1)
    assert (p[:, 2] == 0).all()
    torch.testing.assert_close(masked, emd(p, y, TREE, from_logits=False, reduction="none"))
    x[0] = float("-inf")
    with pytest.raises(ValueError, match="NaN or infinite logits"):
        emd(x, y, TREE)
