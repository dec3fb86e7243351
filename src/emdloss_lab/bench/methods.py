"""The losses that ``emdloss bench`` compares, and the trees it runs them on.

- trees: :func:`build_tree` turns a workload name ('imagenet', 'chainN', 'randomN') into a :class:`Tree`,
  :func:`random_tree` makes the random trees;
- baselines: :class:`DenseClosedForm` (the quadratic closed form with a dense membership matrix), POT's exact LP
  :func:`pot_emd2` and batched Sinkhorn :func:`pot_sinkhorn_batch`, this project's :func:`project_sinkhorn`,
  with :func:`cost_matrix` for the OT solvers;
- :class:`Method` (one timed loss) and :func:`loss_methods`, the methods of one ratio workload: cross-entropy,
  the emdloss backends (fused numba kernel, triton, torch, torch.compile), the dense closed form and the OT anchors;
- :func:`reference_value`, the torch backend in float64 that every timed loss value is checked against.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from emdloss import functional
from emdloss._optional import install_hint, require
from emdloss.losses import EMDLoss
from emdloss.tree import Tree

from .. import synthetic
from .harness import Config, LossFn

#: Largest C x E (classes x edges) for which the dense closed form is run (128 MiB of float32).
DENSE_MAX_ENTRIES = 2**25


# ---------------------------------------------------------------------- trees


def build_tree(name: str, seed: int = 0) -> Tree:
    """'imagenet' (shared data), 'chainN' (N ordered classes) or 'randomN' (random tree with N leaf classes)."""
    if name == "imagenet":
        from ..data import imagenet_tree

        return imagenet_tree()
    for prefix, fn in (("chain", lambda n: Tree.chain(n)), ("random", lambda n: random_tree(n, seed))):
        if name.startswith(prefix):
            try:
                n = int(float(name[len(prefix) :]))
            except ValueError:
                break
            return fn(n)
    raise ValueError(f"unknown tree {name!r}: use 'imagenet', 'chainN' or 'randomN' (e.g. chain1000)")


def random_tree(num_classes: int, seed: int = 0) -> Tree:
    """A random tree with ``num_classes`` leaf classes under ``num_classes // 4`` internal nodes (a uniform
    random recursive tree, expected depth ~ ln of its size), edge lengths uniform in [0.5, 1.5], classes in
    random output order (so not in DFS order)."""
    n_internal = max(1, num_classes // 4)
    return synthetic.random_tree(np.random.default_rng(seed), n_internal + num_classes, num_internal=n_internal)


# ---------------------------------------------------------------------- baselines


class DenseClosedForm:
    """The textbook closed form with a dense (C, E) subtree-membership matrix ``M``.

    ``M[j, e] = 1`` when class j lies below edge e, so the flows are ``f = (p - q) @ M`` (N, E) and the loss
    is ``mean_i sum_e w_e |f_ie|^rho``; autograd does the backward. O(N C E) time and O(C E) memory: the
    quadratic baseline that the O(nodes) backends replace.
    """

    def __init__(self, tree: Tree, rho: float, device: str = "cpu") -> None:
        pos = tree.position[tree.classes]
        lo = tree.position[tree.edge_nodes]
        hi = tree.subtree_end[lo]
        member = (pos[:, None] >= lo[None, :]) & (pos[:, None] < hi[None, :])
        self.M = torch.from_numpy(member.astype(np.float32)).to(device)
        self.w = torch.from_numpy(np.ascontiguousarray(tree.weights[tree.edge_nodes], dtype=np.float32)).to(device)
        self.rho = rho

    def __call__(self, x: Tensor, target: Tensor) -> Tensor:
        p = torch.softmax(x, dim=1)
        q = target if target.dtype.is_floating_point else F.one_hot(target, x.shape[1]).to(x.dtype)
        f = (p - q) @ self.M.to(p.dtype)
        a = f.abs() if self.rho == 1.0 else (f.square() if self.rho == 2.0 else f.abs().pow(self.rho))
        return (a @ self.w.to(p.dtype)).mean()


def cost_matrix(tree: Tree) -> Tensor:
    return torch.from_numpy(np.array(tree.distance_matrix(), dtype=np.float32))


def pot_emd2(cost: Tensor) -> LossFn:
    """POT's exact network-simplex LP, one sample at a time (gradient from its dual potentials)."""
    ot = require("ot", "bench", "the POT baselines of emdloss bench")

    def loss(x: Tensor, target: Tensor) -> Tensor:
        p = torch.softmax(x.double(), dim=1)
        q = target.double() if target.dtype.is_floating_point else F.one_hot(target, x.shape[1]).double()
        c = cost.double()
        return torch.stack([ot.emd2(p[i], q[i], c) for i in range(x.shape[0])]).mean()

    return loss


