"""Backends compute per-row tree EMD losses; :func:`tree_emd_rows` is the one dispatch point.

- :mod:`.torch_ops`: the reference closed form in torch ops, any device, any autograd use.
- :mod:`.numba_cpu`: one fused pass per row on the CPU (the default there when numba imports).

The fused path is used for CPU tensors unless the target needs a gradient, torch is tracing
(``torch.compile``, ``torch.func``), or ``EMDLOSS_BACKEND=torch`` is set in the environment.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from .._checks import tracing
from ..tree import Tree
from . import torch_ops

_numba_cpu = None  # imported on first use: numba takes a second to import and pulls in scipy


def numba_kernels():
    """The fused CPU module, imported on first use; None if numba cannot be imported."""
    global _numba_cpu
    if _numba_cpu is None:
        try:  # numba is a core dependency, but a broken install must still leave the reference path working
            from . import numba_cpu
        except ImportError:  # pragma: no cover
            _numba_cpu = False
        else:
            _numba_cpu = numba_cpu
    return _numba_cpu or None


BACKENDS = ("auto", "torch", "numba")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class FusedTreeEMDFunction(torch.autograd.Function):
    """Per-row tree EMD of logits/probabilities ``x`` (N, C), fused on the CPU; the target is constant.

    The forward pass computes the gradient along with the loss (it costs one more sweep of the row
    while it is in cache), and the backward pass only scales it by the incoming gradient.
    """

    @staticmethod
    def forward(ctx, x: Tensor, hard: Tensor | None, soft: Tensor | None, tree: Tree, rho: float, from_logits: bool) -> Tensor:  # type: ignore[override]
        compute = _compute_dtype(x.dtype)
        xc = x.detach().to(compute)
        p = torch.softmax(xc, dim=1) if from_logits else xc
        p = p.contiguous()
        need_grad = bool(ctx.needs_input_grad[0])
        kernels = numba_kernels()
        kernels.follow_torch_threads()
        loss, grad = kernels.tree_rows(
            p.numpy(),
            hard.detach().contiguous().numpy() if hard is not None else None,
            soft.detach().to(compute).contiguous().numpy() if soft is not None else None,
            tree,
            rho,
            from_logits,
            need_grad,
        )
        if need_grad:
            ctx.save_for_backward(torch.from_numpy(grad))
        ctx.x_dtype = x.dtype
        return torch.from_numpy(loss).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        gx = grad * grad_out.to(grad.dtype)[:, None]
        return gx.to(ctx.x_dtype), None, None, None, None, None


def choose_backend(x: Tensor, soft: Tensor | None, backend: str = "auto") -> str:
    """Which backend computes these rows: "numba" or "torch"."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get("EMDLOSS_BACKEND", "auto")
    fused_ok = (
        numba_kernels() is not None
        and x.device.type == "cpu"
        and not (soft is not None and soft.requires_grad)
        and not tracing()
    )
    if backend == "numba":
        if not fused_ok:
            raise ValueError(
                "backend='numba' needs numba, CPU tensors, a target without gradient and no torch.compile/torch.func "
                "tracing; use backend='auto'"
            )
        return "numba"
    if backend == "torch":
        return "torch"
    return "numba" if fused_ok else "torch"


def tree_emd_rows(
    x: Tensor,
    hard: Tensor | None,
    soft: Tensor | None,
    tree: Tree,
    rho: float,
    from_logits: bool,
    backend: str = "auto",
) -> Tensor:
    """Per-row ``sum_e w_e |f_e|^rho`` (M,) for rows ``x`` (M, C) and hard (M,) or soft (M, C) targets."""
    if choose_backend(x, soft, backend) == "numba":
        return FusedTreeEMDFunction.apply(x, hard, soft, tree, rho, from_logits)
    return torch_ops.tree_emd_rows(x, hard, soft, tree, rho, from_logits)
