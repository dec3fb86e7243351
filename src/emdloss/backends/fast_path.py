"""The most common call, with the least Python around the fused kernel.

``emd`` / ``EMDLoss`` on (N, C) float32 or float64 CPU logits with (N,) int64 class indices, reduction "mean"
or "sum", no class weights, no label smoothing, outside any tracing: the general path (input checks and
flattening in :mod:`emdloss._inputs`, the registry, :mod:`.fused_cpu`'s autograd Function) spends 150-200 us
of Python and torch calls around a kernel that takes 10-20 us on a 128 x 10 batch, which made small ordinal
problems cost 3x cross-entropy. :func:`try_loss` does only what this case needs: a few type and shape tests,
one count of the ignored rows, the same kernel call and the same sum (:func:`.fused_cpu.sum_rows`) as
:class:`.fused_cpu.FusedCPUBackend` (so the same numbers, bit for bit: ``tests/test_fast_path.py``), and a
one-line autograd node that hands back the gradient the kernel wrote.

It never raises a check of its own: for anything else, or when the loss comes out non-finite (a label out of
range, a NaN or +inf logit), it returns None and the caller runs the general path, which computes the call
again and gives its own result or error. Value checks need no pass here: the kernel reads every label and
logit anyway, and a bad one makes the sum non-finite.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._inputs import _jit_tracing, check_loss_scale, tracing
from ..tree import Tree
from .base import loss_weight_sum
from .fused_cpu import EXACT_SUM_MAX_ROWS, SECOND_DERIVATIVE_MESSAGE, FusedCPUBackend, sum_rows

_FAST_DTYPES = (torch.float32, torch.float64)


def try_loss(
    input: Tensor,
    target: Tensor,
    tree: Tree,
    rho: float,
    reduction: str,
    ignore_index: int,
    fused: FusedCPUBackend,
) -> Tensor | None:
    """The "mean" or "sum" loss of ``input`` (N, C) logits against ``target`` (N,) class indices through the
    fused kernel of ``fused`` (the registry's), or None when the call is not the common case described in the
    module docstring: the caller then takes the general path."""
    # Exact types: tensor subclasses (fake, functional or traced tensors) take the general path.
    if type(input) is not Tensor or type(target) is not Tensor or tracing() or _jit_tracing():
        return None
    if input.dtype not in _FAST_DTYPES or target.dtype != torch.int64 or input.dim() != 2 or target.dim() != 1:
        return None
    n, c = input.shape
    if c != tree.num_classes or target.shape[0] != n or n == 0 or not (input.is_cpu and target.is_cpu):
        return None
    kernels = fused.usable_kernels()
    if kernels is None:  # numba missing, or its kernels failed here before
        return None
    plan = tree.cached(("fast_path", rho, input.dtype), lambda: _checked_plan(kernels, tree, rho, input.dtype))
    labels = target.numpy()
    # a list's count is cheaper than numpy's for small batches (as in sum_rows); exact either way
    kept = n - (
        labels.tolist().count(ignore_index)
        if n <= EXACT_SUM_MAX_ROWS
        else int(np.count_nonzero(labels == ignore_index))
    )
    if kept == 0:  # "mean" of nothing: the general path's NaN with a zero gradient
        return None
    scale = 1.0 / kept if reduction == "mean" else 1.0
    need_grad = input.requires_grad and torch.is_grad_enabled()
    x = input.detach().contiguous().numpy()
    try:
        rows, grad = plan.rows(x, labels, None, True, need_grad, ignore_index, scale)
    except kernels.KernelFailure:
        return None  # the general path warns once and falls back to the reference backend
    total = sum_rows(rows)
    if not math.isfinite(total):
        return None
    value = torch.scalar_tensor(total * scale, dtype=input.dtype)  # rounded once, as the general path does
    if not need_grad:
        return value
    apply: Callable[..., Tensor] = _KernelGradient.apply  # torch leaves Function.apply untyped
    return apply(input, value, torch.from_numpy(grad))


def _checked_plan(kernels: ModuleType, tree: Tree, rho: float, dtype: torch.dtype) -> Any:
    """The kernels' plan for class-index targets (:func:`.numba_kernels.plan`), after the general path's first
    check, with its message: the tree's edge lengths must not overflow the dtype (raises, so nothing is cached)."""
    check_loss_scale(loss_weight_sum(tree), dtype, rho)
    return kernels.plan(tree, rho, np.dtype(np.float64 if dtype == torch.float64 else np.float32), False)


class _KernelGradient(torch.autograd.Function):
    """``x`` -> the 0-d loss ``value`` (a tensor made for this call), whose gradient with respect to ``x`` is
    ``grad`` (computed by the kernel, already scaled by the reduction)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, value: Tensor, grad: Tensor) -> Tensor:
        # saved, not kept on ctx: autograd frees saved tensors after backward, so the gradient it gets back is
        # its only owner and is used in place, not copied into x.grad (a copy cost 0.3x cross-entropy at 256 x 1,000)
        ctx.save_for_backward(grad)
        return value

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None, None]:
        if torch.is_grad_enabled():  # create_graph=True
            raise RuntimeError(SECOND_DERIVATIVE_MESSAGE)
        (grad,) = ctx.saved_tensors
        factor = grad_out.item()
        return (grad if factor == 1.0 else grad * factor), None, None
