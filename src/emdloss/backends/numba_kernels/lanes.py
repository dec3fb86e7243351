"""Eight-row SIMD "lanes" for the fused kernels: a numba type whose values are LLVM ``<8 x double>`` vectors.

A tree sweep does one dependent add per node (``mass[parent] += mass[child]``), so one row at a time is bound
by latency. The lane kernels therefore sweep :data:`LANES` rows together, every per-node quantity stored as
``LANES`` consecutive float64 values (``buf[k * LANES + l]`` for row ``l``) and held in a :data:`lanes`
value: one vector, so that an add over eight rows is one instruction pair on AVX2 (one on AVX-512), not
eight. numba has no vector type of its own and leaves LLVM's SLP vectoriser off, so eight scalars (a
tuple) stay eight instructions; this module gives numba the vector type and the few operations the
kernels use, as ``@intrinsic`` functions emitting plain LLVM IR. The IR is target-independent: LLVM splits
or fuses the vector to the machine's registers (SSE, AVX2, AVX-512, NEON).

Operations: ``+``, ``-``, ``*`` (lanes with lanes or a float), :func:`lanes_fill`, :func:`lanes_load`,
:func:`lanes_store`, :func:`lanes_abs`, :func:`lanes_clamp_unit`, :func:`lanes_one_hot`, :func:`lanes_map`
(any scalar function, lane by lane), and the transposes :func:`lanes_columns` / :func:`lanes_store_columns`,
which move an 8 x 8 block between eight row-major rows and eight lanes values with in-register shuffles
(24 shuffles per 64 values instead of 64 scalar loads or stores).

None of these check bounds: the kernels size their buffers for them.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import models, overload, register_model

from .simd import FASTMATH, compiled_intrinsic
from .tree_arrays import LANES  # :data:`lanes` holds this many float64 values

_FLAGS = tuple(sorted(FASTMATH))  # the scalar kernels' flags, for the vector arithmetic
_F64 = ir.DoubleType()
_I32 = ir.IntType(32)
_VEC = ir.VectorType(_F64, LANES)


class Lanes(types.Type):
    """numba type of LANES float64 values held as one LLVM vector."""

    def __init__(self) -> None:
        super().__init__(name="Lanes")


lanes = Lanes()


@register_model(Lanes)
class _LanesModel(models.PrimitiveModel):
    def __init__(self, dmm: Any, fe_type: Lanes) -> None:  # dmm: numba's DataModelManager
        super().__init__(dmm, fe_type, _VEC)  # type: ignore[no-untyped-call]  # numba's data models are unannotated


def _index(i: int) -> ir.Constant:
    return ir.Constant(_I32, i)


def _splat(builder: ir.IRBuilder, value: ir.Value) -> ir.Value:
    vec = builder.insert_element(ir.Constant(_VEC, ir.Undefined), value, _index(0))
    return builder.shuffle_vector(vec, vec, ir.Constant(ir.VectorType(_I32, LANES), [0] * LANES))


def _shuffle(builder: ir.IRBuilder, a: ir.Value, b: ir.Value, mask: Sequence[int]) -> ir.Value:
    return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_I32, LANES), mask))


def _vector_pointer(
    context: Any, builder: ir.IRBuilder, array_type: types.Array, array: ir.Value, index: ir.Value, vector_type: ir.Type
) -> ir.Value:
    """Pointer to ``array[index]`` (a 1-D contiguous array), typed as a pointer to ``vector_type``."""
    data = context.make_array(array_type)(context, builder, array).data
    return builder.bitcast(builder.gep(data, [index]), vector_type.as_pointer())


def _is_flat(array: types.Type, dtypes: tuple[types.Type, ...]) -> bool:
    return isinstance(array, types.Array) and array.ndim == 1 and array.layout == "C" and array.dtype in dtypes


# ---------------------------------------------------------------------- making and storing lanes


@compiled_intrinsic
def lanes_fill(typingctx, value):  # pragma: no cover - compiled
    """Every lane = ``value`` (a number, converted to float64)."""
    if not isinstance(value, (types.Float, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        return _splat(builder, context.cast(builder, args[0], signature.args[0], types.float64))

    return lanes(value), codegen


@compiled_intrinsic
def lanes_load(typingctx, array, base):  # pragma: no cover - compiled
    """``array[base : base + LANES]`` (float64, 1-D contiguous) as lanes."""
    if not _is_flat(array, (types.float64,)):
        return None

    def codegen(context, builder, signature, args):
        return builder.load(_vector_pointer(context, builder, signature.args[0], args[0], args[1], _VEC), align=8)

    return lanes(array, base), codegen


@compiled_intrinsic
def lanes_store(typingctx, array, base, value):  # pragma: no cover - compiled
    """``array[base : base + LANES] = value`` (float64, 1-D contiguous)."""
    if not _is_flat(array, (types.float64,)) or value != lanes:
        return None

    def codegen(context, builder, signature, args):
        builder.store(args[2], _vector_pointer(context, builder, signature.args[0], args[0], args[1], _VEC), align=8)
        return context.get_dummy_value()

    return types.none(array, base, value), codegen


@compiled_intrinsic
def lanes_to_tuple(typingctx, value):  # pragma: no cover - compiled
    """The lanes as a tuple of LANES float64 scalars."""
    tuple_type = types.UniTuple(types.float64, LANES)
    if value != lanes:
        return None

    def codegen(context, builder, signature, args):
        out = cgutils.get_null_value(context.get_value_type(tuple_type))
        for lane in range(LANES):
            out = builder.insert_value(out, builder.extract_element(args[0], _index(lane)), lane)
        return out

    return tuple_type(value), codegen


@compiled_intrinsic
def lanes_from_tuple(typingctx, values):  # pragma: no cover - compiled
    """Lanes from a tuple of LANES numbers."""
    if not (isinstance(values, types.UniTuple) and values.count == LANES):
        return None

    def codegen(context, builder, signature, args):
        vec = ir.Constant(_VEC, ir.Undefined)
        for lane in range(LANES):
            scalar = context.cast(builder, builder.extract_value(args[0], lane), signature.args[0].dtype, types.float64)
            vec = builder.insert_element(vec, scalar, _index(lane))
        return vec

    return lanes(values), codegen


@compiled_intrinsic
def lanes_one_hot(typingctx, k, labels):  # pragma: no cover - compiled
    """1.0 in the lanes whose ``labels[l]`` (a tuple of LANES integers) equals ``k``, else 0.0: one vector
    compare (the label vector is loop-invariant, so LLVM builds it once)."""
    if not (isinstance(labels, types.UniTuple) and labels.count == LANES and isinstance(labels.dtype, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        ints = ir.VectorType(ir.IntType(64), LANES)
        label_vec = ir.Constant(ints, ir.Undefined)
        for lane in range(LANES):
            label = context.cast(builder, builder.extract_value(args[1], lane), signature.args[1].dtype, types.int64)
            label_vec = builder.insert_element(label_vec, label, _index(lane))
        k_vec = builder.insert_element(
            ir.Constant(ints, ir.Undefined), context.cast(builder, args[0], signature.args[0], types.int64), _index(0)
        )
        k_vec = builder.shuffle_vector(k_vec, k_vec, ir.Constant(ir.VectorType(_I32, LANES), [0] * LANES))
        hit = builder.icmp_signed("==", label_vec, k_vec)
        return builder.select(hit, _splat(builder, ir.Constant(_F64, 1.0)), _splat(builder, ir.Constant(_F64, 0.0)))

    return lanes(k, labels), codegen


# ---------------------------------------------------------------------- arithmetic


def _binary(instruction: str) -> Callable[..., Any]:
    @compiled_intrinsic
    def operation(typingctx, a, b):  # pragma: no cover - compiled
        if a != lanes or b != lanes:
            return None

        def codegen(context, builder, signature, args):
            return getattr(builder, instruction)(args[0], args[1], flags=_FLAGS)

        return lanes(a, b), codegen

    return operation


_add, _sub, _mul = _binary("fadd"), _binary("fsub"), _binary("fmul")


def _overload_binary(op: Callable[[Any, Any], Any], implementation: Callable[..., Any]) -> None:
    @overload(op)
    def _lanes_op(a, b):
        if a == lanes and b == lanes:
            return lambda a, b: implementation(a, b)
        if a == lanes and isinstance(b, (types.Float, types.Integer)):
            return lambda a, b: implementation(a, lanes_fill(b))
        if isinstance(a, (types.Float, types.Integer)) and b == lanes:
            return lambda a, b: implementation(lanes_fill(a), b)
        return None


for _op, _impl in ((operator.add, _add), (operator.sub, _sub), (operator.mul, _mul)):
    _overload_binary(_op, _impl)


@compiled_intrinsic
def lanes_abs(typingctx, value):  # pragma: no cover - compiled
    """|value| lane by lane (``llvm.fabs``)."""
    if value != lanes:
        return None

    def codegen(context, builder, signature, args):
        fabs = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VEC, [_VEC]), "llvm.fabs.v8f64")
        return builder.call(fabs, [args[0]])

    return lanes(value), codegen


@compiled_intrinsic
def lanes_clamp_unit(typingctx, value):  # pragma: no cover - compiled
    """min(max(value, -1), 1) lane by lane, by compare and select (NaN stays NaN)."""
    if value != lanes:
        return None

    def codegen(context, builder, signature, args):
        one, minus_one = _splat(builder, ir.Constant(_F64, 1.0)), _splat(builder, ir.Constant(_F64, -1.0))
        x = builder.select(builder.fcmp_ordered(">", args[0], one), one, args[0])
        return builder.select(builder.fcmp_ordered("<", x, minus_one), minus_one, x)

    return lanes(value), codegen


@njit(inline="always")
def lanes_map(f, v, w, rho):  # pragma: no cover - compiled
    """``f(v[l], w, rho)`` lane by lane, for scalar functions with no vector form (``pow``)."""
    t = lanes_to_tuple(v)
    return lanes_from_tuple((
        f(t[0], w, rho), f(t[1], w, rho), f(t[2], w, rho), f(t[3], w, rho),
        f(t[4], w, rho), f(t[5], w, rho), f(t[6], w, rho), f(t[7], w, rho),
    ))  # fmt: skip


# ---------------------------------------------------------------------- 8 x 8 transposes
# The classic AVX sequence, written as generic shuffles: interleave pairs of rows, then pairs of pairs, then
# the 128-bit halves. Each mask indexes the concatenation of its two operands.

_UNPACK_LO, _UNPACK_HI = [0, 8, 1, 9, 4, 12, 5, 13], [2, 10, 3, 11, 6, 14, 7, 15]
_PAIRS_LO, _PAIRS_HI = [0, 1, 8, 9, 4, 5, 12, 13], [2, 3, 10, 11, 6, 7, 14, 15]
_HALVES_LO, _HALVES_HI = [0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15]


def _transpose(builder: ir.IRBuilder, rows: Sequence[ir.Value]) -> list[ir.Value]:
    """The 8 x 8 transpose of eight 8-vectors (row r, element c -> vector c, element r)."""
    unpacked = []
    for r in range(0, 8, 2):
        unpacked += [
            _shuffle(builder, rows[r], rows[r + 1], _UNPACK_LO),
            _shuffle(builder, rows[r], rows[r + 1], _UNPACK_HI),
        ]
    quads = []
    for base in (0, 4):
        lo01, hi01, lo23, hi23 = unpacked[base : base + 4]
        quads += [
            _shuffle(builder, lo01, lo23, _PAIRS_LO),
            _shuffle(builder, lo01, lo23, _PAIRS_HI),
            _shuffle(builder, hi01, hi23, _PAIRS_LO),
            _shuffle(builder, hi01, hi23, _PAIRS_HI),
        ]
    return [_shuffle(builder, quads[c], quads[c + 4], _HALVES_LO) for c in range(4)] + [
        _shuffle(builder, quads[c], quads[c + 4], _HALVES_HI) for c in range(4)
    ]


def _row_pointers(
    context: Any, builder: ir.IRBuilder, signature: Any, args: Sequence[ir.Value], vector_type: ir.Type
) -> list[ir.Value]:
    """Pointers to ``array[offsets[l] + j]`` for the eight rows l (args: array, offsets, j, ...)."""
    pointers = []
    for lane in range(LANES):
        offset = context.cast(builder, builder.extract_value(args[1], lane), signature.args[1].dtype, types.intp)
        index = builder.add(offset, context.cast(builder, args[2], signature.args[2], types.intp))
        pointers.append(_vector_pointer(context, builder, signature.args[0], args[0], index, vector_type))
    return pointers


def _columns_args_ok(array: types.Type, offsets: types.Type) -> bool:
    return (
        _is_flat(array, (types.float32, types.float64))
        and isinstance(offsets, types.UniTuple)
        and offsets.count == LANES
        and isinstance(offsets.dtype, types.Integer)
    )


@compiled_intrinsic
def lanes_columns(typingctx, array, offsets, j):  # pragma: no cover - compiled
    """Columns ``j .. j+7`` of eight rows of a flat row-major array (row l starts at ``offsets[l]``), as a tuple
    of eight lanes values: entry c holds ``array[offsets[l] + j + c]`` in lane l, widened to float64."""
    result = types.UniTuple(lanes, LANES)
    if not _columns_args_ok(array, offsets):
        return None

    def codegen(context, builder, signature, args):
        element = context.get_data_type(signature.args[0].dtype)
        pointers = _row_pointers(context, builder, signature, args, ir.VectorType(element, LANES))
        columns = _transpose(
            builder, [builder.load(ptr, align=element.get_abi_alignment(context.target_data)) for ptr in pointers]
        )
        if signature.args[0].dtype == types.float32:
            columns = [builder.fpext(column, _VEC) for column in columns]
        return context.make_tuple(builder, result, columns)

    return result(array, offsets, j), codegen


@compiled_intrinsic
def lanes_store_columns(typingctx, array, offsets, j, columns):  # pragma: no cover - compiled
    """The inverse of :func:`lanes_columns`: ``array[offsets[l] + j + c] = columns[c][l]`` (rounded to the
    array's dtype)."""
    if not (_columns_args_ok(array, offsets) and columns == types.UniTuple(lanes, LANES)):
        return None

    def codegen(context, builder, signature, args):
        element = context.get_data_type(signature.args[0].dtype)
        vector_type = ir.VectorType(element, LANES)
        columns = [builder.extract_value(args[3], c) for c in range(LANES)]
        if signature.args[0].dtype == types.float32:
            columns = [builder.fptrunc(column, vector_type) for column in columns]
        rows = _transpose(builder, columns)
        for row, ptr in zip(rows, _row_pointers(context, builder, signature, args, vector_type)):
            builder.store(row, ptr, align=element.get_abi_alignment(context.target_data))
        return context.get_dummy_value()

    return types.none(array, offsets, j, columns), codegen
