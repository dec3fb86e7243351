"""Reference backend ("torch"): the DFS-interval closed form in plain torch ops. Runs on any device, under
``torch.compile`` and ``torch.func``, and differentiates with respect to soft targets too.

With the tree's nodes in depth-first pre-order, the nodes below edge ``e`` are the positions
``[lo_e, hi_e)``. For mass differences ``d = p - q`` placed at their classes' positions and
``c = cumsum([0, d])``:

    f_e  = c[hi_e] - c[lo_e]                                  flows, (N, E)
    L    = sum_e w_e |f_e|^rho                                 loss, (N,)
    h_e  = rho * w_e * sign(f_e) * |f_e|^(rho - 1)             dL/df_e
    dL/dd_j = sum_{e: lo_e <= j < hi_e} h_e = cumsum(A)[j],    A = +h_e at lo_e, -h_e at hi_e

Cumulative sums run in float64, whatever the input dtype, so long chains lose no precision to
cancellation (``c`` is a running sum of terms of both signs). Cost: O(N * nodes) time and memory,
a handful of passes; the fused CPU backend (:mod:`.fused_cpu`) does the same in one pass per row.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import numpy as np
import torch
from torch import Tensor

from .._inputs import Batch, functorch_active
from ..tree import Tree
from .base import Backend, loss_weights

ACC_DTYPE = torch.float64


@dataclass(frozen=True)
class TreeTensors:
    """The index tensors of a tree on one device (all 1-D).

    class_pos: (C,) DFS position of each class. edge_lo / edge_hi: (E,) the position range below each
    edge, edges ordered as ``tree.edge_nodes``. edge_w: (E,) float64 edge lengths as the loss weighs them
    (:func:`.base.loss_weights`).
    """

    num_nodes: int
    class_pos: Tensor
    edge_lo: Tensor
    edge_hi: Tensor
    edge_w: Tensor

    @staticmethod
    def from_tree(tree: Tree, device: torch.device | str | None = None) -> TreeTensors:
        lo = tree.position[tree.edge_nodes]
        arrays = {
            "class_pos": tree.position[tree.classes],
            "edge_lo": lo,
            "edge_hi": tree.subtree_end[lo],
            "edge_w": loss_weights(tree)[tree.edge_nodes],
        }
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in arrays.items()}
        return TreeTensors(num_nodes=tree.num_nodes, **tensors)

    @staticmethod
    def cached(tree: Tree, device: torch.device) -> TreeTensors:
        """The tensors of ``tree`` on ``device``, built once per tree and device (one host-to-device copy, on the
        first call) and then reused: a call copies nothing and reads nothing back, so it never synchronises.

        Under ``torch.compile`` they come from :func:`_graph_constants`: dynamo runs it eagerly and keeps its
        result as constants of the graph (guarded on the tree's identity), so the compiled graph holds no
        per-call copy or tree-array work. Inside ``torch.func`` transforms they are built with functorch
        disabled (a factory call there returns a tensor wrapped at the transform's level, which fails once the
        level is gone). Whatever a tracer makes of them (``torch.export``'s fake tensors) is never cached
        (:meth:`emdloss.Tree.cached`).
        """
        if torch.compiler.is_compiling():
            return _graph_constants(tree, device)
        return _cached_tensors(tree, device)


def _cached_tensors(tree: Tree, device: torch.device) -> TreeTensors:
    with _plain_tensors():
        return tree.cached(("reference", str(device)), lambda: TreeTensors.from_tree(tree, device))


_F = TypeVar("_F", bound=Callable[..., Any])


def _assume_constant(fn: _F) -> _F:
    """``torch.compiler.assume_constant_result``: the function then runs eagerly while dynamo traces, and its
    result is a constant of the graph. That decorator imports ``torch._dynamo`` (and triton with it, where
    installed), which ``import emdloss`` must not; when dynamo is not loaded yet, set the one attribute the
    decorator sets instead (tests/test_tracing.py checks that compiled graphs still take them as constants)."""
    if "torch._dynamo" in sys.modules:
        # torch leaves the decorator unannotated (``def assume_constant_result(fn)``); it returns ``fn`` itself,
        # marked, so it is typed here as what it does.
        assume: Callable[[_F], _F] = torch.compiler.assume_constant_result
        return assume(fn)
    fn._dynamo_marked_constant = True  # type: ignore[attr-defined]
    return fn


@_assume_constant
def _graph_constants(tree: Tree, device: torch.device) -> TreeTensors:
    """The cached tensors as seen by ``torch.compile``: run eagerly at trace time, so they are real tensors,
    cached, and the graph reads them as constants. Under ``torch.export`` (non-strict), which runs Python itself
    under a fake mode, this is a plain call: an eager call's cached tensors become constants of the exported
    program, or fake ones are built there and not cached."""
    return _cached_tensors(tree, device)


def _plain_tensors() -> contextlib.AbstractContextManager[None]:
    """A context in which new tensors are plain, not wrapped by an active ``torch.func`` transform."""
    disable = getattr(torch._C, "_DisableFuncTorch", None)
    return disable() if disable is not None else contextlib.nullcontext()


def scatter_to_positions(d: Tensor, tt: TreeTensors) -> Tensor:
    """(N, C) class values -> (N, num_nodes + 1) float64, shifted one right: column ``pos + 1``."""
    z = d.new_zeros((d.shape[0], tt.num_nodes + 1), dtype=ACC_DTYPE)
    z[:, 1:].index_copy_(1, tt.class_pos, d.to(ACC_DTYPE))
    return z


def edge_flows(d: Tensor, tt: TreeTensors) -> Tensor:
    """(N, C) mass differences -> (N, E) float64 flows ``f_e`` (mass of d below each edge)."""
    c = scatter_to_positions(d, tt).cumsum(1)
    return c.index_select(1, tt.edge_hi) - c.index_select(1, tt.edge_lo)


def flow_gradient(h: Tensor, tt: TreeTensors) -> Tensor:
    """Adjoint of :func:`edge_flows`: (N, E) per-edge sensitivities -> (N, C) ``sum_{e above j} h_e``."""
    a = h.new_zeros((h.shape[0], tt.num_nodes + 1))
    a.index_add_(1, tt.edge_lo, h)
    a.index_add_(1, tt.edge_hi, h, alpha=-1)
    return a.cumsum(1).index_select(1, tt.class_pos)


def edge_cost(f: Tensor, w: Tensor, rho: float) -> Tensor:
    """(N, E) flows -> (N,) ``sum_e w_e |f_e|^rho``."""
    a = f.abs()
    if rho != 1.0:
        a = a.square() if rho == 2.0 else a.pow(rho)
    return a @ w


def edge_cost_grad(f: Tensor, w: Tensor, rho: float) -> Tensor:
    """(N, E) flows -> (N, E) ``d/df_e of w_e |f_e|^rho`` (0 at f_e = 0 for rho = 1: a subgradient)."""
    if rho == 1.0:
        return f.sign() * w
    if rho == 2.0:
        return 2.0 * f * w
    return rho * f.sign() * f.abs().pow(rho - 1.0) * w


class _ReferenceEMDFunction(torch.autograd.Function):
    """``d (M, C) -> (sum_e w_e |f_e(d)|^rho (M,), flows f (M, E))`` with the closed-form backward above.

    Differentiate ``d = p - q`` outside (softmax included), so this one Function serves logits,
    probabilities, hard and soft targets. The flows are a second, non-differentiable output so that
    ``setup_context`` can save them (the form ``torch.func`` transforms need); ``vmap`` folds the vmapped
    dimension into the rows, since every row is independent.

    Higher derivatives: when the backward itself is differentiated (``create_graph=True``,
    ``torch.func.hessian``), it recomputes the flows from ``d`` in differentiable torch ops instead of using the
    saved ones, so second derivatives are exact (rho > 1; 0 almost everywhere for rho = 1). Forward mode
    (``torch.func.jvp``, ``jacfwd``) is :class:`_ReferenceEMDFunctionWithJvp`.
    """

    @staticmethod
    def forward(d: Tensor, tt: TreeTensors, rho: float) -> tuple[Tensor, Tensor]:
        f = edge_flows(d, tt)
        return edge_cost(f, tt.edge_w, rho).to(d.dtype), f

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        d, tt, rho = inputs
        f = output[1]
        ctx.mark_non_differentiable(f)
        ctx.save_for_backward(d, f)
        ctx.save_for_forward(f)
        ctx.tt, ctx.rho, ctx.dtype = tt, rho, d.dtype

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor, _grad_f: Tensor | None) -> tuple[Tensor | None, None, None]:
        d, f = ctx.saved_tensors
        if torch.is_grad_enabled() or functorch_active():  # the backward is being differentiated
            f = edge_flows(d, ctx.tt)
        h = edge_cost_grad(f, ctx.tt.edge_w, ctx.rho) * grad_out.to(ACC_DTYPE)[:, None]
        return flow_gradient(h, ctx.tt).to(ctx.dtype), None, None

    @staticmethod
    def vmap(info: Any, in_dims: tuple[int | None, ...], d: Tensor, tt: TreeTensors, rho: float) -> Any:
        return _vmap_rows(_ReferenceEMDFunction, in_dims, d, tt, rho)


class _ReferenceEMDFunctionWithJvp(_ReferenceEMDFunction):
    """The same Function with a forward-mode rule, used inside ``torch.func`` transforms (``jacfwd``,
    ``hessian``, ``jvp``) and ``torch.autograd.forward_ad``. Kept apart because ``torch.compile`` cannot trace
    a Function that defines ``jvp``."""

    @staticmethod
    def jvp(ctx: Any, d_t: Tensor, _tt_t: None, _rho_t: None) -> tuple[Tensor, None]:
        (f,) = ctx.saved_tensors  # in jvp: what setup_context saved for forward
        f_t = edge_flows(d_t, ctx.tt)
        return (edge_cost_grad(f, ctx.tt.edge_w, ctx.rho) * f_t).sum(-1).to(ctx.dtype), None

    @staticmethod
    def vmap(info: Any, in_dims: tuple[int | None, ...], d: Tensor, tt: TreeTensors, rho: float) -> Any:
        return _vmap_rows(_ReferenceEMDFunctionWithJvp, in_dims, d, tt, rho)


def _vmap_rows(
    function: type[torch.autograd.Function], in_dims: tuple[int | None, ...], d: Tensor, tt: TreeTensors, rho: float
) -> Any:
    """The vmap rule of both Functions: rows are independent, so the vmapped dimension folds into them."""
    apply: Callable[..., Any] = function.apply
    if in_dims[0] is None:
        return apply(d, tt, rho), (None, None)
    d = d.movedim(in_dims[0], 0)
    b = d.shape[0]
    loss, f = apply(d.reshape(-1, d.shape[-1]), tt, rho)
    return (loss.reshape(b, -1), f.reshape(b, -1, f.shape[-1])), (0, 0)


def _forward_mode_possible() -> bool:
    """Inside a torch.func transform or a torch.autograd.forward_ad dual level."""
    return functorch_active() or torch.autograd.forward_ad._current_level >= 0


class _FlowsFunction(torch.autograd.Function):
    """Linear map d (M, C) -> flows (M, E); its adjoint is :func:`flow_gradient`. In the ``setup_context``
    form with a ``vmap`` rule, so ``torch.func`` transforms work."""

    @staticmethod
    def forward(d: Tensor, tt: TreeTensors) -> Tensor:
        return edge_flows(d, tt)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        d, tt = inputs
        ctx.tt, ctx.dtype = tt, d.dtype

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return flow_gradient(grad.to(ACC_DTYPE), ctx.tt).to(ctx.dtype), None

    @staticmethod
    def vmap(info: Any, in_dims: tuple[int | None, ...], d: Tensor, tt: TreeTensors) -> Any:
        apply: Callable[..., Tensor] = _FlowsFunction.apply
        if in_dims[0] is None:
            return apply(d, tt), None
        d = d.movedim(in_dims[0], 0)
        b = d.shape[0]
        f = apply(d.reshape(-1, d.shape[-1]), tt)
        return f.reshape(b, -1, f.shape[-1]), 0


def differentiable_flows(d: Tensor, tree: Tree) -> Tensor:
    """(M, C) mass differences -> (M, E) flows in ``d``'s dtype, differentiable (for :func:`emdloss.functional.flows`)."""
    apply: Callable[..., Tensor] = _FlowsFunction.apply
    return apply(d, TreeTensors.cached(tree, d.device)).to(d.dtype)


class ReferenceBackend(Backend):
    """The closed form in torch ops: any device, any autograd use, ``torch.compile`` and ``torch.func``."""

    name = "torch"

    def unavailable(self) -> str | None:
        return None

    def cannot_run(self, batch: Batch) -> str | None:
        return None

    def row_losses(self, batch: Batch, tree: Tree, rho: float) -> Tensor:
        x = batch.x
        tt = TreeTensors.cached(tree, x.device)
        compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        p = torch.softmax(x.to(compute), dim=1) if batch.from_logits else x.to(compute)
        if batch.soft is not None:
            d = p - batch.soft.to(compute)
        else:
            labels = cast(Tensor, batch.labels)  # a Batch holds labels or soft targets
            if batch.keep is not None:
                labels = torch.where(batch.keep, labels, 0)
            d = p - torch.zeros_like(p).scatter(1, labels[:, None], 1.0)  # one_hot reads values: no vmap
        function = _ReferenceEMDFunctionWithJvp if _forward_mode_possible() else _ReferenceEMDFunction
        apply: Callable[..., tuple[Tensor, Tensor]] = function.apply
        loss = apply(d, tt, rho)[0]
        if batch.keep is not None:
            loss = loss * batch.keep
        return loss.to(x.dtype)
