"""``nn.Module`` wrappers: drop-in replacements for ``nn.CrossEntropyLoss``."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from . import _inputs, backends, functional
from .functional import emd, sinkhorn
from .tree import Tree

__all__ = ["EMDLoss", "SinkhornLoss"]


class EMDLoss(nn.Module):
    r"""Exact (``rho=1``) or relaxed (``rho>1``) Earth Mover's Distance on a tree of classes, as a loss.

    A drop-in for :class:`torch.nn.CrossEntropyLoss` when the classes have structure: ordered classes (a
    chain, :meth:`Tree.chain`) or a class hierarchy (:meth:`Tree.from_edges`). For each sample, with
    ``p = softmax(input)`` over the classes and ``q`` the target (one-hot for a class index):

    .. math::
        \ell(p, q) = r \sum_{e} w_e \, |p(\text{below } e) - q(\text{below } e)|^{\rho}

    summed over the tree's edges ``e`` of length ``w_e``, with ``r`` the sample's class weight (1 without
    ``weight``). With ``rho = 1`` the sum is exactly the Wasserstein-1 distance under the tree metric (for a
    chain, ``sum |CDF_p - CDF_q|``); ``rho = 2`` is the relaxed form, whose gradient shrinks as ``p``
    approaches ``q``. Cost O(nodes) per sample; gradients in closed form.

    **Class weights** have ``nn.CrossEntropyLoss``'s meaning: a class-index target ``y`` gives ``r = weight[y]``
    and ``"mean"`` divides the weighted sum by ``sum weight[y]`` over the samples that are not ``ignore_index``.
    A soft target ``q`` gives ``r = sum_c weight[c] q_c`` (its expected class weight, before smoothing) and
    ``"mean"`` divides by the number of samples, as torch does for probability targets.

    **Label smoothing** replaces the target by ``(1 - eps) q + eps s`` with ``eps = label_smoothing``:
    ``smoothing="uniform"`` takes ``s_c = 1/C`` (``nn.CrossEntropyLoss``'s meaning); ``smoothing="tree"`` takes
    ``s = sum_y q_y K[y]`` with ``K[y, c] ∝ exp(-d(y, c) / tau)``, ``d`` the tree distance and ``tau =
    smoothing_scale`` (default: the smallest distance between two classes), so the smoothed mass stays near
    the label instead of being spread to far classes, which the EMD charges for
    (:func:`emdloss.functional.smoothing_distribution`; it costs a (C, C) table, cached on the tree).

    Args:
        tree: the class hierarchy; its ``num_classes`` is C, and output ``j`` of the model is ``tree.classes[j]``.
        rho: exponent >= 1 on the flows (1: exact EMD; 2: relaxed). Default: 1.
        from_logits: apply a softmax over the class dimension to ``input`` (True, as cross-entropy), or take
            ``input`` as probabilities (False). Default: True.
        reduction: ``"none"`` | ``"mean"`` | ``"sum"``. ``"mean"`` averages over samples whose target is not
            ``ignore_index`` (weighted, with ``weight``; NaN when nothing counts, with zero gradient).
            Default: ``"mean"``.
        ignore_index: a class-index target value whose samples contribute nothing. Default: -100.
        weight: a (C,) tensor of finite class weights >= 0, held as a buffer (it follows ``.to()`` and is in
            ``state_dict``, as in ``nn.CrossEntropyLoss``). Default: None (all 1).
        label_smoothing: ``eps`` in [0, 1). Default: 0 (off).
        smoothing: ``"uniform"`` | ``"tree"``, the distribution mixed into the target. Default: ``"uniform"``.
        smoothing_scale: ``tau > 0`` for ``smoothing="tree"``, in edge-length units. Default: None (the
            smallest distance between two classes).
        validate: read values to check them (class range, distributions, finite logits). Default None: on for
            CPU tensors, off elsewhere, since the checks would synchronise the device.
        backend: ``"auto"`` (the fused numba kernels on the CPU, torch ops elsewhere; ``$EMDLOSS_BACKEND``
            overrides it), or a name in :func:`emdloss.backends.names`: ``"numba"``, ``"torch"``.
            Default: ``"auto"``.

    Every argument is checked here, at construction, with an error naming it.

    Shape:
        - Input: (C), (N, C) or (N, C, d1, ..., dk), floating (float16/bfloat16 are accumulated in float32).
        - Target: () / (N) / (N, d1, ..., dk) integer class indices in [0, C), or a floating tensor of the
          input's shape whose rows are distributions (soft targets, differentiable with ``backend="torch"``).
        - Output: a scalar; with ``reduction="none"``, () / (N) / (N, d1, ..., dk) as the class-index target,
          in the input's dtype.

    The tree travels in ``state_dict`` (as its JSON dict, in the module's extra state) and with pickling (as
    plain lists, so ``torch.load(weights_only=True)`` reads it after
    ``torch.serialization.add_safe_globals([emdloss.Tree])``), so a saved criterion comes back with the same
    hierarchy; loading a state with a different tree names what differs.

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
        >>> criterion = emdloss.EMDLoss(tree, weight=torch.tensor([1.0, 1.0, 4.0]), label_smoothing=0.1,
        ...                             smoothing="tree")
        >>> criterion
        EMDLoss(Tree(tree, num_nodes=5, num_classes=3), rho=1.0, reduction='mean', ignore_index=-100, weight=(3,) float32, label_smoothing=0.1, smoothing='tree', smoothing_scale=None, from_logits=True, validate=None, backend='auto')
        >>> round(criterion(torch.tensor([4.0, 0.0, 0.0]), torch.tensor(0)).item(), 4)   # unbatched
        0.0146
    """

    weight: Tensor | None
    #: The fast path's arguments ``(backend, tree, rho, reduction, ignore_index)`` when the settings were checked
    #: since they last changed and are those of the common call (no class weights, no smoothing, logits, reduced):
    #: :meth:`forward` then skips :func:`~emdloss.functional.emd`'s checks; False for other settings; None: to
    #: check (any attribute set resets it; a criterion pickled before it existed reads this class default).
    _fast_settings: tuple[str, Tree, float, str, int] | bool | None = None

    def __init__(
        self,
        tree: Tree,
        rho: float = 1.0,
        from_logits: bool = True,
        reduction: str = "mean",
        ignore_index: int = -100,
        validate: bool | None = None,
        backend: str = "auto",
        weight: Tensor | None = None,
        label_smoothing: float = 0.0,
        smoothing: str = "uniform",
        smoothing_scale: float | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(tree, Tree):
            raise TypeError(f"tree must be an emdloss.Tree, got {type(tree).__name__}")
        self.tree = tree
        (self.rho, self.ignore_index, self.label_smoothing, self.smoothing, self.smoothing_scale) = (
            functional.check_options(
                rho,
                reduction,
                ignore_index,
                label_smoothing,
                smoothing,
                smoothing_scale,
                validate,
                backend,
                from_logits,
            )
        )
        self.from_logits = bool(from_logits)
        self.reduction = reduction
        self.validate = validate
        self.backend = backend
        weight = None if weight is None else functional.check_weight(weight, tree.num_classes)
        self.register_buffer("weight", weight)
        if self.label_smoothing and self.smoothing == "tree":
            # the (C, C) table, built now (numpy, cached on the tree): torch.compile cannot trace its construction
            functional._tree_kernel(tree, self.smoothing_scale)

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name != "_fast_settings":
            object.__setattr__(self, "_fast_settings", None)  # a plain attribute: no need for nn.Module's bookkeeping

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        settings = self._fast_settings
        if settings is None:
            settings = self._fast_settings = self._check_fast_settings()
        # the most common call, with the least Python around the kernel (emdloss.backends.fast_path)
        if isinstance(settings, tuple):
            backend, tree, rho, reduction, ignore_index = settings
            fast = backends.fast_loss(backend, input, target, tree, rho, reduction, ignore_index)
            if fast is not None:
                return fast
        return emd(
            input,
            target,
            self.tree,
            rho=self.rho,
            from_logits=self.from_logits,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            weight=self.weight,
            label_smoothing=self.label_smoothing,
            smoothing=self.smoothing,
            smoothing_scale=self.smoothing_scale,
            validate=self.validate,
            backend=self.backend,
        )

    def _check_fast_settings(self) -> tuple[str, Tree, float, str, int] | bool:
        """:attr:`_fast_settings` for the current settings, after :func:`emd`'s checks of them (their errors)."""
        rho, ignore_index, label_smoothing, _, _ = functional.check_options(
            self.rho, self.reduction, self.ignore_index, self.label_smoothing, self.smoothing,
            self.smoothing_scale, self.validate, self.backend, self.from_logits,
        )  # fmt: skip
        common = isinstance(self.tree, Tree) and self.weight is None and not label_smoothing and self.from_logits
        if not common or self.reduction == "none":
            return False
        return (self.backend, self.tree, rho, self.reduction, ignore_index)

    def __prepare_scriptable__(self) -> nn.Module:
        """``torch.jit.script`` calls this on every submodule first: refuse with a message naming the alternatives
        (``torch.compile``, ``torch.export``) instead of TorchScript's error about some annotation inside."""
        raise RuntimeError(_inputs.JIT_UNSUPPORTED)

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
        weight = "None" if self.weight is None else f"({self.weight.shape[0]},) {str(self.weight.dtype)[6:]}"
        smoothing = f", smoothing={self.smoothing!r}, smoothing_scale={self.smoothing_scale}"
        return (
            f"{self.tree!r}, rho={self.rho}, reduction={self.reduction!r}, ignore_index={self.ignore_index}, "
            f"weight={weight}, label_smoothing={self.label_smoothing}"
            f"{smoothing if self.label_smoothing else ''}, from_logits={self.from_logits}, "
            f"validate={self.validate}, backend={self.backend!r}"
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

    cost: Tensor  # (C, C) float64 buffer, registered in __init__ (declared here for type checkers)

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

    def __prepare_scriptable__(self) -> nn.Module:
        """Refuse ``torch.jit.script`` with a message naming ``torch.compile`` and ``torch.export``."""
        raise RuntimeError(_inputs.JIT_UNSUPPORTED)

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
