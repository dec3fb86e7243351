"""Triton backend ("triton"): one fused kernel launch per call computes every row's softmax, flows, loss and
gradient on the GPU (the kernel and its math: :mod:`.triton_kernels`, docs/algorithm.md).

Runs CUDA tensors when ``triton`` imports (``pip install emdloss[gpu]``); ``backend="auto"`` picks it for them.
CPU tensors run only under Triton's interpreter (``TRITON_INTERPRET=1`` set before the first call), which is
how the tests check the kernel on machines without a GPU; ``"auto"`` never picks it for CPU tensors.

**PyTorch integration.** Under graph tracing (``torch.compile``, ``torch.export``, ``make_fx``) the launch is
the custom operator ``emdloss::triton_tree_rows`` (``torch.library.custom_op``) with a fake (meta)
implementation and a registered backward, so ``torch.compile`` traces through it without a graph break and
AOTAutograd sees its backward; eager calls take a plain autograd Function around the same launch, whose
Python overhead is a quarter of the operator's dispatch. Either returns the per-row losses and, when the input
requires grad, the per-row gradient ``dL_m/dx_m`` (M, C), computed in the same launch; backward multiplies it
by the incoming (M,) gradient (one elementwise op).
The target gets no gradient (a soft target that requires grad: ``backend="torch"``); nor is the gradient
differentiable (second derivatives: ``backend="torch"``, which says so if asked here). ``torch.func``
transforms are left to the reference backend.

**Dtypes and autocast.** float16, bfloat16 and float32 inputs are read as they are and computed in float32
(prefix sums in float64, as the reference does); float64 input in float64. The per-row losses come back in
the input's dtype, as every backend returns them, and the gradient in the input's dtype. The operator has no
autocast rule: under ``torch.autocast`` it receives the logits in whatever dtype the model produced (no
copy to float32 is needed, since it accumulates in float32 anyway), and autocast leaves the loss's dtype
alone, exactly as for the other backends.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._inputs import Batch, functorch_active, graph_tracing
from .._optional import install_hint
from ..tree import Tree
from .base import Backend, loss_weights

INSTALL_HINT = install_hint("gpu")


# ---------------------------------------------------------------------- the tree's arrays


def tree_arrays(tree: Tree) -> dict[str, np.ndarray]:
    """The kernel's per-tree int32/float64 arrays, indexed by DFS position ``k`` (0 = root) or class ``j``:

    - ``node_class`` (n,): the class at position k, -1 if none;
    - ``node_end`` (n,): ``end_k``, the subtree of position k is ``[k, end_k)``;
    - ``node_w`` (n,) float64: the loss weight of the edge above position k (:func:`.base.loss_weights`);
    - ``class_pos`` (C,): the position of class j;
    - ``end_order`` (E2,): the positions k with ``end_k < n``, stably sorted by ``end_k``;
    - ``ended`` (n,): how many entries of ``end_order`` have ``end_k <= j``, for each position j.

    Cached on the tree (do not modify them).
    """

    def build() -> dict[str, np.ndarray]:
        n = tree.num_nodes
        class_pos = tree.position[tree.classes].astype(np.int64)
        node_class = np.full(n, -1, dtype=np.int32)
        node_class[class_pos] = np.arange(tree.num_classes, dtype=np.int32)
        node_end = np.asarray(tree.subtree_end, dtype=np.int64)
        node_w = np.empty(n, dtype=np.float64)
        node_w[tree.position] = loss_weights(tree)
        inner = np.flatnonzero(node_end < n)
        end_order = inner[np.argsort(node_end[inner], kind="stable")]
        ended = np.searchsorted(node_end[end_order], np.arange(n), side="right")
        i32 = np.int32
        return {
            "node_class": node_class,
            "node_end": node_end.astype(i32),
            "node_w": node_w,
            "class_pos": class_pos.astype(i32),
            "end_order": end_order.astype(i32),
            "ended": ended.astype(i32),
        }

    return tree.cached("triton_arrays", build)


@dataclass(frozen=True)
class TritonTreeTensors:
    """:func:`tree_arrays` as tensors on one device (the same names)."""

    node_class: Tensor
    node_end: Tensor
    node_w: Tensor
    class_pos: Tensor
    end_order: Tensor
    ended: Tensor

    @staticmethod
    def cached(tree: Tree, device: torch.device) -> TritonTreeTensors:
        """Built once per tree and device (outside ``torch.compile`` traces, whose tensors must not outlive them)."""

        def build() -> TritonTreeTensors:
            arrays = tree_arrays(tree)
            return TritonTreeTensors(**{k: torch.from_numpy(v).to(device) for k, v in arrays.items()})

        if torch.compiler.is_compiling():
            return build()
        return tree.cached(("triton", str(device)), build)


# ---------------------------------------------------------------------- the operator


def _launch(
    x: Tensor,
    labels: Tensor | None,
    soft: Tensor | None,
    node_class: Tensor,
    node_end: Tensor,
    node_w: Tensor,
    class_pos: Tensor,
    end_order: Tensor,
    ended: Tensor,
    rho: float,
    from_logits: bool,
    ignore_index: int,
    need_grad: bool,
) -> tuple[Tensor, Tensor]:
    """:func:`.triton_kernels.launch`, importing the kernel module (and triton with it) on the first call."""
    from . import triton_kernels

    if triton_kernels.BROKEN:
        raise RuntimeError(f"emdloss: the Triton kernel cannot run: {triton_kernels.BROKEN}")
    return triton_kernels.launch(
        x, labels, soft, node_class, node_end, node_w, class_pos, end_order, ended,
        rho, from_logits, ignore_index, need_grad,
    )  # fmt: skip


@torch.library.custom_op("emdloss::triton_tree_rows", mutates_args=())
def triton_tree_rows(
    x: Tensor,
    labels: Tensor | None,
    soft: Tensor | None,
    node_class: Tensor,
    node_end: Tensor,
    node_w: Tensor,
    class_pos: Tensor,
    end_order: Tensor,
    ended: Tensor,
    rho: float,
    from_logits: bool,
    ignore_index: int,
    need_grad: bool,
) -> tuple[Tensor, Tensor]:
    """Rows ``x`` (M, C) and class indices ``labels`` (M,) or distributions ``soft`` (M, C) -> per-row losses
    (M,) and, if ``need_grad``, their gradients ``dL_m/dx_m`` (M, C) (else an empty (0, C) tensor); both
    float32, or float64 for float64 ``x``. The tree arrays are :func:`tree_arrays` on ``x``'s device."""
    return _launch(
        x, labels, soft, node_class, node_end, node_w, class_pos, end_order, ended,
        rho, from_logits, ignore_index, need_grad,
    )  # fmt: skip


