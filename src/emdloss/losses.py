"""``nn.Module`` wrappers: drop-in replacements for ``nn.CrossEntropyLoss``."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from . import _checks
from .functional import emd, sinkhorn
from .tree import Tree

__all__ = ["EMDLoss", "SinkhornLoss"]


class EMDLoss(nn.Module):
    r"""Exact (``rho=1``) or relaxed (``rho>1``) Earth Mover's Distance on a tree, as a loss.

    ``loss = sum_e w_e |p(below e) - q(below e)|^rho`` per sample; see :func:`emdloss.functional.emd`
    for shapes and arguments. The tree travels in ``state_dict`` (as its JSON dict, in the module's
    extra state) and with pickling, so a saved criterion comes back with the same hierarchy.

    Example::

        tree = emdloss.Tree.chain(10)                  # 10 ordered classes
        criterion = emdloss.EMDLoss(tree, rho=2.0)     # relaxed EMD
        loss = criterion(logits, labels)               # logits (N, 10), labels (N,)
    """

    def __init__(
        self,
        tree: Tree,
        rho: float = 1.0,
        from_logits: bool = True,
        reduction: str = "mean",
        ignore_index: int = -100,
        validate: bool | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if not isinstance(tree, Tree):
            raise TypeError(f"tree must be an emdloss.Tree, got {type(tree).__name__}")
        self.tree = tree
        self.rho = _checks.check_rho(rho)
        _checks.check_reduction(reduction)
        self.from_logits = bool(from_logits)
        self.reduction = reduction
        self.ignore_index = int(ignore_index)
        self.validate = validate
        self.backend = backend

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return emd(
            input,
            target,
            self.tree,
            rho=self.rho,
            from_logits=self.from_logits,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            validate=self.validate,
            backend=self.backend,
        )

    def get_extra_state(self) -> dict[str, Any]:
        return {"tree": self.tree.to_dict(), "rho": self.rho}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        loaded = Tree.from_dict(state["tree"])
        if loaded != self.tree:
            raise ValueError(
                "state_dict holds a different tree than this EMDLoss "
                f"({loaded!r} vs {self.tree!r}); build the loss with the saved tree: Tree.from_dict(state['tree'])"
            )
        self.rho = float(state.get("rho", self.rho))

    def extra_repr(self) -> str:
        return f"{self.tree!r}, rho={self.rho}, from_logits={self.from_logits}, reduction={self.reduction!r}"


class SinkhornLoss(nn.Module):
    r"""Entropic OT (Sinkhorn) loss ``<T*, M>`` for any (C, C) ground cost; see
    :func:`emdloss.functional.sinkhorn` for the math and the arguments. ``reg`` is absolute (cost units).

    The cost is held as a float64 buffer (it follows ``.to(device)`` and ``state_dict``). For a tree metric
    :class:`EMDLoss` is exact and O(C); this loss is the O(C^2)-per-iteration baseline.

    Example::

        cost = emdloss.Tree.chain(10).distance_matrix()
        criterion = emdloss.SinkhornLoss(cost, reg=0.05)
        loss = criterion(logits, labels)
    """

    def __init__(
        self,
        cost: Any,
        reg: float,
        max_iter: int = 1000,
        tol: float = 1e-6,
        log_domain: bool = True,
        grad: str = "envelope",
        from_logits: bool = True,
        reduction: str = "mean",
        ignore_index: int = -100,
        validate: bool | None = None,
        on_underflow: str = "raise",
    ) -> None:
        super().__init__()
        from .sinkhorn import _check_options, check_cost

        self.register_buffer("cost", check_cost(cost))
        self.reg, self.max_iter, self.tol = _check_options(reg, max_iter, tol, grad, on_underflow)
        _checks.check_reduction(reduction)
        self.log_domain = bool(log_domain)
        self.grad = grad
        self.from_logits = bool(from_logits)
        self.reduction = reduction
        self.ignore_index = int(ignore_index)
        self.validate = validate
        self.on_underflow = on_underflow

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return sinkhorn(
            input,
            target,
            self.cost,
            reg=self.reg,
            max_iter=self.max_iter,
            tol=self.tol,
            log_domain=self.log_domain,
            grad=self.grad,
            from_logits=self.from_logits,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            validate=self.validate,
            on_underflow=self.on_underflow,
        )

    def extra_repr(self) -> str:
        return (
            f"C={self.cost.shape[0]}, reg={self.reg}, max_iter={self.max_iter}, log_domain={self.log_domain}, "
            f"grad={self.grad!r}, reduction={self.reduction!r}"
        )
