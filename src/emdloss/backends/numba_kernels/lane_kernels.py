"""Kernels that sweep LANES = 8 rows at a time, every per-node value one SIMD vector of lanes (:mod:`.lanes`):
one instruction per node and operation for eight rows, whose dependent adds overlap. The default for
batches of 8 rows and more (:func:`lanes_pay_off`). The sweeps are those of :mod:`.one_row`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, cast

import numpy as np
from numba import njit, prange

from . import threads as kernel_threads
from .lanes import (
    lanes_abs,
    lanes_clamp_unit,
    lanes_columns,
    lanes_fill,
    lanes_load,
    lanes_map,
    lanes_one_hot,
    lanes_store,
    lanes_store_columns,
    lanes_to_tuple,
)
from .row_ops import (
    BAD_LABEL,
    IGNORED,
    _cost_pow,
    _cost_rho1,
    _cost_rho2,
    _dcost_pow,
    _dcost_rho1,
    _dcost_rho2,
    _finish_gradient,
    _label,
    _probabilities,
    _skip_row,
)
from .simd import FASTMATH, kernel_njit
from .tree_arrays import LANES, padded_width

# The lane code below is unrolled by hand for eight lanes (tuples of 8, _row_offsets, the 8 x 8 transposes of
# .lanes): LANES cannot change without rewriting it.
assert LANES == 8

# ---------------------------------------------------------------------- LANES rows at a time
# The same sweeps over blocks of LANES rows, every per-node value one ``lanes`` vector (see .lanes). Classes
# go through in column blocks of LANES: an in-register transpose turns LANES rows x LANES classes of
# probabilities into LANES lanes values, and back for the gradient. The per-thread scratch rows (p, g) and
# the class arrays (slot, leaf_w, chain spacing) are padded to a multiple of LANES classes: padding classes
# have probability 0 and sit at the root on an edge of length 0, so they add nothing.

# Lane cost pairs: the scalar pairs above, one vector instruction per operation where there is one.


@njit(inline="always")
def _lanes_cost_rho1(f, w, rho):  # pragma: no cover
    return w * lanes_abs(f)


@njit(inline="always")
def _lanes_dcost_rho1(f, w, rho):  # pragma: no cover
    return w * lanes_clamp_unit(f * 1e308)  # _sign, lane by lane


@njit(inline="always")
def _lanes_cost_rho2(f, w, rho):  # pragma: no cover
    return w * (f * f)


@njit(inline="always")
def _lanes_dcost_rho2(f, w, rho):  # pragma: no cover
    return (2.0 * w) * f


@njit(inline="always")
def _lanes_cost_pow(f, w, rho):  # pragma: no cover
    return lanes_map(_cost_pow, f, w, rho)


@njit(inline="always")
def _lanes_dcost_pow(f, w, rho):  # pragma: no cover
    return lanes_map(_dcost_pow, f, w, rho)


@njit(inline="always")
def _row_offsets(stride):  # pragma: no cover
    return (0, stride, 2 * stride, 3 * stride, 4 * stride, 5 * stride, 6 * stride, 7 * stride)


@njit(inline="always")
def _target_columns(q_flat, q_offsets, jb, n_cls, tail):  # pragma: no cover
    """``lanes_columns`` of the soft targets (rows of ``n_cls``, not padded): the last, partial block through
    ``tail`` (LANES x LANES scratch), zero past ``n_cls``, so that no read leaves the array."""
    if jb + LANES <= n_cls:
        return lanes_columns(q_flat, q_offsets, jb)
    for lane in range(LANES):
        for c in range(LANES):
            tail[lane * LANES + c] = q_flat[q_offsets[lane] + jb + c] if jb + c < n_cls else 0.0
    return lanes_columns(tail, _row_offsets(LANES), 0)


# One compiled block per tree kind and exponent class, each a separate function, not inlined into the kernel:
# LLVM's time grows faster than linearly with function size, and six inlined copies took minutes to compile.
# A call compiles only the block it runs (see block_markers). The factories close over the cost functions rather
# than taking them as arguments of one ``inline="always"`` block: numba's inliner copies a block's IR at every
# call site, about 0.5 s of each first compile. The blocks are called only from compiled code, so numba builds
# neither of its wrappers for them (``no_cpython_wrapper``, ``no_cfunc_wrapper``): another 0.1-0.3 s.


def _chain_block(cost: Callable[..., Any], dcost: Callable[..., Any]) -> Callable[..., Any]:
    """The chain block for one lane cost pair (:func:`_lanes_cost_rho1` ...)."""

    @kernel_njit(fastmath=FASTMATH, no_cpython_wrapper=True, no_cfunc_wrapper=True)
    def block(p, q_flat, q_offsets, labels, n_cls, spacing, rho, need_grad, h, g, tail, soft):  # pragma: no cover
        """Losses (a LANES tuple) of LANES rows whose probabilities are ``p[lane * W : lane * W + C]`` (W = the padded
        width, ``spacing.shape[0]``). With ``need_grad``, ``g[lane * W + j]`` <- dL/dp_j of row lane; ``h`` (W * LANES)
        is scratch. ``spacing[0]`` is 0: no edge below class 0. ``soft``: True for distribution targets (rows of
        ``q_flat``), None for class indices (``labels``); a compile-time marker, so each compiles only its own code.
        ``cost``, ``dcost``: the block's lane cost pair (closed over, see :func:`_chain_block`)."""
        width = spacing.shape[0]
        offsets = _row_offsets(width)
        suffix = lanes_fill(0.0)
        total = lanes_fill(0.0)
        for jb in range(width - LANES, -1, -LANES):
            cols = lanes_columns(p, offsets, jb)
            if soft is not None:
                q_cols = _target_columns(q_flat, q_offsets, jb, n_cls, tail)
            for c in range(LANES - 1, -1, -1):
                k = jb + c
                if soft is not None:
                    suffix = suffix + (cols[c] - q_cols[c])
                else:
                    suffix = suffix + (cols[c] - lanes_one_hot(k, labels))
                total = total + cost(suffix, spacing[k], rho)
                if need_grad:
                    lanes_store(h, k * LANES, dcost(suffix, spacing[k], rho))
        if need_grad:  # dL/dp_k = sum of h over the edges 1..k: a prefix sum
            acc = lanes_fill(0.0)
            for jb in range(0, width, LANES):
                g0 = acc + lanes_load(h, jb * LANES)
                g1 = g0 + lanes_load(h, (jb + 1) * LANES)
                g2 = g1 + lanes_load(h, (jb + 2) * LANES)
                g3 = g2 + lanes_load(h, (jb + 3) * LANES)
                g4 = g3 + lanes_load(h, (jb + 4) * LANES)
                g5 = g4 + lanes_load(h, (jb + 5) * LANES)
                g6 = g5 + lanes_load(h, (jb + 6) * LANES)
                acc = g6 + lanes_load(h, (jb + 7) * LANES)
                lanes_store_columns(g, offsets, jb, (g0, g1, g2, g3, g4, g5, g6, acc))
        return lanes_to_tuple(total)

    return cast("Callable[..., Any]", block)  # a numba dispatcher


