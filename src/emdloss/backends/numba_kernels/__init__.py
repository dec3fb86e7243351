"""Fused CPU kernels (numba): softmax, flows, loss and gradient of each row in one kernel call.

The reference backend touches the whole (M, nodes) batch a dozen times; these kernels do each row while it
sits in cache. :func:`tree_rows` chooses one of three:

- :mod:`.lane_kernels`: blocks of LANES = 8 rows, every per-node value one SIMD vector (:mod:`.lanes`); the
  default from 8 rows up (:func:`.lane_kernels.lanes_pay_off`).
- :mod:`.one_row` ``_rows_kernel``: one row at a time, for smaller batches and small batches of huge trees.
- :mod:`.one_row` ``_distance_kernel``: hard targets with rho = 1 and at most
  :data:`DISTANCE_MATRIX_MAX_CLASSES` classes: ``sum_j p_j D[j, y]`` (the expected tree distance to the true
  class), one dot product per row with the cached distance matrix.

All three compute the softmax themselves (:func:`.simd.exp_f32` keeps it vectorised), read class indices raw
(``ignore_index`` rows: loss 0, gradient 0; out-of-range ones: loss NaN, never an out-of-bounds read) and
write the gradient times ``scale``, so that the autograd Function around them does no work of its own.

The kernels are compiled with ``cache=True`` (numba's disk cache: ``tests/test_first_use.py`` checks that every
compiled variant loads back) and ``no_cfunc_wrapper=True``: they are never passed as first-class functions, so
the C-function wrapper numba otherwise builds would only add to each first compile.

The lane kernels rest on numba's extension API (:mod:`.lanes`); if they fail to import or compile, a
:class:`~emdloss.backends.base.BackendWarning` says so once and the one-row kernel takes their batches. If
that fails too, :class:`KernelFailure` tells the backend to hand the call to the reference backend.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable
from types import ModuleType

import numpy as np

from ...tree import Tree
from ..base import BackendWarning
from . import one_row, threads
from .tree_arrays import InternalTree, chain_spacing, distance_rows

#: Largest class count for which hard rho=1 targets use the cached C x C distance matrix (64 MiB float32).
DISTANCE_MATRIX_MAX_CLASSES = 4096


class KernelFailure(RuntimeError):
    """A one-row kernel could not be compiled or run on this machine."""


_lanes_state: dict[str, ModuleType | None] = {}  # "module": the lane kernels, or None once they failed


def load_lane_kernels() -> ModuleType | None:
    """The lane-kernel module, imported on first use; None (after one warning) if it cannot be."""
    if "module" not in _lanes_state:
        try:
            from . import lane_kernels as module
        except Exception as exc:  # numba's extension API changed, say: any failure, not only ImportError
            disable_lane_kernels(exc)
        else:
            _lanes_state["module"] = module
    return _lanes_state["module"]


def disable_lane_kernels(exc: BaseException, stacklevel: int = 3) -> None:
    """Use the one-row kernel from now on, after warning once why (``stacklevel``: as for ``warnings.warn``)."""
    _lanes_state["module"] = None
    warnings.warn(
        f"emdloss: the 8-row SIMD kernels are unavailable ({type(exc).__name__}: {exc}); using the one-row "
        "kernel (same results, slower on large batches)",
        BackendWarning,
        stacklevel=stacklevel,
    )


def tree_rows(
    x: np.ndarray,
    labels: np.ndarray | None,
    soft: np.ndarray | None,
    tree: Tree,
    rho: float,
    from_logits: bool,
    need_grad: bool,
    ignore_index: int = -100,
    scale: float = 1.0,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-row loss (N,) and, if ``need_grad``, ``scale`` * d loss_i / d x_i (N, C), both in x's dtype.

    Args:
        x: (N, C) float32/float64 C-contiguous logits (probabilities when not ``from_logits``).
        labels: (N,) int64 class indices, or None when ``soft`` (N, C) (x's dtype) is given.
        ignore_index: label whose rows get loss 0 and gradient 0.
    A label outside [0, C) (and not ``ignore_index``) gets a NaN loss, as do rows with NaN or +inf logits.
    Raises :class:`KernelFailure` if no kernel can run here.
    """
    return plan(tree, rho, x.dtype, soft is not None).rows(x, labels, soft, from_logits, need_grad, ignore_index, scale)


def plan(tree: Tree, rho: float, dtype: np.dtype, soft: bool) -> RowPlan:
    """The :class:`RowPlan` of ``tree``, ``rho``, the (numpy) ``dtype`` and the target kind, built once per tree."""
    return tree.cached(("numba_plan", rho, dtype.char, soft), lambda: RowPlan(tree, rho, dtype, soft))


