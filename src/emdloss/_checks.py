"""Input checking shared by every loss: one place that turns user tensors into (M, C) rows or says why not.

Cheap checks (ranks, shapes, dtypes, devices) always run. Checks that must read tensor values (class
indices in range, finite logits, soft targets that are distributions) run when ``validate`` is True, or,
with the default ``validate=None``, whenever the tensors live on the CPU, where reading them forces no
device synchronisation. See docs/bad-input.md for the full table.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("none", "mean", "sum")


@dataclass
class Rows:
    """A batch flattened to rows: ``x`` (M, C) and either ``hard`` (M,) class indices or ``soft`` (M, C).

    ``keep`` (M,) is a float mask of rows that count (0 where the target is ``ignore_index``) or None when
    every row counts; ``out_shape`` is the shape of the unreduced loss, ``(N, d1, ..., dk)``.
    """

    x: Tensor
    hard: Tensor | None
    soft: Tensor | None
    keep: Tensor | None
    out_shape: tuple[int, ...]
    check_logits: bool = False
    check_soft: bool = False  # the soft target's values are still to be checked (by the fused kernel)


def sum_tolerance(num_classes: int, dtype: torch.dtype) -> float:
    """How far a distribution's sum may be from 1: ``1e-4 + 10 * sqrt(C) * eps(dtype)``.

    That is a few times the rounding error of summing C float values, with a floor of 1e-4; for float16 and
    bfloat16 it is about 0.01-0.1.
    """
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo(torch.float32).eps
    return 1e-4 + 10.0 * (num_classes**0.5) * eps


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_rho(rho: float) -> float:
    try:
        rho_f = float(rho)
    except (TypeError, ValueError):
        raise TypeError(f"rho must be a real number >= 1, got {rho!r}") from None
    if not (rho_f >= 1.0) or rho_f == float("inf"):
        raise ValueError(f"rho must be a finite number >= 1 (1: exact EMD, 2: relaxed), got {rho!r}")
    return rho_f


def should_validate(validate: bool | None, *tensors: Tensor) -> bool:
    if validate is None:
        # value checks are data-dependent control flow, which torch.func.vmap cannot trace
        return not functorch_active() and all(t.device.type == "cpu" for t in tensors)
    return bool(validate)


def to_rows(
    input: Tensor,
    target: Tensor,
    num_classes: int,
    *,
    from_logits: bool,
    ignore_index: int,
    validate: bool | None,
    device: torch.device | None = None,
    defer_logits_check: bool = False,
    checked_by_kernel: bool = False,
) -> Rows:
    """Check ``input``/``target`` against ``torch.nn.CrossEntropyLoss`` conventions and flatten them.

    Args:
        input: (N, C) or (N, C, d1, ..., dk) floating logits (or probabilities if not ``from_logits``).
        target: (N,) / (N, d1, ..., dk) integer class indices, or a floating tensor of ``input``'s shape.
        num_classes: C expected by the tree or cost matrix.
        device: the device of the tree's index tensors, when the caller has them placed already.
        defer_logits_check: leave the finite-logits check to :func:`check_finite_loss` on the per-row loss
            (M values instead of M x C); -inf logits (probability 0, as in ``cross_entropy``) then pass.
        checked_by_kernel: leave the value checks of the target to the caller (the fused CPU path, whose
            kernels check class indices and soft targets as they read them): class indices come back as
            given (flattened, ``keep`` None), ``ignore_index`` included.
    """
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if input.dtype not in _FLOAT_DTYPES:
        kind = "complex" if input.dtype.is_complex else ("integer" if not input.dtype.is_floating_point else "")
        raise TypeError(
            f"input must be a floating tensor (float16, bfloat16, float32 or float64), got {kind + ' ' if kind else ''}"
            f"dtype {input.dtype}; cast it with input.float()"
        )
    if input.dim() < 2:
        raise ValueError(
            f"input must have shape (N, C) or (N, C, d1, ..., dk) with C = {num_classes}, got shape {tuple(input.shape)}"
        )
    if input.shape[1] != num_classes:
        raise ValueError(
            f"input has {input.shape[1]} classes along dim 1 (shape {tuple(input.shape)}), but the tree has "
            f"{num_classes} classes"
        )
    if target.device != input.device:
        raise ValueError(f"input is on {input.device} but target is on {target.device}; move them to one device")
    if device is not None and torch.device(device) != input.device and not _same_device(device, input.device):
        raise ValueError(
            f"input is on {input.device} but the loss's tree tensors are on {device}; call loss.to({str(input.device)!r})"
        )

    n = input.shape[0]
    spatial = tuple(input.shape[2:])
    out_shape = (n, *spatial)
    x = input.movedim(1, -1).reshape(-1, num_classes) if spatial else input
    values = should_validate(validate, input)

    if target.dtype.is_floating_point:
        if target.shape != input.shape:
            raise ValueError(
                f"soft (floating) target must have input's shape {tuple(input.shape)}, got {tuple(target.shape)}; "
                "class-index targets must be an integer tensor"
            )
        soft = target.movedim(1, -1).reshape(-1, num_classes) if spatial else target
        if values and not checked_by_kernel:
            _check_distribution(soft, "target")
        rows = Rows(x=x, hard=None, soft=soft, keep=None, out_shape=out_shape)
    elif target.dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        if target.shape != out_shape:
            raise ValueError(
                f"class-index target must have shape {out_shape} for input of shape {tuple(input.shape)}, "
                f"got {tuple(target.shape)}"
            )
        if checked_by_kernel:
            hard, keep = target.reshape(-1), None
        else:
            hard, keep = _class_indices(target.reshape(-1), num_classes, ignore_index, values)
        rows = Rows(x=x, hard=hard, soft=None, keep=keep, out_shape=out_shape)
    else:
        raise TypeError(
            f"target must be integer class indices (int64) or a floating distribution, got dtype {target.dtype}"
        )

    if values and x.numel():
        if not from_logits:
            _check_distribution(x, "input (probabilities, from_logits=False)")
        elif not defer_logits_check and not all_finite(x):
            raise ValueError("input contains NaN or infinite logits")
    rows.check_logits = bool(values and from_logits and defer_logits_check)
    rows.check_soft = bool(values and checked_by_kernel and rows.soft is not None)
    return rows


def check_finite_loss(loss: Tensor, rows: Rows) -> None:
    """The deferred logits check: NaN or +inf logits make their row's softmax, hence its loss, NaN."""
    if rows.check_logits and loss.numel() and not bool(torch.isfinite(loss.detach()).all()):
        if not all_finite(rows.x):
            raise ValueError("input contains NaN or infinite logits")