def _tree_block(
    cost: Callable[..., Any],
    dcost: Callable[..., Any],
    scalar_cost: Callable[..., Any],
    scalar_dcost: Callable[..., Any],
) -> Callable[..., Any]:
    """The tree block for one lane cost pair and its scalar twin (:func:`.row_ops._cost_rho1` ...)."""

    @kernel_njit(fastmath=FASTMATH, no_cpython_wrapper=True, no_cfunc_wrapper=True)
    def block(
        p, q_flat, q_offsets, labels, n_cls, slot, leaf_w, parent, weight, rho, need_grad, mass, h, g, tail, dots, soft
    ):  # pragma: no cover
        """Losses (a LANES tuple) of LANES rows whose probabilities are ``p[lane * W : lane * W + C]`` (W = the padded
        width, ``slot.shape[0]``). ``cost``, ``dcost`` (closed over, see :func:`_chain_block`): the block's lane cost
        pair; ``scalar_cost``, ``scalar_dcost``: the same pair for one number (:mod:`.row_ops`), for the class-index
        corrections. With ``need_grad``, ``g[lane * W + j]`` <- dL/dp_j of row lane. ``mass`` (I * LANES),
        ``h`` (W * LANES), ``tail`` (LANES * LANES) and ``dots`` (LANES) are scratch. A class-index target's -1
        is added at its label after the class pass, so that pass reads no target for them. ``soft``: as in
        :func:`_chain_block`."""
        width = slot.shape[0]
        n_int = parent.shape[0]
        offsets = _row_offsets(width)
        mass[:] = 0.0
        total = lanes_fill(0.0)
        for jb in range(0, width, LANES):
            cols = lanes_columns(p, offsets, jb)
            if soft is not None:
                q_cols = _target_columns(q_flat, q_offsets, jb, n_cls, tail)
            for c in range(LANES):
                j = jb + c
                d = cols[c] - q_cols[c] if soft is not None else cols[c]
                s = slot[j] * LANES
                lanes_store(mass, s, lanes_load(mass, s) + d)
                total = total + cost(d, leaf_w[j], rho)
                if need_grad:
                    lanes_store(h, j * LANES, dcost(d, leaf_w[j], rho))
        if soft is None:  # the -1 of each row's one-hot target, at its label
            lanes_store(dots, 0, total)
            for lane in range(LANES):
                y = labels[lane]
                if y >= 0:
                    py = float(p[lane * width + y])
                    mass[slot[y] * LANES + lane] -= 1.0
                    dots[lane] += scalar_cost(py - 1.0, leaf_w[y], rho) - scalar_cost(py, leaf_w[y], rho)
                    if need_grad:
                        h[y * LANES + lane] = scalar_dcost(py - 1.0, leaf_w[y], rho)
            total = lanes_load(dots, 0)
        for k in range(n_int - 1, 0, -1):
            s = parent[k] * LANES
            lanes_store(mass, s, lanes_load(mass, s) + lanes_load(mass, k * LANES))
        lanes_store(mass, 0, lanes_fill(0.0))  # mass becomes G: the sum of dcost over the edges up to the root
        for k in range(1, n_int):
            f = lanes_load(mass, k * LANES)
            total = total + cost(f, weight[k], rho)
            lanes_store(mass, k * LANES, lanes_load(mass, parent[k] * LANES) + dcost(f, weight[k], rho))
        if need_grad:  # dL/dp_j in lanes: the leaf edge's part plus G of the node above (written out: an inlined
            # helper would be copied eight times by numba's inliner, which is slow to compile)
            for jb in range(0, width, LANES):
                lanes_store_columns(g, offsets, jb, (
                    lanes_load(h, jb * LANES) + lanes_load(mass, slot[jb] * LANES),
                    lanes_load(h, (jb + 1) * LANES) + lanes_load(mass, slot[jb + 1] * LANES),
                    lanes_load(h, (jb + 2) * LANES) + lanes_load(mass, slot[jb + 2] * LANES),
                    lanes_load(h, (jb + 3) * LANES) + lanes_load(mass, slot[jb + 3] * LANES),
                    lanes_load(h, (jb + 4) * LANES) + lanes_load(mass, slot[jb + 4] * LANES),
                    lanes_load(h, (jb + 5) * LANES) + lanes_load(mass, slot[jb + 5] * LANES),
                    lanes_load(h, (jb + 6) * LANES) + lanes_load(mass, slot[jb + 6] * LANES),
                    lanes_load(h, (jb + 7) * LANES) + lanes_load(mass, slot[jb + 7] * LANES),
                ))  # fmt: skip
        return lanes_to_tuple(total)

    return cast("Callable[..., Any]", block)  # a numba dispatcher


