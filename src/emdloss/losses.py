"""``nn.Module`` wrappers: drop-in replacements for ``nn.CrossEntropyLoss``."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from . import _inputs, backends
from .functional import emd, sinkhorn
from .tree import Tree

__all__ = ["EMDLoss", "SinkhornLoss"]


class EMDLoss(nn.Module):
    r"""Exact (``rho=1``) or relaxed (``rho>1``) Earth Mover's Distance on a tree of classes, as a loss.

    A drop-in for :class:`torch.nn.CrossEntropyLoss` when the classes have structure: ordered classes (a
    chain, :meth:`Tree.chain`) or a class hierarchy (:meth:`Tree.from_edges`). For each sample, with
    ``p = softmax(input)`` over the classes and ``q`` the target (one-hot for a class index):

    .. math::
        \ell(p, q) = \sum_{e} w_e \, |p(\text{below } e) - q(\text{below } e)|^{\rho}

    summed over the tree's edges ``e`` of length ``w_e``. With ``rho = 1`` this is exactly the Wasserstein-1
    distance under the tree metric (for a chain, ``sum |CDF_p - CDF_q|``); ``rho = 2`` is the relaxed form,
    whose gradient shrinks as ``p`` approaches ``q``. Cost O(nodes) per sample; gradients in closed form.

    Args:
        tree: the class hierarchy; its ``num_classes`` is C, and output ``j`` of the model is ``tree.classes[j]``.
        rho: exponent >= 1 on the flows (1: exact EMD; 2: relaxed). Default: 1.
        from_logits: apply a softmax over dim 1 to ``input`` (True, as cross-entropy), or take ``input`` as
            probabilities (False). Default: True.
        reduction: ``"none"`` | ``"mean"`` | ``"sum"``. ``"mean"`` averages over samples whose target is not
            ``ignore_index`` (NaN when there is none, with zero gradient). Default: ``"mean"``.
        ignore_index: a class-index target value whose samples contribute nothing. Default: -100.
        validate: read values to check them (class range, distributions, finite logits). Default None: on for
            CPU tensors, off elsewhere, since the checks would synchronise the device.
        backend: ``"auto"`` (the fused numba kernels on the CPU, torch ops elsewhere; ``$EMDLOSS_BACKEND``
            overrides it), or a name in :func:`emdloss.backends.names`: ``"numba"``, ``"torch"``.
            Default: ``"auto"``.

    Shape:
        - Input: (N, C) or (N, C, d1, ..., dk), floating (float16/bfloat16 are accumulated in float32).
        - Target: (N) or (N, d1, ..., dk) integer class indices in [0, C), or a floating tensor of the input's
          shape whose rows are distributions (soft targets, differentiable with ``backend="torch"``).
        - Output: a scalar, or (N, d1, ..., dk) with ``reduction="none"``, in the input's dtype.

    The tree travels in ``state_dict`` (as its JSON dict, in the module's extra state) and with pickling, so a
    saved criterion comes back with the same hierarchy.

    Examples::

        >>> import torch, emdloss
        >>> criterion = emdloss.EMDLoss(emdloss.Tree.chain(10), rho=2.0)   # 10 ordered classes, relaxed EMD
        >>> logits = torch.randn(32, 10, requires_grad=True)
        >>> labels = torch.randint(0, 10, (32,))
        >>> criterion(logits, labels).backward()
        >>> tree = emdloss.Tree.from_edges([("animal", "dog"), ("animal", "cat"), ("root", "animal"),
        ...                                 ("root", "car")], classes=["dog", "cat", "car"])
        >>> emdloss.EMDLoss(tree, reduction="none")(torch.zeros(2, 3), torch.tensor([0, 2])).shape
        torch.Size([2])
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
        self.rho = _inputs.check_rho(rho)
        _inputs.check_reduction(reduction)
        self.from_logits = bool(from_logits)
        self.reduction = reduction
        self.ignore_index = int(ignore_index)
        self.validate = validate
        self.backend = backends.check_name(backend)

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
        from .tree import _describe_difference

        if not isinstance(state, dict) or "tree" not in state:
            raise ValueError(f"EMDLoss extra state must be a dict with a 'tree' entry, got {type(state).__name__}")
        loaded = Tree.from_dict(state["tree"])
        if loaded != self.tree:
            raise ValueError(
                "state_dict holds a different tree than this EMDLoss: the trees differ in "
                f"{_describe_difference(self.tree, loaded, 'here', 'in the state_dict')}; "
                "build the loss with the saved tree: Tree.from_dict(state_dict[prefix + '_extra_state']['tree'])"
            )
        self.rho = _inputs.check_rho(state.get("rho", self.rho))  # the constructor's check and message

    def extra_repr(self) -> str:
        return (
            f"{self.tree!r}, rho={self.rho}, from_logits={self.from_logits}, reduction={self.reduction!r}, "
            f"ignore_index={self.ignore_index}, validate={self.validate}, backend={self.backend!r}"
        )


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
        _inputs.check_reduction(reduction)
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