def functorch_active() -> bool:
    """True inside a torch.func transform (grad, vmap, ...); False on torch versions without the query."""
    check = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(check()) if check is not None else False


def tracing() -> bool:
    """True under torch.compile or a torch.func transform, where tensors cannot go through numpy."""
    return torch.compiler.is_compiling() or functorch_active()


def _class_indices(hard: Tensor, num_classes: int, ignore_index: int, values: bool) -> tuple[Tensor, Tensor]:
    """(M,) class indices -> (indices with ignored ones set to 0 (int64), keep mask (float32)).

    With ``values``, an index outside [0, C) that is not ``ignore_index`` raises. On the CPU this runs in
    numpy: a handful of operations on M integers, each far cheaper there than a torch op's overhead.
    """
    if hard.device.type == "cpu" and not tracing():
        h = hard.numpy().astype(np.int64, copy=False)
        ignored = h == ignore_index
        if values:
            check_labels(h, num_classes, ignore_index)
        return torch.from_numpy(np.where(ignored, 0, h)), torch.from_numpy((~ignored).astype(np.float32))
    hard = hard.long()
    ignored = hard == ignore_index
    if values and hard.numel():
        bad = ((hard < 0) | (hard >= num_classes)) & ~ignored
        if bool(bad.any()):
            raise ValueError(
                f"target contains class index {int(hard[bad][0])}, outside [0, {num_classes}) "
                f"(and not ignore_index={ignore_index})"
            )
    keep = (~ignored).to(torch.float32)
    return torch.where(ignored, torch.zeros((), dtype=hard.dtype, device=hard.device), hard), keep


def check_labels(labels: np.ndarray, num_classes: int, ignore_index: int) -> None:
    """Raise if a class index is outside [0, C) and not ``ignore_index``."""
    bad = ((labels < 0) | (labels >= num_classes)) & (labels != ignore_index)
    if bad.any():
        raise ValueError(
            f"target contains class index {int(labels[bad][0])}, outside [0, {num_classes}) "
            f"(and not ignore_index={ignore_index})"
        )


def _same_device(a: torch.device | str, b: torch.device) -> bool:
    a = torch.device(a)
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def all_finite(x: Tensor) -> bool:
    """True if every entry is finite. One fast reduction; the exact elementwise test only if its sum is not
    finite (which a NaN/inf forces, and overflow of huge finite values may cause)."""
    if bool(torch.isfinite(x.sum())):
        return True
    return bool(torch.isfinite(x).all())


def _check_distribution(t: Tensor, name: str) -> None:
    """Rows of ``t`` must be finite, >= 0 and sum to 1 within :func:`sum_tolerance`."""
    if t.numel() == 0:
        return
    t = t.detach()
    # Two reductions, no (N, C) temporaries: a NaN/inf anywhere makes its row sum non-finite.
    sums = t.sum(dim=-1, dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)
    finite = bool(torch.isfinite(sums).all())
    check_distribution_stats(
        name, finite, float(t.amin()) if finite else 0.0, float((sums - 1).abs().max()) if finite else 0.0, t.shape[-1], t.dtype
    )


def check_distribution_stats(name: str, finite: bool, low: float, worst: float, num_classes: int, dtype: torch.dtype) -> None:
    """Raise unless rows are a distribution: all ``finite``, smallest entry ``low`` >= 0, largest distance
    ``worst`` of a row sum from 1 within :func:`sum_tolerance`."""
    if not finite:
        raise ValueError(f"{name} contains NaN or infinite values")
    if low < 0:
        raise ValueError(f"{name} has negative entries (min {low:.3g}); it must be a distribution")
    tol = sum_tolerance(num_classes, dtype)
    if worst > tol:
        raise ValueError(f"{name} rows must sum to 1 (tolerance {tol:.2g}); the worst row is off by {worst:.3g}")


def reduce(loss: Tensor, keep: Tensor | None, reduction: str, out_shape: tuple[int, ...]) -> Tensor:
    """Apply ``reduction`` to per-row losses (M,), ignoring rows where ``keep`` is 0.

    Matches ``CrossEntropyLoss``: "mean" divides by the number of kept rows (NaN when none is kept),
    "sum" adds them (0 when none), "none" returns ``out_shape`` with 0 at ignored positions.
    """
    dtype = loss.dtype
    if keep is not None:
        loss = loss * keep.to(dtype)
    if reduction == "none":
        return loss.reshape(out_shape)
    total = loss.sum(dtype=torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype)
    if reduction == "sum":
        return total.to(dtype)
    count = keep.sum() if keep is not None else torch.tensor(float(loss.numel()), device=loss.device)
    return (total / count.to(total.dtype)).to(dtype)