_chain_rho1 = _chain_block(_lanes_cost_rho1, _lanes_dcost_rho1)
_chain_rho2 = _chain_block(_lanes_cost_rho2, _lanes_dcost_rho2)
_chain_pow = _chain_block(_lanes_cost_pow, _lanes_dcost_pow)
_tree_rho1 = _tree_block(_lanes_cost_rho1, _lanes_dcost_rho1, _cost_rho1, _dcost_rho1)
_tree_rho2 = _tree_block(_lanes_cost_rho2, _lanes_dcost_rho2, _cost_rho2, _dcost_rho2)
_tree_pow = _tree_block(_lanes_cost_pow, _lanes_dcost_pow, _cost_pow, _dcost_pow)


#: The six block functions, in the order of the kernel's ``use_*`` arguments (see :func:`block_markers`).
BLOCKS = ("chain_rho1", "chain_rho2", "chain_pow", "tree_rho1", "tree_rho2", "tree_pow")


@functools.lru_cache(maxsize=64)
def block_markers(chain: bool, rho: float) -> tuple[bool | None, ...]:
    """The kernel's six ``use_*`` arguments for a call: True for the block it needs, None for the others.

    numba removes ``if arg is not None`` branches at compile time when ``arg`` is None, so each signature of
    :func:`_lanes_kernel` compiles one block, not six: the first call compiles about a sixth of the code, and
    each compiled variant is cached on disk under its own signature."""
    kind = "chain" if chain else "tree"
    exponent = "rho1" if rho == 1.0 else "rho2" if rho == 2.0 else "pow"
    wanted = f"{kind}_{exponent}"
    return tuple(True if name == wanted else None for name in BLOCKS)


