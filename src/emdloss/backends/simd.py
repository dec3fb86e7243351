"""Building blocks for the fused CPU kernels: a vectorisable float32 ``exp`` and eight-row "lanes".

**Lanes.** A tree sweep does one dependent add per node (``mass[parent] += mass[child]``), so one row at a
time is bound by latency, not arithmetic. The kernels therefore sweep :data:`LANES` rows together: every
per-node quantity is stored as ``LANES`` consecutive float64 values (``buf[k * LANES + l]`` for row ``l``) and
handled as a tuple of ``LANES`` scalars. A tuple is a value, not memory, so the lanes stay in registers with
no aliasing question between them, and the eight independent chains of adds overlap in the CPU's pipeline.
(They run as scalar instructions: numba leaves LLVM's SLP vectoriser off, and turning it on did not help.)
The helpers below spell the eight lanes out, since numba cannot build tuples in a loop.

**exp.** numba's ``math.exp`` is a libm call per element, about five times slower than torch's vectorised
softmax. :func:`exp_f32` is Cephes' ``expf`` (range reduction by ln 2, a degree-6 polynomial, the power of
two built in the float's exponent bits): pure arithmetic that LLVM vectorises, within 3e-7 relative error,
exactly 0 below -87.3 (so ``-inf`` logits give probability 0, as in ``torch.softmax``) and NaN for NaN.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

#: Rows swept together by the lane kernels; the tuple helpers below are written for exactly this many.
LANES = 8

#: Arithmetic flags: reassociation lets LLVM vectorise sums and maxima. No ``nnan``/``ninf``: NaN and inf
#: must propagate, since a NaN loss is how bad logits are detected.
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}

_EXP_MIN = np.float32(-87.33654)  # exp of anything below underflows float32


@intrinsic
def _float_from_bits(typingctx, bits, like):  # pragma: no cover - compiled
    """The float of ``like``'s type (float32 or float64) whose bits are the low bits of the integer ``bits``:
    a reinterpretation, no conversion. (numba widens int32 arithmetic to int64, hence the truncation.)"""
    width = 32 if like == types.float32 else 64
    llvm_float = ir.FloatType() if width == 32 else ir.DoubleType()

    def codegen(context, builder, signature, args):
        value = args[0]
        if bits.bitwidth > width:
            value = builder.trunc(value, ir.IntType(width))
        return builder.bitcast(value, llvm_float)

    return like(bits, like), codegen


@njit(inline="always", fastmath=FASTMATH)
def exp_f32(x):  # pragma: no cover - compiled
    """``exp(x)`` for float32 ``x <= 0`` (softmax arguments), Cephes ``expf``: x = n ln2 + r, |r| <= ln2/2."""
    xc = max(x, _EXP_MIN)
    n = np.floor(xc * np.float32(1.4426950408889634) + np.float32(0.5))
    r = xc - n * np.float32(0.693359375) - n * np.float32(-2.12194440e-4)  # ln 2 in two parts: exact n*hi
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * r * r + r + np.float32(1.0)
    e = p * _float_from_bits((np.int32(n) + np.int32(127)) << np.int32(23), p)
    return np.float32(0.0) if x < _EXP_MIN else e


@njit(inline="always")
def exp_f64(x):  # pragma: no cover - compiled
    """``exp`` for float64 rows: libm, exact to the last bit (float64 inputs are rare and ask for precision)."""
    return math.exp(x)


# ---------------------------------------------------------------------- lanes: tuples of LANES scalars


@njit(inline="always")
def lanes_fill(v):  # pragma: no cover - compiled
    return (v, v, v, v, v, v, v, v)


@njit(inline="always")
def lanes_load(a, base):  # pragma: no cover - compiled
    """``a[base : base + LANES]`` as float64 lanes."""
    return (
        float(a[base]), float(a[base + 1]), float(a[base + 2]), float(a[base + 3]),
        float(a[base + 4]), float(a[base + 5]), float(a[base + 6]), float(a[base + 7]),
    )  # fmt: skip


@njit(inline="always")
def lanes_gather(a, offsets, j):  # pragma: no cover - compiled
    """``a[offsets[l] + j]`` for each lane, as float64: column ``j`` of LANES rows of a flat row-major array."""
    return (
        float(a[offsets[0] + j]), float(a[offsets[1] + j]), float(a[offsets[2] + j]), float(a[offsets[3] + j]),
        float(a[offsets[4] + j]), float(a[offsets[5] + j]), float(a[offsets[6] + j]), float(a[offsets[7] + j]),
    )  # fmt: skip


@njit(inline="always")
def lanes_store(a, base, v):  # pragma: no cover - compiled
    a[base] = v[0]
    a[base + 1] = v[1]
    a[base + 2] = v[2]
    a[base + 3] = v[3]
    a[base + 4] = v[4]
    a[base + 5] = v[5]
    a[base + 6] = v[6]
    a[base + 7] = v[7]


@njit(inline="always")
def lanes_scatter(a, rows, j, v):  # pragma: no cover - compiled
    """``a[rows[l], j] = v[l]`` for each lane: column ``j`` of LANES rows of a 2-D array."""
    a[rows[0], j] = v[0]
    a[rows[1], j] = v[1]
    a[rows[2], j] = v[2]
    a[rows[3], j] = v[3]
    a[rows[4], j] = v[4]
    a[rows[5], j] = v[5]
    a[rows[6], j] = v[6]
    a[rows[7], j] = v[7]


@njit(inline="always")
def lanes_add(u, v):  # pragma: no cover - compiled
    return (u[0] + v[0], u[1] + v[1], u[2] + v[2], u[3] + v[3], u[4] + v[4], u[5] + v[5], u[6] + v[6], u[7] + v[7])


@njit(inline="always")
def lanes_sub(u, v):  # pragma: no cover - compiled
    return (u[0] - v[0], u[1] - v[1], u[2] - v[2], u[3] - v[3], u[4] - v[4], u[5] - v[5], u[6] - v[6], u[7] - v[7])


@njit(inline="always")
def lanes_map(f, v, w, rho):  # pragma: no cover - compiled
    """``f(v[l], w, rho)`` for each lane (the per-edge cost or its derivative)."""
    return (
        f(v[0], w, rho), f(v[1], w, rho), f(v[2], w, rho), f(v[3], w, rho),
        f(v[4], w, rho), f(v[5], w, rho), f(v[6], w, rho), f(v[7], w, rho),
    )  # fmt: skip


@njit(inline="always")
def lanes_one_hot(j, y):  # pragma: no cover - compiled
    """1.0 in the lanes whose class label ``y[l]`` is ``j``, else 0.0."""
    return (
        1.0 if y[0] == j else 0.0, 1.0 if y[1] == j else 0.0, 1.0 if y[2] == j else 0.0, 1.0 if y[3] == j else 0.0,
        1.0 if y[4] == j else 0.0, 1.0 if y[5] == j else 0.0, 1.0 if y[6] == j else 0.0, 1.0 if y[7] == j else 0.0,
    )  # fmt: skip


def row_max(row):  # pragma: no cover - replaced by the overload below inside compiled code
    """``max`` of a contiguous float32 or float64 row, vectorised through the integers: LLVM does not
    vectorise a float maximum without ``nnan`` on the comparison, which numba does not set. Flipping the
    non-sign bits of negative floats makes their integer order the float order, and an integer maximum
    vectorises. A positive NaN wins (and makes the row NaN downstream); a negative one may lose, but stays
    NaN through the exp."""
    raise NotImplementedError("row_max is only callable from numba-compiled code")


@njit(inline="always")
def _max_through_ints(row, bits, lowest, shift, magnitude):  # pragma: no cover - compiled
    """max(row) from ``bits``, its integer view: see :func:`row_max`."""
    top = lowest
    for j in range(bits.shape[0]):
        b = bits[j]
        top = max(top, b ^ ((b >> shift) & magnitude))
    return _float_from_bits(top ^ ((top >> shift) & magnitude), row[0])


@overload(row_max, inline="always")
def _row_max_overload(row):
    if row.dtype == types.float32:
        return lambda row: _max_through_ints(row, row.view(np.int32), np.int32(-(2**31)), np.int32(31), np.int32(2**31 - 1))
    return lambda row: _max_through_ints(row, row.view(np.int64), np.int64(-(2**63)), np.int64(63), np.int64(2**63 - 1))


def row_exp(x):  # pragma: no cover - replaced by the overload below inside compiled code
    """``exp`` of a softmax argument in the row's own precision: :func:`exp_f32` or :func:`exp_f64`."""
    raise NotImplementedError("row_exp is only callable from numba-compiled code")


@overload(row_exp, inline="always")
def _row_exp_overload(x):
    if x == types.float32:
        return lambda x: exp_f32(x)
    return lambda x: exp_f64(x)
