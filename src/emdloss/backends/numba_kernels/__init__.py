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

import functools
import warnings
from collections.abc import Callable, Hashable
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


def disable_lane_kernels(exc: BaseException) -> None:
    """Use the one-row kernel from now on, after warning once why."""
    _lanes_state["module"] = None
    warnings.warn(
        f"emdloss: the 8-row SIMD kernels are unavailable ({type(exc).__name__}: {exc}); using the one-row "
        "kernel (same results, slower on large batches)",
        BackendWarning,
        stacklevel=3,
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
    n, c = x.shape
    loss = np.empty(n, dtype=x.dtype)  # summed in float64 in the kernels, rounded once
    grad = np.empty((n, c) if need_grad else (0, c), dtype=x.dtype)
    if n == 0:
        return loss, grad if need_grad else None
    y = labels if labels is not None else np.empty(0, dtype=np.int64)
    if soft is None and rho == 1.0 and c <= DISTANCE_MATRIX_MAX_CLASSES:
        dist, depth = distance_rows(tree, x.dtype)
        args: tuple[object, ...] = (x, y, ignore_index, dist, depth, from_logits, need_grad, scale, loss, grad)
        variant: Hashable = (x.dtype.char, from_logits, need_grad)
        _run(one_row._distance_kernel, one_row._distance_parallel, n, n * c, *args, variant=variant)
        return loss, grad if need_grad else None
    q = soft if soft is not None else zero_row(c, x.dtype)
    if tree.is_chain:
        arrays = (_EMPTY_INT, _EMPTY_FLOAT, _EMPTY_INT, chain_spacing(tree))  # no leaf edges, no internal nodes
    else:
        it = InternalTree.cached(tree)
        arrays = (it.slot, it.leaf_w, it.parent, it.weight)
    args = (
        x,
        q,
        y,
        ignore_index,
        from_logits,
        need_grad,
        scale,
        loss,
        grad,
        tree.is_chain,
        *arrays,
        float(rho),
    )
    work = n * (c + arrays[2].shape[0])
    lanes = load_lane_kernels()
    if lanes is not None and lanes.lanes_pay_off(n, c, arrays[2].shape[0], x.itemsize):
        try:
            n_blocks = -(-n // lanes.LANES)
            markers = (*lanes.block_markers(tree.is_chain, rho), True if soft is not None else None)
            variant = (markers, x.dtype.char, from_logits, need_grad)
            threads.run_rows(
                lanes._lanes_kernel, lanes._lanes_parallel, n_blocks, work, *args, *markers, variant=variant
            )
            return loss, grad if need_grad else None
        except Exception as exc:  # the kernels raise nothing at run time: this is a compilation failure
            disable_lane_kernels(exc)
    sweep = one_row.sweep_markers(tree.is_chain)
    _run(
        one_row._rows_kernel,
        one_row._rows_parallel,
        n,
        work,
        *args,
        *sweep,
        variant=(sweep, x.dtype.char, soft is None, from_logits, need_grad),
    )
    return loss, grad if need_grad else None


def _run(
    kernel: Callable[..., None],
    parallel: Callable[..., None],
    n_rows: int,
    work: int,
    *args: object,
    variant: Hashable,
) -> None:
    """Run a one-row kernel over the rows; a failure (compilation: the kernels raise nothing at run time) is a
    KernelFailure."""
    try:
        threads.run_rows(kernel, parallel, n_rows, work, *args, variant=variant)
    except Exception as exc:
        raise KernelFailure(f"{type(exc).__name__}: {exc}") from exc


_EMPTY_INT = np.empty(0, dtype=np.int64)
_EMPTY_FLOAT = np.empty(0, dtype=np.float64)


@functools.lru_cache(maxsize=32)
def zero_row(n_cls: int, dtype: np.dtype) -> np.ndarray:
    """A (1, C) row of zeros: the "distribution" part of class-index targets (see :mod:`.row_ops`)."""
    return np.zeros((1, n_cls), dtype=dtype)