@kernel_njit(cache=True, nogil=True, fastmath=FASTMATH, no_cfunc_wrapper=True)
def _lanes_kernel(
    first,
    end,
    x,
    q,
    y,
    ignore_index,
    from_logits,
    need_grad,
    scale,
    loss,
    grad,
    chain,
    slot,
    leaf_w,
    parent,
    weight,
    rho,
    use_chain_rho1,
    use_chain_rho2,
    use_chain_pow,
    use_tree_rho1,
    use_tree_rho2,
    use_tree_pow,
    soft_targets,
):  # pragma: no cover
    """Row blocks ``[first, end)`` (rows ``LANES * first`` to ``LANES * end``), on the calling thread. For a chain ``weight`` holds the
    spacing. ``slot``, ``leaf_w`` and the spacing are padded to W, a multiple of LANES (see ``padded_width``).
    The ``use_*`` arguments (:func:`block_markers`) name the one block function this call runs, and
    ``soft_targets`` (True for distribution targets ``q``, None for class indices ``y``) the half of it.

    Lanes past the last row repeat it; ignored rows and bad labels are computed against no target (their
    outputs are then overwritten).
    """
    n, n_cls = x.shape
    width = weight.shape[0] if chain else slot.shape[0]
    q_flat = q.ravel()
    p = np.zeros(LANES * width, dtype=x.dtype)  # the padding stays 0
    g = np.empty(LANES * width if need_grad else 0, dtype=np.float64)  # every block writes all of it
    h = np.empty(LANES * width if need_grad else 0, dtype=np.float64)
    mass = np.empty(0 if chain else LANES * parent.shape[0], dtype=np.float64)
    tail = np.empty(LANES * LANES, dtype=q.dtype)
    labels = np.empty(LANES, dtype=np.int64)
    q_rows = np.empty(LANES, dtype=np.int64)
    dots = np.empty(LANES, dtype=np.float64)
    for b in range(first, end):
        for lane in range(LANES):
            i = b * LANES + lane
            if i >= n:  # lanes past the last row repeat it (no min(): see row_ops._sign)
                i = n - 1
            labels[lane] = _label(y, i, n_cls, ignore_index)
            q_rows[lane] = (i if q.shape[0] > 1 else 0) * n_cls
            _probabilities(x, i, from_logits, p, lane * width)
        lab = (labels[0], labels[1], labels[2], labels[3], labels[4], labels[5], labels[6], labels[7])
        q_offsets = (q_rows[0], q_rows[1], q_rows[2], q_rows[3], q_rows[4], q_rows[5], q_rows[6], q_rows[7])
        chain_args = (p, q_flat, q_offsets, lab, n_cls, weight, rho, need_grad, h, g, tail, soft_targets)
        tree_args = (p, q_flat, q_offsets, lab, n_cls, slot, leaf_w, parent, weight, rho, need_grad)
        scratch = (mass, h, g, tail, dots, soft_targets)
        total = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
        if use_chain_rho1 is not None:
            total = _chain_rho1(*chain_args)
        if use_chain_rho2 is not None:
            total = _chain_rho2(*chain_args)
        if use_chain_pow is not None:
            total = _chain_pow(*chain_args)
        if use_tree_rho1 is not None:
            total = _tree_rho1(*tree_args, *scratch)
        if use_tree_rho2 is not None:
            total = _tree_rho2(*tree_args, *scratch)
        if use_tree_pow is not None:
            total = _tree_pow(*tree_args, *scratch)
        rows_left = n - b * LANES
        for lane in range(LANES if rows_left > LANES else rows_left):
            i = b * LANES + lane
            if labels[lane] == IGNORED or labels[lane] == BAD_LABEL:
                _skip_row(i, labels[lane], need_grad, loss, grad)
                continue
            loss[i] = total[lane]
            if need_grad:
                _finish_gradient(p, lane * width, g[lane * width : lane * width + n_cls], from_logits, scale, grad, i)