def pot_sinkhorn_batch(cost: Tensor, iters: int) -> LossFn:
    """POT's batched Sinkhorn (``ot.solve_batch``, method 'sinkhorn'), ``iters`` fixed iterations,
    entropic regularisation 0.1 x the median cost, gradient through the last iteration ('last_step').
    The (C, C) cost is broadcast to (n, C, C) without a copy; the plans are (n, C, C)."""
    ot = require("ot", "bench", "the POT baselines of emdloss bench")

    reg = 0.1 * float(cost[cost > 0].median()) if (cost > 0).any() else 1.0

    def loss(x: Tensor, target: Tensor) -> Tensor:
        n, c = x.shape
        p = torch.softmax(x, dim=1)
        q = target if target.dtype.is_floating_point else F.one_hot(target, c).to(x.dtype)
        q = (q + 1e-6) / (1 + 1e-6 * c)  # Sinkhorn needs positive marginals
        res = ot.solve_batch(
            cost.expand(n, c, c), reg=reg, a=p, b=q, max_iter=iters, tol=0.0, method="sinkhorn", grad="last_step"
        )
        return res.value_linear.mean()  # <T, M>: the transport cost, without the entropy term

    return loss


def project_sinkhorn(cost: Tensor, iters: int) -> LossFn:
    """This project's ``functional.sinkhorn`` (when it exists), ``iters`` iterations, reg 0.1 x median cost."""
    reg = 0.1 * float(cost[cost > 0].median()) if (cost > 0).any() else 1.0

    def loss(x: Tensor, target: Tensor) -> Tensor:
        return functional.sinkhorn(  # type: ignore[attr-defined]
            x, target, cost, reg=reg, max_iter=iters, tol=0.0, log_domain=False, from_logits=True, reduction="mean"
        )

    return loss


def triton_method(tree: Tree, rho: float, device: str) -> Method:
    """``backend="triton"`` (the fused GPU kernel), or a skipped row saying why it cannot run here: triton
    missing, or a CPU run outside Triton's interpreter (where it would only be a smoke test, not a timing)."""
    from emdloss import backends

    name, backend = f"emd triton rho={rho:g}", backends.get("triton")
    why = backend.unavailable()
    if why is None and device == "cpu" and not backend.interpreted():
        why = "CPU tensors run backend='triton' only under TRITON_INTERPRET=1"
    if why:
        return Method(name, None, "triton", rho, skip=why)
    note = "Triton interpreter (numpy): not a timing" if device == "cpu" else ""
    return Method(name, EMDLoss(tree, rho=rho, backend="triton"), "triton", rho, note=note)


def reference_value(x: Tensor, target: Tensor, tree: Tree, rho: float) -> float:
    """The loss by the torch reference backend in float64 (to check what is being timed)."""
    with torch.no_grad():
        t = target.double() if target.dtype.is_floating_point else target
        return float(functional.emd(x.detach().double(), t, tree, rho=rho, backend="torch"))


# ---------------------------------------------------------------------- the methods of a workload


@dataclass
class Method:
    """One timed loss. ``rows``: the number of batch rows it runs on (fewer than the batch: extrapolated)."""

    name: str
    fn: LossFn | None
    family: str
    rho: float | None = None
    rows: int | None = None
    note: str = ""
    skip: str = ""
    warmup_s: float = float("nan")


def loss_methods(
    tree: Tree, target_kind: str, cfg: Config, *, compile_ok: bool, dense_ok: bool, anchors: bool
) -> list[Method]:
    """The methods of one workload, cross-entropy first."""
    methods = [Method("cross_entropy", lambda x, t: F.cross_entropy(x, t), "ce")]
    for rho in (1.0, 2.0):
        r = f"rho={rho:g}"
        if cfg.device == "cpu":
            methods.append(Method(f"emd fused {r}", EMDLoss(tree, rho=rho, backend="numba"), "fused", rho))
        if cfg.triton:
            methods.append(triton_method(tree, rho, cfg.device))
        methods.append(Method(f"emd torch {r}", EMDLoss(tree, rho=rho, backend="torch"), "torch", rho))
        if compile_ok:
            fn = torch.compile(EMDLoss(tree, rho=rho, backend="torch", validate=False))
            methods.append(Method(f"emd torch.compile {r}", fn, "compiled", rho, note="validate=False"))
        entries = tree.num_classes * tree.num_edges
        if dense_ok:
            if entries <= DENSE_MAX_ENTRIES:
                methods.append(Method(f"dense closed form {r}", DenseClosedForm(tree, rho, cfg.device), "dense", rho))
            else:
                methods.append(
                    Method(
                        f"dense closed form {r}",
                        None,
                        "dense",
                        rho,
                        skip=f"C x E = {entries:.2g} > {DENSE_MAX_ENTRIES:.2g}",
                    )
                )
    if anchors:
        n = min(cfg.slow_rows, cfg.batch)
        cost = cost_matrix(tree)
        try:
            require("ot", "bench")

            methods.append(Method("POT ot.emd2 (exact LP, per sample)", pot_emd2(cost), "pot_emd2", 1.0, rows=n))
            methods.append(
                Method(
                    f"POT ot.solve_batch Sinkhorn ({cfg.sinkhorn_iters} it)",
                    pot_sinkhorn_batch(cost, cfg.sinkhorn_iters),
                    "pot_sinkhorn",
                    1.0,
                    rows=n,
                )
            )
        except ImportError:
            methods.append(Method("POT", None, "pot_emd2", skip=f"POT not installed ({install_hint('bench')})"))
        if hasattr(functional, "sinkhorn"):
            methods.append(
                Method(
                    f"emdloss sinkhorn ({cfg.sinkhorn_iters} it)",
                    project_sinkhorn(cost, cfg.sinkhorn_iters),
                    "sinkhorn",
                    1.0,
                    rows=min(cfg.batch, max(n, 16)),
                )
            )
    return methods