@triton_tree_rows.register_fake
def _(x: Tensor, labels: Tensor | None, soft: Tensor | None, node_class: Tensor, node_end: Tensor, node_w: Tensor,
      class_pos: Tensor, end_order: Tensor, ended: Tensor, rho: float, from_logits: bool, ignore_index: int,
      need_grad: bool) -> tuple[Tensor, Tensor]:  # fmt: skip
    out = torch.float64 if x.dtype == torch.float64 else torch.float32
    m, c = x.shape
    return x.new_empty((m,), dtype=out), x.new_empty((m if need_grad else 0, c), dtype=out)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1])
    ctx.x_dtype = inputs[0].dtype


def _input_gradient(grad: Tensor, grad_loss: Tensor, x_dtype: torch.dtype) -> Tensor:
    """The per-row gradients of the forward pass times the incoming (M,) gradient, in the input's dtype."""
    if torch.is_grad_enabled():  # create_graph=True: the caller will differentiate this gradient
        raise RuntimeError(
            "emdloss: second derivatives (create_graph=True, Hessian-vector products, gradient penalties) need "
            "backend='torch'; the Triton backend computes its gradient in the forward pass and cannot "
            "differentiate it"
        )
    return (grad * grad_loss.to(grad.dtype)[:, None]).to(x_dtype)


def _backward(ctx: Any, grad_loss: Tensor, _grad_grad: Tensor | None) -> tuple[Tensor | None, ...]:
    (grad,) = ctx.saved_tensors
    return (_input_gradient(grad, grad_loss, ctx.x_dtype),) + (None,) * 12


triton_tree_rows.register_autograd(_backward, setup_context=_setup_context)


