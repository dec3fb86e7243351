"""Input normalisation shared by every loss: user tensors in, one checked :class:`Batch` of (M, C) rows out.

Cheap checks (ranks, shapes, dtypes, devices) always run. Checks that must read tensor values (class indices
in range, soft targets and probabilities that are distributions) run when ``validate`` is True, or, with the
default ``validate=None``, whenever the tensors live on the CPU and no ``torch.func`` transform is active,
since reading them there forces no device synchronisation. Finite logits are checked after the loss, from the
(M,) losses rather than the (M, C) input (:func:`emdloss._reduction.reduce_rows`). docs/bad-input.md lists
every check and its message. While ``torch.compile``, ``torch.export`` or ``make_fx`` trace a graph, nothing is
read on the host: the value checks become graph asserts (:func:`checks_in_graph`, :func:`assert_values`), so the
default ``validate=None`` traces without a graph break, and TorchScript is refused with a message naming them.

Every backend receives the same :class:`Batch`, whichever runs: nothing here depends on the backend.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
REDUCTIONS = ("none", "mean", "sum")
JIT_UNSUPPORTED = (
    "emdloss losses cannot be compiled or traced by TorchScript (torch.jit.script / torch.jit.trace): their Python "
    "autograd Functions, tree objects and host-side steps have no TorchScript form, and a trace would freeze "
    "the latter into constants. Use torch.compile(model) or torch.export.export(model, args) instead (both "
    "supported, see docs/workflows.md), or script/trace the model without the loss"
)


@dataclass(frozen=True)
class Batch:
    """A loss call's inputs after normalisation: M = N * d1 * ... * dk rows of C classes.

    Attributes:
        x: (M, C) logits, or probabilities when not ``from_logits``; a view of the input where possible.
        from_logits: whether a softmax over the classes turns ``x`` into probabilities.
        labels: (M,) int64 class indices as given (ignored rows hold ``ignore_index``), or None.
        soft: (M, C) target distributions, or None; exactly one of ``labels`` and ``soft`` is set.
        ignore_index: the label of rows that count for nothing (class-index targets only).
        keep: (M,) bool, True for rows that count; None when all do (always None for soft targets).
        num_kept: the number of rows that count: an int, or a 0-d tensor when counting it on the device
            would synchronise it.
        reduction: "none" | "mean" | "sum", applied by :func:`emdloss._reduction.reduce_rows`.
        out_shape: (N, d1, ..., dk), the shape of the unreduced loss.
        values_checked: the value checks ran (so a non-finite loss is diagnosed).
    """

    x: Tensor
    from_logits: bool
    labels: Tensor | None
    soft: Tensor | None
    ignore_index: int
    keep: Tensor | None
    num_kept: int | Tensor
    reduction: str
    out_shape: tuple[int, ...]
    values_checked: bool

    @property
    def row_weight(self) -> float | None:
        """The gradient each row's loss receives from the reduction in a plain ``loss.backward()``: 1 / kept
        rows for "mean", 1 otherwise; None where the count is a device tensor. Backends that compute the
        gradient in the forward pass scale it by this, so that the common case needs no pass in backward."""
        if self.reduction != "mean":
            return 1.0
        if isinstance(self.num_kept, Tensor):
            return None
        return 1.0 / self.num_kept if self.num_kept else 1.0


def normalise(
    input: Tensor,
    target: Tensor,
    num_classes: int,
    *,
    from_logits: bool,
    ignore_index: int,
    validate: bool | None,
    reduction: str,
) -> Batch:
    """Check ``input``/``target`` against ``torch.nn.CrossEntropyLoss``'s conventions and flatten them to rows.

    Args:
        input: (N, C) or (N, C, d1, ..., dk) floating logits (or probabilities if not ``from_logits``).
        target: (N,) / (N, d1, ..., dk) integer class indices, or a floating tensor of ``input``'s shape.
        num_classes: C expected by the tree or cost matrix.
        validate: read values to check them (None: on the CPU outside ``torch.func`` transforms); while a graph
            is traced they become graph asserts instead (:func:`checks_in_graph`).
    """
    check_reduction(reduction)
    if _jit_tracing():
        raise RuntimeError(JIT_UNSUPPORTED)
    if not -(2**63) <= ignore_index < 2**63:
        raise ValueError(f"ignore_index must fit in int64 (class indices are int64), got {ignore_index}")
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if input.dtype not in FLOAT_DTYPES:
        kind = "complex" if input.dtype.is_complex else ("integer" if not input.dtype.is_floating_point else "")
        raise TypeError(
            f"input must be a floating tensor (float16, bfloat16, float32 or float64), got {kind + ' ' if kind else ''}"
            f"dtype {input.dtype}; cast it with input.float()"
        )
    if input.dim() < 2:
        raise ValueError(
            f"input must have shape (N, C) or (N, C, d1, ..., dk) with C = {num_classes}, got shape {tuple(input.shape)}"
        )
    if input.shape[1] != num_classes:
        raise ValueError(
            f"input has {input.shape[1]} classes along dim 1 (shape {tuple(input.shape)}), but the tree has "
            f"{num_classes} classes"
        )
    if target.device != input.device:
        raise ValueError(f"input is on {input.device} but target is on {target.device}; move them to one device")

    spatial = input.dim() > 2
    out_shape = (input.shape[0], *input.shape[2:])
    x = _rows(input) if spatial else input
    values = should_validate(validate, input)

    def make_batch(labels: Tensor | None, soft: Tensor | None, keep: Tensor | None, num_kept: int | Tensor) -> Batch:
        # The fields both target kinds share, passed by name so that each keeps its type.
        return Batch(x=x, from_logits=bool(from_logits), labels=labels, soft=soft, ignore_index=int(ignore_index),
                     keep=keep, num_kept=num_kept, reduction=reduction, out_shape=out_shape,
                     values_checked=values)  # fmt: skip

    if target.dtype.is_floating_point:
        if target.shape != input.shape:
            raise ValueError(
                f"soft (floating) target must have input's shape {tuple(input.shape)}, got {tuple(target.shape)}; "
                "class-index targets must be an integer tensor"
            )
        soft = _rows(target) if spatial else target
        if values:
            check_distribution(soft, "target")
        batch = make_batch(labels=None, soft=soft, keep=None, num_kept=x.shape[0])
    elif target.dtype in INDEX_DTYPES:
        if target.shape != out_shape:
            raise ValueError(
                f"class-index target must have shape {out_shape} for input of shape {tuple(input.shape)}, "
                f"got {tuple(target.shape)}"
            )
        labels, keep, num_kept = _class_indices(target.reshape(-1), num_classes, int(ignore_index), values)
        batch = make_batch(labels=labels, soft=None, keep=keep, num_kept=num_kept)
    else:
        raise TypeError(
            f"target must be integer class indices (int64) or a floating distribution, got dtype {target.dtype}"
        )
    if values and x.numel() and not from_logits:
        check_distribution(x, "input (probabilities, from_logits=False)")
    elif not values and checks_in_graph(validate, input):
        assert_values(batch, num_classes)
    return batch


def _rows(t: Tensor) -> Tensor:
    """(N, C, d1, ..., dk) -> (N * d1 * ... * dk, C), classes last."""
    return t.movedim(1, -1).reshape(-1, t.shape[1])


def _class_indices(
    labels: Tensor, num_classes: int, ignore_index: int, values: bool
) -> tuple[Tensor, Tensor | None, int | Tensor]:
    """(M,) class indices -> (int64 indices, keep mask or None, number kept). With ``values``, an index outside
    [0, C) that is not ``ignore_index`` raises. On the CPU this runs in numpy: a few operations on M integers,
    each far cheaper there than a torch op's overhead."""
    if labels.device.type == "cpu" and not tracing():
        h = labels.numpy().astype(np.int64, copy=False)
        ignored = h == ignore_index
        n_ignored = int(np.count_nonzero(ignored))
        if values:
            check_labels(h, num_classes, ignore_index)
        keep = torch.from_numpy(~ignored) if n_ignored else None
        return (labels if labels.dtype == torch.int64 else torch.from_numpy(h)), keep, h.shape[0] - n_ignored
    labels = labels.long()
    keep = labels != ignore_index
    if values and labels.numel():
        bad = ((labels < 0) | (labels >= num_classes)) & keep
        if bool(bad.any()):
            raise ValueError(bad_label_message(int(labels[bad][0]), num_classes, ignore_index))
    return labels, keep, keep.sum()


