"""The last step of every loss: per-row losses (M,) -> the finite-loss check -> the reduction.

Backends return 0 (with gradient 0) for rows whose target is ``ignore_index``, so the reductions need no mask:
"sum" adds the rows, "mean" divides that by the number of rows that count, "none" reshapes to (N, d1, ...).
As in ``torch.nn.CrossEntropyLoss``, "mean" over no counted row is NaN; its gradient is 0, not NaN.

With per-row weights ``r`` (class weights, or the mask of counted rows once a smoothed target replaced the class
indices, see :func:`emdloss.functional.emd`), each row's loss is multiplied by ``r_m`` (rows with ``r_m = 0`` give
exactly 0, even if their loss is not finite) and "mean" divides the weighted sum by ``weight_sum`` (torch's
``sum_m w[y_m]`` over counted rows for class indices, the number of rows M for soft targets). Weights are applied
here, after the backend, so that every backend gets them: a backend's backward receives ``r_m / weight_sum``
per row, which the fused backend's general (non-uniform) path rescales.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._inputs import Batch, all_finite, check_labels, tracing


def reduce_rows(
    loss: Tensor, batch: Batch, weights: Tensor | None = None, weight_sum: Tensor | int | None = None
) -> Tensor:
    """Apply ``batch.reduction`` to the per-row losses ``loss`` (M,), after :func:`check_finite_loss`.

    Args:
        loss: (M,) per-row losses from a backend.
        batch: the normalised call (reduction, output shape, count of rows that count).
        weights: optional (M,) non-negative per-row weights ``r``: the result is that of ``r * loss`` (0 where
            ``r`` is 0, whatever the loss there).
        weight_sum: the divisor of "mean" with ``weights`` (default ``batch.num_kept``). "mean" is NaN, with
            zero gradient, when it is 0.
    """
    if weights is not None:
        return _reduce_weighted(loss, batch, weights, batch.num_kept if weight_sum is None else weight_sum)
    if batch.reduction == "none":
        check_finite_loss(loss, batch)
        return loss.reshape(batch.out_shape)
    dtype = loss.dtype
    half = dtype in (torch.float16, torch.bfloat16)
    count = batch.num_kept
    # a sum, then a division: the sum's backward sends every row one expanded value (stride 0), which the
    # fused backend recognises without reading it (torch.mean's backward materialises M copies)
    total = loss.sum(dtype=torch.float32) if half else loss.sum()
    check_finite_loss(loss, batch, total)
    if batch.reduction == "sum":
        return total.to(dtype) if half else total
    if isinstance(count, Tensor):  # on a device: no synchronisation, hence torch.where
        mean = torch.where(count > 0, total / count.clamp(min=1).to(total.dtype), math.nan)
    else:
        mean = total / count if count else total * 0.0 + math.nan  # (0 + NaN: NaN value, zero gradient)
    return mean.to(dtype) if half else mean


def check_finite_loss(loss: Tensor, batch: Batch, total: Tensor | None = None) -> None:
    """Say why a loss is not finite, reading M losses (or their ``total``, when the caller has it) rather than
    M x C inputs; the inputs only when a loss is not finite: a class index out of range (CPU tensors, even
    with ``validate=False``, since the fused kernels give such rows a NaN loss instead of reading out of
    bounds), or NaN/+inf logits (when values are checked)."""
    if not loss.numel() or not (batch.values_checked or (loss.device.type == "cpu" and not tracing())):
        return
    if math.isfinite((loss.detach().sum() if total is None else total).item()):
        return
    if batch.labels is not None and batch.labels.device.type == "cpu" and not tracing():
        check_labels(batch.labels.numpy(), batch.x.shape[1], batch.ignore_index)
    if batch.values_checked and batch.from_logits and not all_finite(batch.x):
        raise ValueError("input contains NaN or infinite logits")


def _reduce_weighted(loss: Tensor, batch: Batch, weights: Tensor, weight_sum: Tensor | int) -> Tensor:
    """:func:`reduce_rows` with per-row weights; half-precision losses are weighted and summed in float32."""
    dtype = loss.dtype
    compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    r = weights.to(device=loss.device, dtype=compute)
    # where, not a product: a row with weight 0 (an ignored one) counts for nothing even if its loss is NaN
    weighted = torch.where(r != 0, loss.to(compute) * r, 0.0)
    if batch.reduction == "none":
        check_finite_loss(weighted, batch)
        return weighted.to(dtype).reshape(batch.out_shape)
    total = weighted.sum()
    check_finite_loss(weighted, batch, total)
    if batch.reduction == "sum":
        return total.to(dtype)
    if not isinstance(weight_sum, Tensor):
        mean = total / weight_sum if weight_sum else total * 0.0 + math.nan
        return mean.to(dtype)
    weight_sum = weight_sum.to(device=total.device, dtype=compute)
    positive = weight_sum > 0
    # no synchronisation; the division by 1 in the NaN branch keeps the gradient there 0, not NaN
    mean = torch.where(positive, total / torch.where(positive, weight_sum, 1.0), math.nan)
    return mean.to(dtype)
