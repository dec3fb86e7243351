r"""Entropic optimal transport (Sinkhorn) between predicted and target class distributions: a batched
baseline for *any* ground metric, to compare the exact tree/chain EMD of :func:`emdloss.functional.emd`
against.

For each row (sample) with prediction ``a = softmax(input)`` (or ``input``) and target ``b`` (one-hot or
soft), both (C,), and a cost matrix ``M`` (C, C), Sinkhorn solves

    T* = argmin_{T >= 0, T 1 = a, T^T 1 = b}  <T, M> + reg * KL(T | a b^T)

and the loss is the transport cost of that regularised plan, ``<T*, M>`` (as ``ot.sinkhorn2``). The KL
term to ``a b^T`` and POT's entropy term ``-H(T)`` differ by a constant on the feasible set, so the plan and
the value are POT's; only the dual potentials differ (ours by ``-reg * log a`` and ``-reg * log b``),
which keeps them finite where a class has no mass.

``reg`` is **absolute**, in the units of ``M`` (as in POT): ``reg = 0.01 * M.max()`` is a relative choice.
As ``reg -> 0`` the value tends to the exact EMD ``min <T, M>`` and the number of iterations grows like
``1 / reg``.

Iterations (``f, g`` are dual potentials, (N, C) each; all rows of the batch at once)::

    f_i = -reg * log sum_j b_j exp((g_j - M_ij) / reg)
    g_j = -reg * log sum_i a_i exp((f_i - M_ij) / reg)
    T_ij = a_i b_j exp((f_i + g_j - M_ij) / reg)

``log_domain=True`` evaluates the sums as log-sum-exp over an (N, C, C) tensor (stable for any ``reg``);
``log_domain=False`` is the classic scaling form ``u = a / (K v)``, ``v = b / (K^T u)`` with
``K = exp(-M / reg)``, two (N, C) x (C, C) products per iteration, which underflows once ``max(M) / reg``
exceeds about 87 (float32) or 708 (float64): it then raises :class:`SinkhornUnderflowError` naming the
smallest safe ``reg`` before iterating (entries of ``K`` that round to 0 would give plans of zeros, not NaN),
and again if a scaling stops being finite (``on_underflow="ignore"`` returns the raw result).

Convergence: with ``tol > 0``, a call whose budget ``max_iter`` ends before every row's plan meets the
prediction's marginal within ``tol`` warns once with :class:`SinkhornConvergenceWarning` (an unconverged plan
is not the regularised optimum, and its ``<T, M>`` can fall below the exact EMD). ``tol=0`` asks for exactly
``max_iter`` iterations and never warns.

Gradients: ``grad="envelope"`` returns the centred potentials, ``f - mean(f)`` w.r.t. ``a`` (and
``g - mean(g)`` w.r.t. a soft ``b``), which is the exact gradient of the regularised objective
``OT_reg(a, b)`` at convergence (envelope theorem), computed without storing the iterations.
``grad="autodiff"`` differentiates ``<T, M>`` through every iteration (memory O(iterations * N * C^2) in
the log domain). With hard (class-index) targets the plan is ``a e_y^T`` after one iteration and both modes
give the exact gradient ``M[:, y]``; with soft targets they differ by O(reg).
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from dataclasses import dataclass
from types import FrameType
from typing import Any, Literal, overload

import numpy as np
import torch
from torch import Tensor

from . import _inputs
from ._reduction import reduce_rows

__all__ = [
    "SinkhornConvergenceWarning",
    "SinkhornInfo",
    "SinkhornUnderflowError",
    "check_cost",
    "sinkhorn",
    "underflow_reg",
]

GRADS = ("envelope", "autodiff")
ON_UNDERFLOW = ("raise", "ignore")


class SinkhornUnderflowError(FloatingPointError, ValueError):
    """The plain (non-log) Sinkhorn kernel or scalings under/overflowed for this ``reg`` and dtype."""


class SinkhornConvergenceWarning(UserWarning):
    """Some rows' plans did not meet the prediction's marginal within ``tol`` in ``max_iter`` iterations.

    Silence it with ``warnings.filterwarnings("ignore", category=SinkhornConvergenceWarning)``, or pass
    ``tol=0`` to run a fixed number of iterations without the check."""


@dataclass
class SinkhornInfo:
    """What :func:`sinkhorn` computed besides the loss (``return_info=True``).

    Attributes:
        plan: (M, C, C) regularised plans, M = N * d1 * ... * dk rows; ``plan[m, i, j]`` is the mass
            moved from predicted class i to target class j. Columns sum to the target exactly, rows to the
            prediction within ``marginal_error``.
        f, g: (M, C) centred dual potentials (the envelope gradients w.r.t. prediction and target).
        n_iter: iterations run (one iteration = one update of f and of g).
        converged: (M,) bool, row marginal error <= tol.
        marginal_error: (M,) L1 distance between the plan's row sums and the prediction.
    """

    plan: Tensor
    f: Tensor
    g: Tensor
    n_iter: int
    converged: Tensor
    marginal_error: Tensor


def underflow_reg(cost_max: float, dtype: torch.dtype) -> float:
    """The smallest ``reg`` for which ``exp(-cost_max / reg)`` is a normal number in ``dtype``:
    ``cost_max / -log(finfo(dtype).tiny)``, i.e. ``cost_max / 87.3`` in float32 and ``cost_max / 708.4`` in
    float64. Plain Sinkhorn needs at least this (the scalings u, v can underflow even above it)."""
    return float(cost_max) / -math.log(torch.finfo(dtype).tiny)


def check_cost(cost: Any, num_classes: int | None = None, values: bool = True) -> Tensor:
    """Validate a ground-cost matrix and return it as a float64 tensor (on the CPU unless it is a tensor
    elsewhere already).

    ``cost`` must be a (C, C) numpy array or tensor of finite, non-negative reals (the diagonal need not be
    zero); if ``num_classes`` is given, C must equal it. ``values=False`` skips the checks that read the
    entries of a tensor that is not on the CPU (they would synchronise its device).
    """
    if isinstance(cost, Tensor):
        m = cost.detach()
        values = values or m.device.type == "cpu"
    elif isinstance(cost, (np.ndarray, list, tuple)):
        try:
            m = torch.from_numpy(np.array(cost, dtype=np.float64))
        except (TypeError, ValueError):
            raise TypeError("cost must be a real (C, C) matrix (numpy array or torch tensor)") from None
    else:
        raise TypeError(f"cost must be a (C, C) numpy array or torch tensor, got {type(cost).__name__}")
    if m.dtype.is_complex or m.dtype == torch.bool:
        raise TypeError(f"cost must be a real matrix, got dtype {m.dtype}")
    m = m.to(torch.float64)
    if m.dim() != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"cost must be a square (C, C) matrix, got shape {tuple(m.shape)}")
    if num_classes is not None and m.shape[0] != num_classes:
        raise ValueError(f"cost is {m.shape[0]} x {m.shape[1]} but input has {num_classes} classes along dim 1")
    if not values:
        return m
    if m.numel() and not bool(torch.isfinite(m).all()):
        raise ValueError("cost contains NaN or infinite entries")
    if m.numel() and float(m.min()) < 0:
        raise ValueError(f"cost must be non-negative, its minimum is {float(m.min()):.3g}")
    return m


def _check_options(reg: Any, max_iter: Any, tol: Any, grad: str, on_underflow: str) -> tuple[float, int, float]:
    try:
        reg_f = float(reg)
    except (TypeError, ValueError):
        raise TypeError(f"reg must be a positive real number, got {reg!r}") from None
    if not (reg_f > 0) or not math.isfinite(reg_f):
        raise ValueError(f"reg must be a finite number > 0 (absolute, in the cost's units), got {reg!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer)):
        raise TypeError(f"max_iter must be an int >= 1, got {max_iter!r}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    try:
        tol_f = float(tol)
    except (TypeError, ValueError):
        raise TypeError(f"tol must be a real number >= 0, got {tol!r}") from None
    if not (tol_f >= 0):
        raise ValueError(f"tol must be >= 0, got {tol!r}")
    if grad not in GRADS:
        raise ValueError(f"grad must be one of {GRADS}, got {grad!r}")
    if on_underflow not in ON_UNDERFLOW:
        raise ValueError(f"on_underflow must be one of {ON_UNDERFLOW}, got {on_underflow!r}")
    return reg_f, int(max_iter), tol_f


def _safe_log(x: Tensor) -> Tensor:
    """log x with log 0 = -inf and a zero (not NaN) gradient at x = 0."""
    pos = x > 0
    return torch.where(pos, torch.log(torch.where(pos, x, torch.ones_like(x))), torch.full_like(x, -math.inf))


def _lse(x: Tensor, dim: int) -> Tensor:
    """``torch.logsumexp``. Its slices here always hold a finite entry (a and b each have some mass), so the
    all -inf case, whose gradient would be NaN, does not arise."""
    return torch.logsumexp(x, dim=dim)


def _finite_or(x: Tensor, value: float = 0.0) -> Tensor:
    return torch.where(torch.isfinite(x), x, torch.full_like(x, value))


def _log_sinkhorn(
    la: Tensor,
    lb: Tensor,
    cost: Tensor,
    reg: float,
    max_iter: int,
    tol: float,
    check_every: int,
    g0: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, int, Tensor]:
    """Log-domain iterations on (N, C) log-marginals from the target-side potential ``g0`` (default 0).
    Returns (log T, f, g, n_iter, row marginal error).

    Potentials are kept in units of ``reg`` (``fs = f / reg``). The plan depends on ``g0`` only up to an
    additive constant, which the first f-update absorbs: starting from the centred ``g`` of a run of k
    iterations continues that run exactly.
    """
    mt = -cost / reg  # (C, C), M_ij / reg negated
    a = torch.exp(la)
    gs = torch.zeros_like(lb) if g0 is None else g0 / reg
    fs = -_lse((lb + gs).unsqueeze(1) + mt, dim=2)  # (N, C)
    it, err = 0, torch.full(la.shape[:1], math.inf, dtype=la.dtype, device=la.device)
    while it < max_iter:
        it += 1
        gs = -_lse((la + fs).unsqueeze(2) + mt, dim=1)  # columns of T now sum to b exactly
        fs_next = -_lse((lb + gs).unsqueeze(1) + mt, dim=2)
        # row sums of T(fs, gs) are a * exp(fs - fs_next)
        err = (a * (1 - torch.exp(_finite_or(fs - fs_next)))).abs().sum(-1)
        if tol > 0 and (it % check_every == 0 or it == max_iter) and bool((err <= tol).all()):
            break
        if it < max_iter:
            fs = fs_next
    log_t = (la + fs).unsqueeze(2) + (lb + gs).unsqueeze(1) + mt
    return log_t, _finite_or(fs) * reg, _finite_or(gs) * reg, it, err


def _plain_sinkhorn(
    a: Tensor,
    b: Tensor,
    cost: Tensor,
    reg: float,
    max_iter: int,
    tol: float,
    check_every: int,
    on_underflow: str,
) -> tuple[Tensor, Tensor, Tensor, int, Tensor]:
    """Scaling iterations u = a / (K v), v = b / (K^T u), K = exp(-M / reg). Same returns as
    :func:`_log_sinkhorn`; raises :class:`SinkhornUnderflowError` before iterating when entries of K leave
    the normal range (``reg < underflow_reg(max(cost))``), and when a scaling stops being finite."""
    k = torch.exp(-cost / reg)  # (C, C)

    def scale(mass: Tensor, kx: Tensor) -> Tensor:  # mass / kx with 0 where there is no mass
        return torch.where(mass > 0, mass / kx, torch.zeros_like(kx))

    def check(it: int, *xs: Tensor) -> None:
        if on_underflow == "raise" and not all(bool(torch.isfinite(x).all()) for x in xs):
            raise SinkhornUnderflowError(_underflow_message(f"under/overflowed at iteration {it}", cost, reg))

    # K's entries below the normal range lose precision, and those that round to 0 silently drop routes from
    # the plan (a zero diagonal keeps every scaling finite, so `check` would never fire): refuse up front
    if on_underflow == "raise" and cost.numel() and reg < underflow_reg(float(cost.max()), cost.dtype):
        raise SinkhornUnderflowError(_underflow_message("underflows in its kernel K = exp(-cost/reg)", cost, reg))
    v = torch.ones_like(b)
    kv_u = v @ k.T  # the K v that made the current u
    u = scale(a, kv_u)
    check(0, u)
    it, err = 0, torch.full(a.shape[:1], math.inf, dtype=a.dtype, device=a.device)
    while it < max_iter:
        it += 1
        ktu = u @ k
        v = scale(b, ktu)
        kv = v @ k.T
        err = (u * kv - a).abs().sum(-1)
        stop = tol > 0 and (it % check_every == 0 or it == max_iter)
        if it % check_every == 0 or it == max_iter:
            check(it, u, v)
        if stop and bool((err <= tol).all()):
            break
        if it < max_iter:
            kv_u = kv
            u = scale(a, kv_u)
    plan = u.unsqueeze(2) * k * v.unsqueeze(1)
    f = -reg * torch.log(kv_u)  # = reg * log(u / a), the KL-form potential
    g = -reg * torch.log(ktu)
    return plan, _finite_or(f), _finite_or(g), it, err


def _underflow_message(what: str, cost: Tensor, reg: float) -> str:
    cmax, dtype = float(cost.max()), cost.dtype
    other = "float64, " if dtype != torch.float64 else ""
    return (
        f"plain Sinkhorn (log_domain=False) {what} in {dtype}: "
        f"reg={reg:.3g} is too small for this dtype (exp(-max(cost)/reg) = exp(-{cmax / reg:.4g}), "
        f"the smallest normal {dtype} is exp({math.log(torch.finfo(dtype).tiny):.4g})). "
        f"Use reg >= {underflow_reg(cmax, dtype):.3g} (more if the scalings still overflow), {other}or log_domain=True"
    )


_OWN_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_TORCH_MODULES_DIR = os.path.join(os.path.dirname(os.path.abspath(torch.nn.modules.__file__)), "")


def _user_stacklevel() -> int:
    """The ``stacklevel`` for a :func:`warnings.warn` in this package's function that calls this one: it points
    at the first frame outside the package and ``torch.nn.modules`` (the user's line, also through
    :class:`SinkhornLoss`)."""
    frame: FrameType | None
    frame, level = sys._getframe(1), 1  # the caller of this function, whose warnings.warn is stacklevel 1
    while frame is not None and frame.f_code.co_filename.startswith((_OWN_DIR, _TORCH_MODULES_DIR)):
        frame, level = frame.f_back, level + 1
    return level


def _warn_unconverged(err: Tensor, keep: Tensor | None, tol: float, max_iter: int, skip_nonfinite: bool) -> None:
    """Warn once (:class:`SinkhornConvergenceWarning`) if a counted row's marginal error is above ``tol``.
    ``skip_nonfinite``: rows whose error is NaN/inf are the underflow the caller chose to ignore."""
    bad = ~(err <= tol)
    if keep is not None:
        bad &= keep
    if skip_nonfinite:
        bad &= torch.isfinite(err)
    n_bad = int(bad.sum())
    if not n_bad:
        return
    worst = float(err[bad].max()) if bool(torch.isfinite(err[bad]).all()) else math.nan
    warnings.warn(
        f"Sinkhorn did not converge: {n_bad} of {err.shape[0]} rows still have row marginal error > tol={tol:.3g} "
        f"after max_iter={max_iter} iterations (largest error {worst:.3g}). Their plans do not meet the "
        "prediction's marginal, so the loss is not the entropic OT value and can even be below the exact EMD. "
        "Raise max_iter, raise reg, or pass tol=0 to run a fixed number of iterations without this check",
        SinkhornConvergenceWarning,
        stacklevel=_user_stacklevel(),
    )


# The overloads tell a type checker that the result is a tuple exactly when return_info=True.
@overload
def sinkhorn(
    input: Tensor,
    target: Tensor,
    cost: Any,
    *,
    reg: float,
    max_iter: int = 1000,
    tol: float = 1e-6,
    log_domain: bool = True,
    grad: str = "envelope",
    from_logits: bool = True,
    reduction: str = "mean",
    ignore_index: int = -100,
    validate: bool | None = None,
    on_underflow: str = "raise",
    return_info: Literal[False] = False,
    warm_start: Tensor | None = None,
) -> Tensor: ...


@overload
def sinkhorn(
    input: Tensor,
    target: Tensor,
    cost: Any,
    *,
    reg: float,
    max_iter: int = 1000,
    tol: float = 1e-6,
    log_domain: bool = True,
    grad: str = "envelope",
    from_logits: bool = True,
    reduction: str = "mean",
    ignore_index: int = -100,
    validate: bool | None = None,
    on_underflow: str = "raise",
    return_info: Literal[True],
    warm_start: Tensor | None = None,
) -> tuple[Tensor, SinkhornInfo]: ...


@overload
def sinkhorn(
    input: Tensor,
    target: Tensor,
    cost: Any,
    *,
    reg: float,
    max_iter: int = 1000,
    tol: float = 1e-6,
    log_domain: bool = True,
    grad: str = "envelope",
    from_logits: bool = True,
    reduction: str = "mean",
    ignore_index: int = -100,
    validate: bool | None = None,
    on_underflow: str = "raise",
    return_info: bool = False,
    warm_start: Tensor | None = None,
) -> Tensor | tuple[Tensor, SinkhornInfo]: ...


def sinkhorn(
    input: Tensor,
    target: Tensor,
    cost: Any,
    *,
    reg: float,
    max_iter: int = 1000,
    tol: float = 1e-6,
    log_domain: bool = True,
    grad: str = "envelope",
    from_logits: bool = True,
    reduction: str = "mean",
    ignore_index: int = -100,
    validate: bool | None = None,
    on_underflow: str = "raise",
    return_info: bool = False,
    warm_start: Tensor | None = None,
) -> Tensor | tuple[Tensor, SinkhornInfo]:
    r"""Entropic OT (Sinkhorn) loss ``<T*, M>`` between predictions and targets, for any ground cost.

    See the module docstring for the math. Batched over all rows at once on ``input``'s device; computes
    in float32 (float64 for float64 input) and returns ``input``'s dtype.

    Args:
        input: (N, C) or (N, C, d1, ..., dk) logits, or probabilities if ``from_logits=False``.
        target: (N,) / (N, d1, ..., dk) class indices, or soft labels of ``input``'s shape.
        cost: (C, C) non-negative finite ground cost (numpy or tensor); ``cost[i, j]`` moves a unit of
            mass from predicted class i to target class j. For a tree: ``tree.distance_matrix()``.
        reg: entropic regularisation, **absolute** (in the units of ``cost``, as POT's ``reg``).
        max_iter: iteration budget (one iteration updates both potentials).
        tol: stop when every row's plan has row marginal L1 error <= tol; if some row is still above it after
            ``max_iter`` iterations, warn (:class:`SinkhornConvergenceWarning`). 0: always run ``max_iter``
            iterations, without the check or the warning.
        log_domain: stable log-sum-exp iterations (default) or the plain scaling form (fast, underflows).
        grad: "envelope" (centred dual potentials, O(1) memory) or "autodiff" (through the iterations).
        from_logits, reduction, ignore_index, validate: as :func:`emdloss.functional.emd`.
        on_underflow: plain variant only: "raise" a :class:`SinkhornUnderflowError` naming the safe reg
            (before iterating if ``reg < underflow_reg(max(cost))``), or "ignore" and return whatever the
            arithmetic gave (NaN/inf or zeros; rows with a non-finite marginal error then do not warn either).
        return_info: also return a :class:`SinkhornInfo` (plan, potentials, iterations, convergence).
        warm_start: (M, C) target-side potentials to start from, M = N * d1 * ... * dk, typically
            ``info.g`` of an earlier call on the same rows: ``k`` iterations and then ``j`` more from its ``g``
            give the plan of ``k + j`` iterations. Log domain only.

    Returns:
        The loss (scalar, or (N, d1, ..., dk) with ``reduction="none"``), and the info if asked.
    """
    reg, max_iter, tol = _check_options(reg, max_iter, tol, grad, on_underflow)
    _inputs.check_reduction(reduction)
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if input.dim() < 2:
        raise ValueError(f"input must have shape (N, C) or (N, C, d1, ..., dk), got shape {tuple(input.shape)}")
    m64 = check_cost(cost, input.shape[1], values=_inputs.should_validate(validate, input))
    rows = _inputs.normalise(
        input, target, m64.shape[0], from_logits=from_logits, ignore_index=ignore_index, validate=validate,
        reduction=reduction,
    )  # fmt: skip
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    device = input.device
    mat = m64.to(device=device, dtype=acc)
    x = rows.x.to(acc)
    if from_logits:
        la = torch.log_softmax(x, dim=-1)
        a = torch.exp(la)
    else:
        a = x
        la = _safe_log(a)
    if rows.labels is not None:
        labels = rows.labels if rows.keep is None else torch.where(rows.keep, rows.labels, 0)
        b = torch.nn.functional.one_hot(labels, m64.shape[0]).to(acc)
    else:
        assert rows.soft is not None  # exactly one of labels and soft is set (Batch)
        b = rows.soft.to(acc)
    lb = _safe_log(b)
    g0 = None
    if warm_start is not None:
        if not log_domain:
            raise ValueError("warm_start needs log_domain=True")
        if not isinstance(warm_start, Tensor) or warm_start.shape != lb.shape:
            shape = tuple(warm_start.shape) if isinstance(warm_start, Tensor) else type(warm_start).__name__
            raise ValueError(f"warm_start must be a ({lb.shape[0]}, {lb.shape[1]}) tensor of potentials, got {shape}")
        g0 = warm_start.detach().to(device=device, dtype=acc)
    check_every = 1 if device.type == "cpu" else 10

    autodiff = grad == "autodiff" and torch.is_grad_enabled()
    with torch.set_grad_enabled(autodiff):
        if log_domain:
            log_t, f, g, n_iter, err = _log_sinkhorn(la, lb, mat, reg, max_iter, tol, check_every, g0)
            plan = torch.exp(log_t)
        else:
            plan, f, g, n_iter, err = _plain_sinkhorn(a, b, mat, reg, max_iter, tol, check_every, on_underflow)
        value = (plan * mat).sum((1, 2))
    f = (f - f.mean(-1, keepdim=True)).detach()
    g = (g - g.mean(-1, keepdim=True)).detach()
    if not autodiff:
        # envelope: forward value <T, M>; gradient f w.r.t. a and g w.r.t. b (the terms below are exactly 0)
        value = value.detach() + (f * (a - a.detach())).sum(-1) + (g * (b - b.detach())).sum(-1)
    if rows.keep is not None:
        value = value * rows.keep
    loss = reduce_rows(value.to(input.dtype), rows)  # raises first if the input made the loss NaN
    if tol > 0:
        _warn_unconverged(err.detach(), rows.keep, tol, max_iter, skip_nonfinite=on_underflow == "ignore")
    if not return_info:
        return loss
    info = SinkhornInfo(
        plan=plan.detach(), f=f, g=g, n_iter=n_iter, converged=(err <= tol).detach(), marginal_error=err.detach()
    )
    return loss, info
