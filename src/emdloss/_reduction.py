"""The last step of every loss: per-row losses (M,) -> the finite-loss check -> the reduction.

Backends return 0 (with gradient 0) for rows whose target is ``ignore_index``, so the reductions need no mask:
"sum" adds the rows, "mean" divides that by the number of rows that count, "none" reshapes to (N, d1, ...).
As in ``torch.nn.CrossEntropyLoss``, "mean" over no counted row is NaN; its gradient is 0, not NaN.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._inputs import Batch, all_finite, check_labels, tracing


def reduce_rows(loss: Tensor, batch: Batch) -> Tensor:
    """Apply ``batch.reduction`` to the per-row losses ``loss`` (M,), after :func:`check_finite_loss`."""
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