@kernel_njit(parallel=True, cache=True, nogil=True, no_cfunc_wrapper=True)
def _lanes_parallel(
    n_blocks,
    threads,
    x,
    q,
    y,
    ignore_index,
    from_logits,
    need_grad,
    scale,
    loss,
    grad,
    chain,
    slot,
    leaf_w,
    parent,
    weight,
    rho,
    use_chain_rho1,
    use_chain_rho2,
    use_chain_pow,
    use_tree_rho1,
    use_tree_rho2,
    use_tree_pow,
    soft_targets,
):  # pragma: no cover
    """:func:`_lanes_kernel` over blocks ``[0, n_blocks)``, one chunk per thread (see :mod:`.threads`)."""
    for t in prange(threads):
        _lanes_kernel(
            t * n_blocks // threads,
            (t + 1) * n_blocks // threads,
            x,
            q,
            y,
            ignore_index,
            from_logits,
            need_grad,
            scale,
            loss,
            grad,
            chain,
            slot,
            leaf_w,
            parent,
            weight,
            rho,
            use_chain_rho1,
            use_chain_rho2,
            use_chain_pow,
            use_tree_rho1,
            use_tree_rho2,
            use_tree_pow,
            soft_targets,
        )


#: Lane-kernel scratch that is always acceptable, whatever the input's size (cache-sized; see lanes_pay_off).
LANES_SCRATCH_FLOOR = 1 << 20


#: Fewer classes than this go one row at a time: with so little work per row the lanes' transposes and scratch
#: cost more than they save (kernel alone, batch 32: 6.8 vs 5.6 us for a 5-class chain, 8.8 vs 4.7 us for a
#: 10-class tree; about even at 256 rows; lanes ahead from 20 classes on trees, 50 on chains).
LANES_MIN_CLASSES = 16


def lanes_pay_off(n_rows: int, n_cls: int, n_internal: int, itemsize: int) -> bool:
    """Whether the LANES-row kernel is used: for at least LANES rows of at least :data:`LANES_MIN_CLASSES` classes, when its scratch (per thread, LANES rows
    of probabilities and of float64 gradients, and per-class and internal-node lanes) is at most the input's
    size or at most ``LANES_SCRATCH_FLOOR`` (1 MiB). Otherwise one row at a time: fewer than LANES rows (the
    lanes would repeat the last row), or small batches of huge trees (the scratch would outweigh the input).

    Measured on the ImageNet tree, rho = 2, 2 threads (``python -m emdloss_lab.bench.profile_fused --kernel``): the kernel
    takes 0.06 ms for a batch of 64 through the lanes and 0.26 ms one row at a time; 0.02 and 0.04 ms at 8."""
    if n_rows < LANES or n_cls < LANES_MIN_CLASSES:
        return False
    threads = min(kernel_threads.threads(), -(-n_rows // LANES))
    scratch = threads * LANES * (padded_width(n_cls) * (itemsize + 16) + n_internal * 8)
    return scratch <= max(n_rows * n_cls * itemsize, LANES_SCRATCH_FLOOR)
