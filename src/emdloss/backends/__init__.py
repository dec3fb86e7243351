"""The backend registry: backend names -> :class:`~.base.Backend` objects, and the choice for ``"auto"``.

========  ===============================================  ==============================================
name      module                                           runs
========  ===============================================  ==============================================
"numba"   :mod:`.fused_cpu` (kernels: ``numba_kernels``)   CPU tensors, outside compile/func tracing
"triton"  :mod:`.triton_gpu` (kernel: ``triton_kernels``)  CUDA tensors when triton imports (and compile)
"torch"   :mod:`.reference`                                anywhere torch runs, any autograd use
========  ===============================================  ==============================================

``backend="auto"`` (the default) takes ``$EMDLOSS_BACKEND`` if it is set, else the first backend in the table
that is available and can run the batch. A named backend that cannot run the batch is an error that says why.
To add a backend: one module with a :class:`~.base.Backend` subclass, and one entry in ``_REGISTRY`` below
(docs/architecture.md has the checklist).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from .._inputs import Batch, check_loss_scale
from ..tree import Tree
from . import fast_path
from .base import Backend, BackendUnusable, BackendWarning, loss_weight_sum, loss_weights
from .fused_cpu import FusedCPUBackend
from .reference import ReferenceBackend
from .triton_gpu import TritonBackend

ENV_VAR = "EMDLOSS_BACKEND"

#: In the order ``"auto"`` tries them.
_REGISTRY: dict[str, Backend] = {b.name: b for b in (FusedCPUBackend(), TritonBackend(), ReferenceBackend())}


def names() -> tuple[str, ...]:
    """The registered backend names, in the order ``"auto"`` tries them."""
    return tuple(_REGISTRY)


def check_name(name: str, source: str = "backend") -> str:
    """``name`` if it is "auto" or registered, else a ValueError listing the choices (``source``: what set it)."""
    if name != "auto" and name not in _REGISTRY:
        raise ValueError(f"{source} must be 'auto' or one of {names()}, got {name!r}")
    return name


def get(name: str) -> Backend:
    """The backend registered as ``name``."""
    return _REGISTRY[check_name(name)]


def select(name: str, batch: Batch) -> Backend:
    """The backend that computes ``batch``: ``name``, or for "auto" the first in registry order that can."""
    if check_name(name) == "auto":
        name = check_name(os.environ.get(ENV_VAR, "auto"), f"the environment variable {ENV_VAR}")
    if name == "auto":
        for backend in _REGISTRY.values():
            # auto_skips first: it is cheap, and spares importing triton for CPU tensors
            if not backend.auto_skips(batch) and backend.unavailable() is None and backend.cannot_run(batch) is None:
                return backend
        raise RuntimeError("no backend can run this call")  # pragma: no cover - the reference runs anywhere
    backend = _REGISTRY[name]
    reason = backend.unavailable() or backend.cannot_run(batch)
    if reason:
        raise ValueError(f"backend={name!r} cannot run this call: {reason}; use backend='auto'")
    return backend


def fast_loss(
    name: str, input: Tensor, target: Tensor, tree: Tree, rho: float, reduction: str, ignore_index: int
) -> Tensor | None:
    """The loss of the common call through :mod:`.fast_path` (same numbers as :func:`loss`), or None when the
    call is not that case or ``name`` ("auto" defers to ``$EMDLOSS_BACKEND``) is not the fused CPU backend."""
    if name == "auto":
        name = os.environ.get(ENV_VAR, "auto")
    fused = _REGISTRY["numba"]
    if name not in ("auto", "numba") or not isinstance(fused, FusedCPUBackend):
        return None
    return fast_path.try_loss(input, target, tree, rho, reduction, ignore_index, fused)


def row_losses(name: str, batch: Batch, tree: Tree, rho: float) -> Tensor:
    """(M,) per-row losses from the backend :func:`select` picks; under "auto", a backend that turns out to be
    unusable while running (it warns once) hands the call to the next one. First, whatever the backend: the
    tree's edge lengths must not overflow the compute dtype (:func:`emdloss._inputs.check_loss_scale`)."""
    return _run(name, batch, tree, rho, reduced=False)


def loss(name: str, batch: Batch, tree: Tree, rho: float) -> Tensor:
    """:func:`row_losses` after ``batch.reduction`` (:meth:`.base.Backend.loss`: the reduction may be fused)."""
    return _run(name, batch, tree, rho, reduced=True)


def _run(name: str, batch: Batch, tree: Tree, rho: float, reduced: bool) -> Tensor:
    if not torch.compiler.is_compiling():  # a property of the tree and the dtype: checked eagerly only
        check_loss_scale(loss_weight_sum(tree), batch.x.dtype, rho)
    while True:
        backend = select(name, batch)
        try:
            return backend.loss(batch, tree, rho) if reduced else backend.row_losses(batch, tree, rho)
        except BackendUnusable:
            if name != "auto":
                raise


__all__ = [
    "ENV_VAR",
    "Backend",
    "BackendUnusable",
    "BackendWarning",
    "check_name",
    "get",
    "loss",
    "loss_weight_sum",
    "loss_weights",
    "names",
    "row_losses",
    "select",
]
