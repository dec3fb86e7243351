"""Vectorisable row operations for the fused softmax: a float32 ``exp`` and a row maximum.

**exp.** numba's ``math.exp`` is a libm call per element, about five times slower than torch's vectorised
softmax. :func:`exp_f32` is Cephes' ``expf`` (range reduction by ln 2, a degree-6 polynomial, the power of
two built in the float's exponent bits): pure arithmetic that LLVM vectorises, within 3e-7 relative error,
exactly 0 below -87.3 (so ``-inf`` logits give probability 0, as in ``torch.softmax``) and NaN for NaN.

**max.** :func:`row_max` goes through the integers, where a maximum vectorises (see its docstring).

The eight-row lanes of the tree sweeps are in :mod:`.lanes`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, cast

import numpy as np
import numpy.typing as npt
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

#: Arithmetic flags: reassociation lets LLVM vectorise sums and maxima. No ``nnan``/``ninf``: NaN and inf
#: must propagate, since a NaN loss is how bad logits are detected.
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}

#: ``numba.njit`` for the kernels that take the CPU target's wrapper options (``no_cfunc_wrapper``,
#: ``no_cpython_wrapper``), which numba's type stubs do not list.
kernel_njit: Callable[..., Any] = njit

_EXP_MIN = np.float32(-87.33654)  # exp of anything below underflows float32


def compiled_intrinsic(typing: Callable[..., Any]) -> Callable[..., Any]:
    """numba's ``@intrinsic``, typed as compiled code calls it: without the typing context. (numba's own stub
    gives the call the typing function's signature, typing context included, and the result ``Never``: a type
    checker saw every call one argument short, and the code after it unreachable.)"""
    return cast("Callable[..., Any]", intrinsic(typing))


@compiled_intrinsic
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


@compiled_intrinsic
def _bits_of_float(typingctx, x):  # pragma: no cover - compiled
    """The bits of the float ``x`` (float32 or float64) as a signed integer of the same width: a
    reinterpretation, no conversion. (Cheaper to compile than an integer view of the array.)"""
    width = 32 if x == types.float32 else 64

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(width))

    return (types.int32 if width == 32 else types.int64)(x), codegen


@njit(inline="always", fastmath=FASTMATH)
def exp_f32(x):  # pragma: no cover - compiled
    """``exp(x)`` for float32 ``x <= 0`` (softmax arguments), Cephes ``expf``: x = n ln2 + r, |r| <= ln2/2."""
    xc = _EXP_MIN if x < _EXP_MIN else x  # max(x, _EXP_MIN), NaN kept (see _sign on why no max)
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


def row_max(row: npt.NDArray[np.floating[Any]]) -> float:  # pragma: no cover - the overload below in compiled code
    """``max`` of a contiguous float32 or float64 row, vectorised through the integers: LLVM does not
    vectorise a float maximum without ``nnan`` on the comparison, which numba does not set. Flipping the
    non-sign bits of negative floats makes their integer order the float order, and an integer maximum
    vectorises. A positive NaN wins (and makes the row NaN downstream); a negative one may lose, but stays
    NaN through the exp."""
    raise NotImplementedError("row_max is only callable from numba-compiled code")


@njit(inline="always")
def _max_through_ints(row, lowest, shift, magnitude):  # pragma: no cover - compiled
    """max(row) through the integer bits of its elements: see :func:`row_max`."""
    top = lowest
    for j in range(row.shape[0]):
        b = _bits_of_float(row[j])
        ordered = b ^ ((b >> shift) & magnitude)
        top = ordered if ordered > top else top  # max(top, ordered)
    return _float_from_bits(top ^ ((top >> shift) & magnitude), row[0])


@overload(row_max, inline="always")
def _row_max_overload(row):
    if row.dtype == types.float32:
        return lambda row: _max_through_ints(row, np.int32(-(2**31)), np.int32(31), np.int32(2**31 - 1))
    return lambda row: _max_through_ints(row, np.int64(-(2**63)), np.int64(63), np.int64(2**63 - 1))


def row_exp(x: float) -> float:  # pragma: no cover - replaced by the overload below inside compiled code
    """``exp`` of a softmax argument in the row's own precision: :func:`exp_f32` or :func:`exp_f64`."""
    raise NotImplementedError("row_exp is only callable from numba-compiled code")


@overload(row_exp, inline="always")
def _row_exp_overload(x):
    if x == types.float32:
        return lambda x: exp_f32(x)
    return lambda x: exp_f64(x)