def check_labels(labels: np.ndarray, num_classes: int, ignore_index: int) -> None:
    """Raise if a class index is outside [0, C) and not ``ignore_index``."""
    if not np.count_nonzero(labels.view(np.uint64) >= num_classes):  # negatives wrap to huge: one pass
        return
    bad = ((labels < 0) | (labels >= num_classes)) & (labels != ignore_index)
    if bad.any():
        raise ValueError(bad_label_message(int(labels[bad][0]), num_classes, ignore_index))


def bad_label_message(label: int, num_classes: int, ignore_index: int) -> str:
    return f"target contains class index {label}, outside [0, {num_classes}) (and not ignore_index={ignore_index})"


def sum_tolerance(dtype: torch.dtype) -> float:
    """How far a distribution's sum may be from 1: ``1e-4 + eps(dtype)``, whatever the number of classes.

    Sums are accumulated in float64 (float32 for half precision), so the only error left is each entry's own
    rounding to ``dtype``, at most ``eps / 2`` of the sum for non-negative entries: the bound is twice that, with
    a floor of 1e-4 for values rounded elsewhere. float32/float64: 1e-4; float16: 1.1e-3; bfloat16: 7.9e-3.
    """
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo(torch.float32).eps
    return 1e-4 + eps


def check_loss_scale(tree_weight_sum: float, dtype: torch.dtype, rho: float) -> None:
    """Raise if losses or gradients could overflow the compute dtype: a row's loss is at most the sum S of the
    tree's (loss) edge lengths, its gradient at most ``2 rho S`` (flows are at most 1 in magnitude)."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    bound = 2.0 * rho * tree_weight_sum
    if not bound < torch.finfo(compute).max:
        raise ValueError(
            f"the tree's edge lengths sum to {tree_weight_sum:.3g}: losses and gradients of {dtype} input could reach "
            f"{bound:.3g}, beyond {compute}'s largest value {torch.finfo(compute).max:.3g}; rescale the edge "
            "lengths (the loss is linear in them) or use float64 input"
        )


def check_distribution(t: Tensor, name: str) -> None:
    """Rows of ``t`` (M, C) must be finite, >= 0 and sum to 1 within :func:`sum_tolerance`."""
    if t.numel() == 0:
        return
    finite, low, worst = _distribution_stats(t.detach())
    if not finite:
        raise ValueError(f"{name} contains NaN or infinite values")
    if low < 0:
        raise ValueError(f"{name} has negative entries (min {low:.3g}); it must be a distribution")
    tol = sum_tolerance(t.dtype)
    if worst > tol:
        raise ValueError(f"{name} rows must sum to 1 (tolerance {tol:.2g}); the worst row is off by {worst:.3g}")


def _distribution_stats(t: Tensor) -> tuple[bool, float, float]:
    """(all finite, smallest entry or 0 if none is negative, largest |row sum - 1|) of ``t`` (M, C).

    A NaN or inf anywhere makes its row's sum non-finite, so row sums and the minimum are all that is read.
    CPU float32/float64 tensors go through one vectorised numba pass when numba works here (see
    :mod:`emdloss.backends.numba_kernels.stats` for why not torch there); others through two torch reductions.
    """
    if t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) and not tracing():
        try:
            from .backends.numba_kernels.stats import distribution_stats
        except Exception:  # numba missing or broken: the fused backend says so; torch checks the same
            pass
        else:
            return distribution_stats(t.contiguous().numpy())
    sums = t.sum(dim=-1, dtype=torch.float64)
    if not bool(torch.isfinite(sums).all()):
        return False, 0.0, 0.0
    return True, min(float(t.amin()), 0.0), float((sums - 1).abs().amax())


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_rho(rho: float) -> float:
    try:
        rho_f = float(rho)
    except (TypeError, ValueError):
        raise TypeError(f"rho must be a real number >= 1, got {rho!r}") from None
    if not (rho_f >= 1.0) or rho_f == float("inf"):
        raise ValueError(f"rho must be a finite number >= 1 (1: exact EMD, 2: relaxed), got {rho!r}")
    return rho_f


def should_validate(validate: bool | None, *tensors: Tensor) -> bool:
    """Whether value checks read ``tensors`` on the host: ``validate``, where None means on for CPU tensors outside
    ``torch.func`` transforms (value checks are data-dependent control flow, which ``vmap`` cannot trace). Never
    while a graph is traced (:func:`graph_tracing`): there :func:`checks_in_graph` says what replaces them."""
    if graph_tracing():
        return False
    if validate is None:
        return not functorch_active() and all(t.device.type == "cpu" for t in tensors)
    return bool(validate)


def checks_in_graph(validate: bool | None, *tensors: Tensor) -> bool:
    """Whether value checks become graph asserts (:func:`assert_values`): while ``torch.compile``,
    ``torch.export`` or ``make_fx`` trace (:func:`graph_tracing`), for CPU tensors with ``validate=None`` and on
    any device with ``validate=True``. On a GPU such an assert is a device-side assert (no synchronisation, but
    a failure ends the CUDA context), which ``validate=None`` does not impose."""
    if not graph_tracing():
        return False
    if validate is None:
        return all(t.device.type == "cpu" for t in tensors)
    return bool(validate)


def assert_values(batch: Batch, num_classes: int) -> None:
    """The value checks of :func:`normalise` as ``torch._assert_async`` graph asserts: no data-dependent Python
    control flow, so ``torch.compile(fullgraph=True)`` and ``torch.export`` trace them, and the compiled graph or
    exported program checks every call. A failure raises RuntimeError with the eager check's message, less the
    offending value (a graph cannot format it). Non-finite logits are checked on the input here, since the
    eager diagnosis from the losses (:func:`emdloss._reduction.check_finite_loss`) reads them on the host."""
    check = torch._assert_async
    if batch.labels is not None and batch.labels.numel():
        labels = batch.labels
        bad = ((labels < 0) | (labels >= num_classes)) & (labels != batch.ignore_index)
        check(~bad.any(), f"target contains a class index outside [0, {num_classes}) (and not ignore_index="
                          f"{batch.ignore_index})")  # fmt: skip
    named = [(batch.soft, "target")] if batch.soft is not None else []
    if not batch.from_logits:
        named.append((batch.x, "input (probabilities, from_logits=False)"))
    for t, name in named:
        if not t.numel():
            continue
        sums = t.sum(dim=-1, dtype=torch.float64)
        finite = torch.isfinite(sums)  # a NaN or inf anywhere makes its row's sum non-finite
        check(finite.all(), f"{name} contains NaN or infinite values")
        check(~(t < 0).any(), f"{name} has negative entries; it must be a distribution")
        tol = sum_tolerance(t.dtype)
        check(~(((sums - 1).abs() > tol) & finite).any(), f"{name} rows must sum to 1 (tolerance {tol:.2g})")
    if batch.from_logits and batch.x.numel():
        check(torch.isfinite(batch.x).all(), "input contains NaN or infinite logits")


def all_finite(x: Tensor) -> bool:
    """True if every entry is finite. One fast reduction; the exact elementwise test only if its sum is not
    finite (which a NaN/inf forces, and overflow of huge finite values may cause)."""
    if bool(torch.isfinite(x.sum())):
        return True
    return bool(torch.isfinite(x).all())


def functorch_active() -> bool:
    """True inside a torch.func transform (grad, vmap, ...); False on torch versions without the query."""
    return bool(_functorch_transforms_active())


_functorch_transforms_active: Callable[[], bool] = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)


def tracing() -> bool:
    """True while a graph is traced (:func:`graph_tracing`) or a torch.func transform is active: tensors then
    cannot go through numpy, and their values cannot be read without data-dependent control flow."""
    return graph_tracing() or functorch_active()


def graph_tracing() -> bool:
    """True under ``torch.compile`` (dynamo and its AOT tracing), ``torch.export`` (strict or not) and ``make_fx``
    or a ``FakeTensorMode``: tensors there may hold no data, and reading one is data-dependent control flow."""
    if torch.compiler.is_compiling():
        return True
    if not _DISPATCH_MODE_KEYS or not torch._C._len_torch_dispatch_stack():  # no mode at all: the common case
        return False
    return any(_get_dispatch_mode(key) is not None for key in _DISPATCH_MODE_KEYS)


_get_dispatch_mode: Callable[[Any], object] = getattr(torch._C, "_get_dispatch_mode", lambda key: None)
_DISPATCH_MODE_KEYS: tuple[Any, ...] = (
    (torch._C._TorchDispatchModeKey.FAKE, torch._C._TorchDispatchModeKey.PROXY)
    if hasattr(torch._C, "_TorchDispatchModeKey")
    else ()
)
_jit_tracing: Callable[[], bool] = torch.jit.is_tracing  # type: ignore[attr-defined]


def holds_traced_tensor(value: object) -> bool:
    """True if ``value`` is or holds (in a tuple, list, dict or dataclass) a tensor that exists only inside a
    trace: a FakeTensor or functional tensor (``torch.export``, AOT tracing, ``make_fx``), any other tensor
    subclass, or a tensor wrapped by a ``torch.func`` transform. Such a value must never be cached: used after
    its trace it fails (``GuardOnDataDependentSymNode``) or returns fakes (:meth:`emdloss.Tree.cached`)."""
    if isinstance(value, Tensor):
        if type(value) not in (Tensor, torch.nn.Parameter):
            return True
        wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
        functional = getattr(torch, "_is_functional_tensor", None)
        return bool((wrapped is not None and wrapped(value)) or (functional is not None and functional(value)))
    if isinstance(value, (tuple, list)):
        return any(holds_traced_tensor(v) for v in value)
    if isinstance(value, dict):
        return any(holds_traced_tensor(v) for v in value.values())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return any(holds_traced_tensor(getattr(value, f.name)) for f in dataclasses.fields(value))
    return False


def cacheable(value: object) -> bool:
    """Whether :meth:`emdloss.Tree.cached` may keep ``value``: nothing dynamo builds symbolically (it would
    replay the store on every compiled call), and no traced tensor (:func:`holds_traced_tensor`: what
    ``torch.export``, ``make_fx`` or ``torch.func`` make). What a function that dynamo runs eagerly builds
    (``torch.compiler.assume_constant_result``) is real, and kept."""
    return not _dynamo_tracing() and not holds_traced_tensor(value)


_dynamo_tracing = getattr(torch.compiler, "is_dynamo_compiling", torch.compiler.is_compiling)