class RowPlan:
    """The kernel arguments that depend only on the tree, rho, the dtype and the target kind (the tree's index
    arrays, the block markers...), gathered once and kept on the tree. A small batch whose serial kernel has run
    before goes straight to it: on a 128 x 10 batch each Python call between the loss and the kernel cost about
    0.1x cross-entropy's forward and backward."""

    def __init__(self, tree: Tree, rho: float, dtype: np.dtype, soft: bool) -> None:
        self.chain = tree.is_chain
        self.rho = float(rho)
        self.soft = soft
        self.distance: tuple[np.ndarray, np.ndarray] | None = None
        if not soft and rho == 1.0 and tree.num_classes <= DISTANCE_MATRIX_MAX_CLASSES:
            self.distance = distance_rows(tree, dtype)
        # the "distribution" part of class-index targets (see .row_ops)
        self.zero_row = np.zeros((1, tree.num_classes), dtype=dtype)
        if self.chain:  # no leaf edges, no internal nodes
            self.arrays = (_EMPTY_INT, _EMPTY_FLOAT, _EMPTY_INT, chain_spacing(tree))
        else:
            it = InternalTree.cached(tree)
            self.arrays = (it.slot, it.leaf_w, it.parent, it.weight)
        self.n_internal = self.arrays[2].shape[0]
        self.sweep = one_row.sweep_markers(self.chain)
        self.lane_markers: tuple[bool | None, ...] | None = None  # set when the lane kernel first runs
        self.serial_ready: set[Hashable] = set()  # (kernel, variant) whose serial kernel has run in this process

    def rows(
        self,
        x: np.ndarray,
        labels: np.ndarray | None,
        soft: np.ndarray | None,
        from_logits: bool,
        need_grad: bool,
        ignore_index: int = -100,
        scale: float = 1.0,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """:func:`tree_rows` for this plan's tree, rho, dtype and target kind."""
        n, c = x.shape
        loss = np.empty(n, dtype=x.dtype)  # summed in float64 in the kernels, rounded once
        grad = np.empty((n, c) if need_grad else (0, c), dtype=x.dtype)
        if n == 0:
            return loss, grad if need_grad else None
        y = labels if labels is not None else _EMPTY_INT
        if self.distance is not None:
            kernel, parallel, work = one_row._distance_kernel, one_row._distance_parallel, n * c
            args: tuple[object, ...] = (x, y, ignore_index, *self.distance, from_logits, need_grad, scale, loss, grad)
            variant: Hashable = (x.dtype.char, from_logits, need_grad)
        else:
            q = soft if soft is not None else self.zero_row
            args = (
                x, q, y, ignore_index, from_logits, need_grad, scale, loss, grad, self.chain, *self.arrays, self.rho
            )  # fmt: skip
            work = n * (c + self.n_internal)
            if self._ran_lanes(x, work, args, from_logits, need_grad):
                return loss, grad if need_grad else None
            kernel, parallel = one_row._rows_kernel, one_row._rows_parallel
            args = (*args, *self.sweep)
            variant = (self.sweep, x.dtype.char, soft is None, from_logits, need_grad)
        key = (kernel, variant)
        if work < threads.PARALLEL_MIN_WORK and key in self.serial_ready:  # straight to the compiled kernel
            kernel(0, n, *args)
            return loss, grad if need_grad else None
        try:
            threads.run_rows(kernel, parallel, n, work, *args, variant=variant)
        except Exception as exc:  # the kernels raise nothing at run time: this is a compilation failure
            raise KernelFailure(f"{type(exc).__name__}: {exc}") from exc
        self.serial_ready.add(key)
        return loss, grad if need_grad else None

    def _ran_lanes(
        self, x: np.ndarray, work: int, args: tuple[object, ...], from_logits: bool, need_grad: bool
    ) -> bool:
        """Run the lane kernel on ``args`` (the one-row kernel's, for the logits ``x``) if it pays off for this
        batch (:func:`.lane_kernels.lanes_pay_off`) and compiles; False if the one-row kernel should run instead."""
        lanes = load_lane_kernels()
        n, c = x.shape
        if lanes is None or not lanes.lanes_pay_off(n, c, self.n_internal, x.itemsize):
            return False
        if self.lane_markers is None:
            self.lane_markers = (*lanes.block_markers(self.chain, self.rho), True if self.soft else None)
        markers = self.lane_markers
        try:
            threads.run_rows(
                lanes._lanes_kernel, lanes._lanes_parallel, -(-n // lanes.LANES), work, *args, *markers,
                variant=(markers, x.dtype.char, from_logits, need_grad),
            )  # fmt: skip
        except Exception as exc:  # the kernels raise nothing at run time: this is a compilation failure
            disable_lane_kernels(exc, stacklevel=5)
            return False
        return True


_EMPTY_INT = np.empty(0, dtype=np.int64)
_EMPTY_FLOAT = np.empty(0, dtype=np.float64)
