"""What the classification experiments share: the losses by name, a small model, the training protocol and
the evaluation metrics (from :mod:`emdloss.metrics`).

Losses by name (all on logits (N, C) and class indices (N,)), each with its own hyper-parameter and the grid
it is tuned over (:data:`HYPER`):

- ``ce``: cross-entropy (none).
- ``emd``: exact EMD on the tree (rho = 1) = expected tree distance to the true class (none).
- ``relaxed``: relaxed EMD (rho = 2) (none).
- ``ce+relaxed``: ``CE + lam * relaxed EMD`` (``lam`` over :data:`.baselines.LAMBDA_GRID`).
- ``hxe``: Bertinetto et al.'s hierarchical cross-entropy (``alpha`` over :data:`.baselines.ALPHA_GRID`;
  weights not normalised to sum 1, a constant factor, see :func:`make_loss`).
- ``soft``: their soft labels, distances divided by their maximum (``beta`` over :data:`.baselines.BETA_GRID`).

The protocol (:func:`fit_tuned`), one for every classification experiment:

1. a validation split carved from the training data (:func:`validation_split`, stratified by class);
2. every loss gets the same tuning budget: ``budget`` trials of (learning rate, its own hyper-parameter)
   (:func:`tuning_trials`: learning rates stratified on a log scale, hyper-parameters cycling through the
   loss's grid), each trained on the rest of the training data;
3. budgets are in epochs with early stopping on the validation criterion (:func:`train_epochs`): a trial stops
   when the criterion has not improved for ``patience`` epochs, or at ``max_epochs``, and keeps its best
   epoch's weights, so every data size is trained to convergence, not for a fixed number of steps;
4. the trial with the best validation criterion is the loss's model; it is scored once on the test split.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import math
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
from .baselines import (
    ALPHA_GRID,
    BETA_GRID,
    LAMBDA_GRID,
    CEPlusEMDLoss,
    HXELoss,
    SoftLabelLoss,
)

LOSSES = ("ce", "emd", "relaxed", "ce+relaxed", "hxe", "soft")
LossFn = Callable[[Tensor, Tensor], Tensor]

#: loss -> (name of its own hyper-parameter, the grid it is tuned over, the value used when not tuned)
HYPER: dict[str, tuple[str, tuple[float, ...], float]] = {
    "ce+relaxed": ("lam", LAMBDA_GRID, 1.0),
    "hxe": ("alpha", ALPHA_GRID, 0.1),
    "soft": ("beta", BETA_GRID, 10.0),
}


def make_loss(name: str, tree: Tree, hp: float | None = None) -> LossFn:
    """The loss called ``name`` (see the module docstring) for classes on ``tree``; ``hp`` is its own
    hyper-parameter (:data:`HYPER`; its default when None; ignored by losses without one)."""
    if name not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {name!r}")
    if name in HYPER and hp is None:
        hp = HYPER[name][2]
    if name == "ce":
        return F.cross_entropy
    if name == "emd":
        return lambda z, y: emd(z, y, tree, rho=1.0)
    if name == "relaxed":
        return lambda z, y: emd(z, y, tree, rho=2.0)
    if name == "ce+relaxed":
        return CEPlusEMDLoss(tree, lam=hp, rho=2.0)
    if name == "hxe":
        # The authors' normalisation (weights summing to 1 over the ~1,800 nodes of the ImageNet tree) only
        # rescales the loss, by ~1e-3 there: under Adam with an L2 penalty added to the gradient that would let
        # the weight decay swamp the loss, so the experiments use the unnormalised weights (the same minimiser).
        return HXELoss(tree, alpha=hp, normalize=False)
    return SoftLabelLoss(tree, beta=hp)


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


# ---------------------------------------------------------------------- the protocol


def validation_split(y: np.ndarray | Tensor, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, validation) of a split stratified by class.

    Each class with ``n >= 2`` examples gives ``max(1, round(fraction * n))`` of them (at most ``n - 1``) to
    validation, so a class is never absent from training; classes with one example stay in training.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction!r}")
    y = np.asarray(y)
    rng = np.random.default_rng([seed, 7])
    val = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        if idx.size < 2:
            continue
        k = min(idx.size - 1, max(1, round(fraction * idx.size)))
        val.append(rng.choice(idx, size=k, replace=False))
    v = np.sort(np.concatenate(val)) if val else np.zeros(0, dtype=np.int64)
    t = np.setdiff1d(np.arange(y.size), v)
    return t, v


def tuning_trials(loss: str, budget: int, lr_range: tuple[float, float], seed: int) -> list[dict[str, Any]]:
    """``budget`` trials ``{"lr": ..., "hp": ...}`` for ``loss``: the same number for every loss.

    Learning rates: one per stratum of ``[log lr_lo, log lr_hi]`` cut into ``budget`` equal parts (a random point
    in each), so even a budget of 2 spans the range. Hyper-parameters (losses in :data:`HYPER`): the grid in a
    seeded random order, repeated as often as needed and paired with the learning rates at random; ``hp`` is
    None for losses without one.
    """
    if budget < 1:
        raise ValueError(f"tuning budget must be >= 1, got {budget}")
    lo, hi = (math.log(v) for v in lr_range)
    rng = np.random.default_rng([seed, budget, 11])
    u = (np.arange(budget) + rng.random(budget)) / budget
    lrs = np.exp(lo + u * (hi - lo))
    rng.shuffle(lrs)
    if loss not in HYPER:
        return [{"lr": float(lr), "hp": None} for lr in lrs]
    grid = np.asarray(HYPER[loss][1])
    hps = np.concatenate([rng.permutation(grid) for _ in range(-(-budget // grid.size))])[:budget]
    return [{"lr": float(lr), "hp": float(h)} for lr, h in zip(lrs, hps)]


def train_epochs(
    model: nn.Module,
    loss_fn: LossFn,
    x: Tensor,
    y: Tensor,
    x_val: Tensor,
    y_val: Tensor,
    *,
    lr: float,
    batch_size: int,
    max_epochs: int,
    patience: int,
    seed: int,
    score: Callable[[Tensor, Tensor], float],
    weight_decay: float = 1e-4,
) -> dict[str, Any]:
    """Adam over epochs of shuffled minibatches with early stopping on ``score(model(x_val), y_val)`` (higher is
    better). Leaves ``model`` with the weights of its best validation epoch.

    Returns ``{"best_epoch", "epochs", "val_score"}``; epoch 0 is the untrained model. A non-finite training loss
    ends the trial (it keeps its best finite epoch).
    """
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)

    def evaluate() -> float:
        model.eval()
        with torch.no_grad():
            v = float(score(model(x_val), y_val))
        return v if math.isfinite(v) else -math.inf

    best, best_epoch, best_state = evaluate(), 0, copy.deepcopy(model.state_dict())
    epoch = 0
    n = x.shape[0]
    for epoch in range(1, max_epochs + 1):
        model.train()
        perm = torch.randperm(n, generator=g)
        diverged = False
        for i in range(0, n, batch_size):
            idx = perm[i : i + batch_size]
            loss = loss_fn(model(x[idx]), y[idx])
            if not torch.isfinite(loss):
                diverged = True
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if diverged:
            break
        v = evaluate()
        if v > best:
            best, best_epoch, best_state = v, epoch, copy.deepcopy(model.state_dict())
        elif epoch - best_epoch >= patience:
            break
    model.load_state_dict(best_state)
    model.eval()
    return {"best_epoch": best_epoch, "epochs": epoch, "val_score": best}


def fit_tuned(
    make_model: Callable[[], nn.Module],
    make_loss_fn: Callable[[float | None], LossFn],
    loss: str,
    x: Tensor,
    y: Tensor,
    *,
    protocol: dict[str, Any],
    seed: int,
    score: Callable[[Tensor, Tensor], float],
) -> tuple[nn.Module, dict[str, Any]]:
    """The protocol of the module docstring for one loss and one seed.

    ``protocol`` keys: ``val_fraction``, ``budget``, ``lr_range`` (lo, hi), ``batch``, ``max_epochs``,
    ``patience``. ``make_model()`` gives a fresh model (seeded by the caller's seed), ``make_loss_fn(hp)`` the
    loss. Returns the chosen model and ``{"lr", "hp", "best_epoch", "epochs", "val_score", "trials"}``.
    """
    tr, va = validation_split(y, protocol["val_fraction"], seed)
    xt, yt, xv, yv = x[tr], y[tr], x[va], y[va]
    best_model, best_info = None, None
    trials = []
    for i, trial in enumerate(tuning_trials(loss, protocol["budget"], tuple(protocol["lr_range"]), seed)):
        runner.seed_everything(seed * 1000 + i)
        model = make_model()
        info = train_epochs(
            model,
            make_loss_fn(trial["hp"]),
            xt,
            yt,
            xv,
            yv,
            lr=trial["lr"],
            batch_size=protocol["batch"],
            max_epochs=protocol["max_epochs"],
            patience=protocol["patience"],
            seed=seed * 1000 + i,
            score=score,
        )
        trials.append({**trial, **info})
        if best_info is None or info["val_score"] > best_info["val_score"]:
            best_model, best_info = model, {**trial, **info}
    assert best_model is not None and best_info is not None
    return best_model, {**best_info, "trials": trials}


# ---------------------------------------------------------------------- metrics


def collapse_diagnostics(pred: Tensor, tree: Tree) -> dict[str, float]:
    """How spread the predictions are: ``distinct_pred`` (number of different predicted classes) and
    ``pred_depth`` (mean hop depth of the predicted classes; compare with ``true_depth`` of the targets)."""
    depth = torch.from_numpy(np.asarray(tree.depth(hops=True), dtype=np.float64)[np.asarray(tree.classes)])
    return {"distinct_pred": float(torch.unique(pred).numel()), "pred_depth": float(depth[pred].mean())}


def tree_metrics(logits: Tensor, y: Tensor, tree: Tree) -> dict[str, float]:
    """Top-1/top-5 accuracy; over the mistakes, the LCA height (``lca_height``, Bertinetto et al.'s mistake
    severity) and the path length (``mistake_path``); average hierarchical distance of the top 5 with both
    (``hdist@5``: LCA height, their definition; ``hdist_path@5``); mean exact EMD; collapse diagnostics.
    ``mistake_severity`` is whatever :func:`emdloss.metrics.mistake_severity` defines (kept for the demo)."""
    k5 = min(5, tree.num_classes)
    pred = logits.argmax(1)
    return {
        "top1": float(metrics.topk_accuracy(logits, y, 1)),
        "top5": float(metrics.topk_accuracy(logits, y, k5)),
        "mistake_severity": float(metrics.mistake_severity(pred, y, tree)),
        "lca_height": float(metrics.mistake_severity(pred, y, tree, distance="lca")),
        "mistake_path": float(metrics.mistake_severity(pred, y, tree, distance="path")),
        "hdist@5": float(metrics.hierarchical_distance_topk(logits, y, tree, k5, distance="lca")),
        "hdist_path@5": float(metrics.hierarchical_distance_topk(logits, y, tree, k5, distance="path")),
        "emd": float(metrics.emd_per_sample(torch.softmax(logits.double(), 1), y, tree).mean()),
        **collapse_diagnostics(pred, tree),
    }


def chain_metrics(logits: Tensor, y: Tensor, tree: Tree, probs: Tensor | None = None) -> dict[str, float]:
    """Accuracy, MAE in classes, quadratic weighted kappa and mean exact EMD for ordered classes.

    ``logits`` (N, C) are scored by their argmax and softmax; methods with another prediction rule (CORAL, CORN)
    pass their predicted classes as ``logits`` of shape (N,) and their class distribution as ``probs``.
    """
    if logits.dim() == 1:
        if probs is None:
            raise ValueError("chain_metrics: class predictions (N,) need their distribution `probs` (N, C)")
        pred = logits
    else:
        pred, probs = logits.argmax(1), torch.softmax(logits.double(), 1)
    return {
        "accuracy": float((pred == y).double().mean()),
        "mae": float(metrics.mean_absolute_error(pred, y)),
        "qwk": float(metrics.quadratic_weighted_kappa(pred, y, tree.num_classes)),
        "emd": float(metrics.emd_per_sample(probs.double(), y, tree).mean()),
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


def paired_table(
    by_loss: dict[str, list[dict[str, Any]]], losses: Sequence[str], keys: Sequence[str], baseline: str = "ce"
) -> str:
    """Markdown table of paired differences ``loss - baseline`` per metric over seeds (seed i of one loss against
    seed i of the baseline: same data, same split), "mean [95 % bootstrap interval]"
    (:func:`runner.paired_bootstrap`)."""
    rows = []
    for loss in losses:
        if loss == baseline:
            continue
        cells = []
        for k in keys:
            a = [r[k] for r in by_loss[loss]]
            b = [r[k] for r in by_loss[baseline]]
            d, lo, hi = runner.paired_bootstrap(a, b)
            cells.append(f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]" if math.isfinite(d) else "—")
        rows.append([f"{loss} - {baseline}", *cells])
    return runner.markdown_table(["paired difference", *keys], rows)


#: Words for :func:`runner.verdict`'s answers when a loss is compared with a baseline.
_AGAINST_BASELINE = {"supported": "better", "refuted": "worse", "inconclusive": "inconclusive"}


def versus_baseline(
    results: dict[str, dict[str, list[dict[str, Any]]]],
    losses: Sequence[str],
    metrics: Sequence[tuple[str, str]],
    baseline: str = "ce",
) -> list[dict[str, Any]]:
    """Per group of ``results`` (``{group: {loss: per-seed runs}}``), loss in ``losses`` that was run, and
    ``(metric, "higher" | "lower")`` in ``metrics`` (which way is better): the paired difference ``loss -
    baseline`` over seeds (mean, 95 % bootstrap interval) and its word, "better" / "worse" (the whole interval
    on that side) or "inconclusive"."""
    rows = []
    for group, by_loss in results.items():
        for loss in losses:
            if loss == baseline or loss not in by_loss or baseline not in by_loss:
                continue
            for key, better in metrics:
                diff = runner.paired_bootstrap([r[key] for r in by_loss[loss]], [r[key] for r in by_loss[baseline]])
                word = _AGAINST_BASELINE[runner.verdict(diff, better)]
                rows.append({"group": group, "loss": loss, "metric": key, "diff": diff, "word": word})
    return rows


def verdict_table(
    rows: list[dict[str, Any]], metrics: Sequence[tuple[str, str]], seeds: int, baseline: str = "ce"
) -> str:
    """:func:`versus_baseline`'s rows as a markdown table (one row a group and loss, one column a metric) and a
    note on what the intervals mean."""
    cells: dict[tuple[str, str], dict[str, str]] = {}
    for r in rows:
        d = r["diff"]
        cells.setdefault((r["group"], r["loss"]), {})[r["metric"]] = (
            f"{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}] {r['word']}"
        )
    header = ["group, loss", *(f"{key}: loss - {baseline}" for key, _ in metrics)]
    table = [[f"{g}, {loss}", *(c.get(key, "—") for key, _ in metrics)] for (g, loss), c in cells.items()]
    note = (
        f"Paired over the {seeds} seeds (same data, split and tuning budget); 95 % percentile-bootstrap intervals, "
        "which with so few pairs describe the seeds' spread rather than test anything. better / worse: the whole "
        "interval on that side.\n"
    )
    return runner.markdown_table(header, table) + "\n\n" + note


def verdict_counts(rows: list[dict[str, Any]], metric: str) -> str:
    """ "better in a, worse in b, inconclusive in c of n" for ``metric`` over :func:`versus_baseline`'s rows."""
    words = [r["word"] for r in rows if r["metric"] == metric]
    return (
        f"better in {words.count('better')}, worse in {words.count('worse')}, inconclusive in "
        f"{words.count('inconclusive')} of {len(words)}"
    )


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


def add_workers_argument(parser: Any) -> None:
    """``--workers N``, for experiments made of independent units (:func:`runner.run_units`)."""
    parser.add_argument(
        "--workers",
        type=runner.positive_int,
        default=1,
        metavar="N",
        help="run units in N processes, one torch thread each (Linux); the results are those of 1 process",
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
