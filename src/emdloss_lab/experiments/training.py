"""What the classification experiments share: the losses by name, a small model, a seeded training loop and
the evaluation metrics (from :mod:`emdloss.metrics`).

Losses by name (all on logits (N, C) and class indices (N,)):

- ``ce``: cross-entropy.
- ``emd``: exact EMD on the tree (rho = 1) = expected tree distance to the true class.
- ``relaxed``: relaxed EMD (rho = 2).
- ``ce+relaxed``: ``CE + mix * relaxed EMD`` (mix = 1 by default).
- ``hxe``, ``soft``: Bertinetto et al.'s hierarchical cross-entropy and soft labels (:mod:`.baselines`).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from emdloss import metrics
from emdloss.functional import emd
from emdloss.tree import Tree

from ..errors import UsageError
from . import runner
from .baselines import HXELoss, SoftLabelLoss

LOSSES = ("ce", "emd", "relaxed", "ce+relaxed", "hxe", "soft")
LossFn = Callable[[Tensor, Tensor], Tensor]


def make_loss(name: str, tree: Tree, *, mix: float = 1.0, alpha: float = 0.1, beta: float = 10.0) -> LossFn:
    """The loss called ``name`` (see the module docstring) for classes on ``tree``."""
    if name == "ce":
        return F.cross_entropy
    if name == "emd":
        return lambda z, y: emd(z, y, tree, rho=1.0)
    if name == "relaxed":
        return lambda z, y: emd(z, y, tree, rho=2.0)
    if name == "ce+relaxed":
        return lambda z, y: F.cross_entropy(z, y) + mix * emd(z, y, tree, rho=2.0)
    if name == "hxe":
        return HXELoss(tree, alpha=alpha)
    if name == "soft":
        return SoftLabelLoss(tree, beta=beta)
    raise ValueError(f"loss must be one of {LOSSES}, got {name!r}")


def mlp(d_in: int, d_out: int, hidden: int = 0) -> nn.Module:
    """A linear model (``hidden == 0``) or a one-hidden-layer ReLU network."""
    if hidden <= 0:
        return nn.Linear(d_in, d_out)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))


def standardize(x_train: np.ndarray, *others: np.ndarray) -> list[Tensor]:
    """Scale features by the training split's mean and std; float32 tensors."""
    mu, sd = x_train.mean(0), x_train.std(0)
    sd = np.where(sd > 0, sd, 1.0)
    return [torch.from_numpy(((x - mu) / sd).astype(np.float32)) for x in (x_train, *others)]


def train(
    model: nn.Module,
    loss_fn: LossFn,
    x: Tensor,
    y: Tensor,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    weight_decay: float = 1e-4,
    eval_every: int = 0,
    on_eval: Callable[[int, nn.Module], None] | None = None,
) -> nn.Module:
    """Adam on minibatches drawn with a seeded generator; calls ``on_eval(step, model)`` every ``eval_every``."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    n = x.shape[0]
    for step in range(1, steps + 1):
        idx = torch.randint(n, (min(batch_size, n),), generator=g) if batch_size < n else slice(None)
        model.train()
        loss = loss_fn(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if on_eval is not None and eval_every and (step % eval_every == 0 or step == steps):
            model.eval()
            with torch.no_grad():
                on_eval(step, model)
    model.eval()
    return model


def tree_metrics(logits: Tensor, y: Tensor, tree: Tree) -> dict[str, float]:
    """Top-1/top-5 accuracy, mistake severity, LCA height of mistakes, hdist@5 and mean exact EMD."""
    k5 = min(5, tree.num_classes)
    pred = logits.argmax(1)
    return {
        "top1": metrics.topk_accuracy(logits, y, 1),
        "top5": metrics.topk_accuracy(logits, y, k5),
        "mistake_severity": metrics.mistake_severity(pred, y, tree),
        "lca_height": metrics.lca_mistake_height(pred, y, tree),
        "hdist@5": metrics.hierarchical_distance_topk(logits, y, tree, k5),
        "emd": float(metrics.emd_per_sample(torch.softmax(logits.double(), 1), y, tree).mean()),
    }


def chain_metrics(logits: Tensor, y: Tensor, tree: Tree) -> dict[str, float]:
    """Accuracy, MAE in classes, quadratic weighted kappa and mean exact EMD for ordered classes."""
    pred = logits.argmax(1)
    return {
        "accuracy": metrics.topk_accuracy(logits, y, 1),
        "mae": metrics.mean_absolute_error(pred, y),
        "qwk": metrics.quadratic_weighted_kappa(pred, y, tree.num_classes),
        "emd": float(metrics.emd_per_sample(torch.softmax(logits.double(), 1), y, tree).mean()),
    }


def summarize(runs: list[dict[str, Any]], keys: list[str]) -> dict[str, tuple[float, float]]:
    """Mean and sample std over runs of each metric in ``keys`` (NaNs ignored)."""
    out = {}
    for k in keys:
        vals = np.array([r[k] for r in runs], dtype=np.float64)
        vals = vals[np.isfinite(vals)]
        out[k] = (float(vals.mean()) if vals.size else float("nan"), float(vals.std(ddof=1)) if vals.size > 1 else 0.0)
    return out


def loss_table(
    by_loss: dict[str, list[dict[str, Any]]],
    losses: Sequence[str],
    keys: Sequence[str],
    labels: dict[str, str] | None = None,
) -> str:
    """Markdown table, one row a loss, one column a metric, cells "mean ± std" over the runs (3 decimals)."""
    rows = []
    for loss in losses:
        s = summarize(by_loss[loss], list(keys))
        rows.append([(labels or {}).get(loss, loss), *(f"{s[k][0]:.3f} ± {s[k][1]:.3f}" for k in keys)])
    return runner.markdown_table(["loss", *keys], rows)


# ---------------------------------------------------------------------- experiment plumbing


def add_experiment_arguments(parser: Any, default_seeds: int) -> None:
    """The options every ``emdloss experiment NAME`` shares."""
    parser.add_argument("--out", required=True, help="output folder (results.json, report.md, PNG plots)")
    parser.add_argument("--quick", action="store_true", help="a small configuration that runs in < 2 min")
    parser.add_argument(
        "--seeds",
        type=runner.positive_int,
        default=None,
        help=f"number of seeds (default {default_seeds}; with --quick: 2)",
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue an interrupted run in the same --out, with the same options"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a seconds-long run that checks the pipeline end to end (its numbers mean nothing)",
    )


def num_seeds(args: Any, default_seeds: int) -> int:
    n = args.seeds if args.seeds is not None else (2 if args.quick else default_seeds)
    if n < 1:
        raise UsageError(f"--seeds must be >= 1, got {n}")
    return int(n)


@contextlib.contextmanager
def small_model_cpu() -> Iterator[None]:
    """One torch thread (the models are tiny) and denormals flushed to zero while training.

    Cross-entropy drives some softmax probabilities into the float32 denormal range, where x86 arithmetic is
    ~10x slower; flushing them changes no reported figure beyond 1e-38. Both settings are restored after.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)


def on_small_model_cpu(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """An experiment's ``run`` under :func:`small_model_cpu`."""

    @functools.wraps(run)
    def wrapped(args: argparse.Namespace) -> int:
        with small_model_cpu():
            return run(args)

    return wrapped