class _TritonRowsFunction(torch.autograd.Function):
    """The eager path: the same launch and backward as :func:`triton_tree_rows`, without the custom operator's
    dispatch (a plain autograd Function costs ~20 us of Python per call where the operator costs ~90 us,
    measured on the CPU; on a GPU that overhead is most of a small batch's time). ``torch.compile`` and other
    graph tracing take the operator, whose fake implementation they need."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, labels: Tensor | None, soft: Tensor | None, tt: TritonTreeTensors, rho: float,
                from_logits: bool, ignore_index: int) -> Tensor:  # fmt: skip
        need_grad = bool(ctx.needs_input_grad[0])
        loss, grad = _launch(
            x, labels, soft, tt.node_class, tt.node_end, tt.node_w, tt.class_pos, tt.end_order, tt.ended,
            rho, from_logits, ignore_index, need_grad,
        )  # fmt: skip
        if need_grad:
            ctx.save_for_backward(grad)
        ctx.x_dtype = x.dtype
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor, None, None, None, None, None, None]:
        (grad,) = ctx.saved_tensors
        return _input_gradient(grad, grad_loss, ctx.x_dtype), None, None, None, None, None, None


# ---------------------------------------------------------------------- the backend


def _interpret_requested() -> bool:
    """Whether the kernel would be made for Triton's interpreter: ``TRITON_INTERPRET`` as triton reads it (a
    true-ish value), and, if ``triton.language`` is already imported, it was imported so (the variable is read
    when a jitted function is defined)."""
    requested = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes", "y")
    if requested and "triton.language" in sys.modules:
        from triton.runtime.interpreter import InterpretedFunction

        return isinstance(sys.modules["triton.language"].standard.sum, InterpretedFunction)
    return requested


class TritonBackend(Backend):
    """The fused Triton kernel on CUDA tensors (CPU tensors under ``TRITON_INTERPRET=1``); module docstring."""

    name = "triton"

    def __init__(self) -> None:
        self._missing: str | bool | None = False  # False: not looked yet

    def unavailable(self) -> str | None:
        if self._missing is False:
            try:
                import triton  # noqa: F401
            except Exception as exc:  # ImportError, or a broken install
                self._missing = f"triton cannot be imported ({type(exc).__name__}: {exc}); {INSTALL_HINT}"
            else:
                self._missing = None
        return self._missing  # type: ignore[return-value]

    def interpreted(self) -> bool:
        """Whether the kernel runs (or, not yet imported, will run) in Triton's interpreter."""
        module = sys.modules.get(f"{__package__}.triton_kernels")
        return module.INTERPRETED if module is not None else _interpret_requested()

    def cannot_run(self, batch: Batch) -> str | None:
        device = batch.x.device.type
        if device == "cpu" and not self.interpreted():
            return (
                "it runs CUDA tensors (CPU tensors only in Triton's interpreter, TRITON_INTERPRET=1, for testing); "
                "for CPU tensors use backend='numba' or backend='torch'"
            )
        if device not in ("cpu", "cuda"):
            return f"it runs CUDA tensors (input is on {batch.x.device}); use backend='torch'"
        if batch.soft is not None and batch.soft.requires_grad:
            return "it does not differentiate with respect to the target (a target that requires grad): use backend='torch'"
        if functorch_active():
            return "torch.func transforms cannot trace through its kernel; use backend='torch'"
        return None

    def auto_skips(self, batch: Batch) -> str | None:
        if batch.x.device.type == "cpu":
            return "the interpreter is for tests: backend='auto' runs CPU tensors on the CPU backends"
        return None

    def row_losses(self, batch: Batch, tree: Tree, rho: float) -> Tensor:
        x = batch.x
        tt = TritonTreeTensors.cached(tree, x.device)
        soft = batch.soft.detach() if batch.soft is not None else None
        if not graph_tracing():
            apply: Callable[..., Tensor] = _TritonRowsFunction.apply  # torch leaves Function.apply untyped
            rows = apply(x, batch.labels, soft, tt, float(rho), bool(batch.from_logits), int(batch.ignore_index))
            return rows.to(x.dtype)
        need_grad = torch.is_grad_enabled() and x.requires_grad
        loss: Tensor  # the custom operator's __call__ is untyped (CustomOpDef)
        loss, _ = triton_tree_rows(
            x, batch.labels, soft,
            tt.node_class, tt.node_end, tt.node_w, tt.class_pos, tt.end_order, tt.ended,
            float(rho), bool(batch.from_logits), int(batch.ignore_index), need_grad,
        )  # fmt: skip
        return loss.to(x.dtype)
