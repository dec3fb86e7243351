"""``emdloss experiment ordinal``: ordinal classification on real tables, classes on a chain.

Datasets (read in place from the shared data folder, see its PROVENANCE.md): UCI wine quality (red, white),
UCI abalone (rings), and Ben-David's ERA and LEV (WEKA/OpenML). The classes are the integer levels from the
smallest to the largest observed target, in order (levels with no example stay in the chain, so the chain
distance is the difference of levels); the hierarchy is ``Tree.chain(K)``.

Protocol: for each seed a random split (70 % train, 30 % test), features standardised on the training split, and
for every loss the protocol of :func:`.training.fit_tuned`: a stratified validation split of 20 % carved from the
training part, an equal tuning budget (learning rate, and ``lam`` for CE + lam * relaxed EMD), epochs with early
stopping on validation MAE. Model: a one-hidden-layer MLP (64 units). Losses: cross-entropy, exact EMD (rho = 1),
relaxed EMD (rho = 2; on a unit chain this is dlordinal's ``EMDLoss`` and C times Hou et al.'s squared EMD, see
:mod:`.baselines`), CE + lam * relaxed EMD, and the ordinal baselines CORAL and CORN from the ``coral-pytorch``
package (their own output layers and prediction rule; skipped with a note when the package is missing).
Reported on the test split: accuracy, mean absolute error in classes, quadratic weighted kappa and the mean exact
EMD of the predicted distribution, and paired differences to cross-entropy with 95 % bootstrap intervals.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from emdloss.tree import Tree

from ..data import data_file
from . import runner
from .baselines import ORDINAL, ordinal_head, ordinal_loss, ordinal_probabilities
from .training import (
    add_experiment_arguments,
    chain_metrics,
    fit_tuned,
    loss_table,
    make_loss,
    num_seeds,
    on_small_model_cpu,
    paired_table,
    standardize,
    summarize,
    verdict_counts,
    verdict_table,
    versus_baseline,
)

DATASETS = ("wine-red", "wine-white", "abalone", "era", "lev")
LOSSES = ("ce", "emd", "relaxed", "ce+relaxed", "coral", "corn")
METRICS = ["accuracy", "mae", "qwk", "emd"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_experiment_arguments(parser, default_seeds=5)


def load(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Features (n, d) float64 and 0-based ordered levels (n,) of dataset ``name``."""
    if name in ("wine-red", "wine-white"):
        path = data_file(f"ordinal/ordinal-xai/winequality-{name.split('-')[1]}.csv")
        arr = np.loadtxt(path, delimiter=";", skiprows=1)
        x, t = arr[:, :-1], arr[:, -1]
    elif name == "abalone":
        with open(data_file("ordinal/ordinal-xai/abalone.csv"), newline="") as fh:
            rows = list(csv.reader(fh))[1:]
        sex = np.array([[r[0] == s for s in "MFI"] for r in rows], dtype=np.float64)  # one-hot sex
        num = np.array([[float(v) for v in r[1:]] for r in rows])
        x, t = np.hstack([sex, num[:, :-1]]), num[:, -1]
    elif name in ("era", "lev"):
        arr = np.loadtxt(data_file(f"ordinal/skordinal/{name}.csv"), delimiter=",", skiprows=1)
        x, t = arr[:, :-1], arr[:, -1]
    else:
        raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
    t = t.astype(np.int64)
    return x, t - t.min()


def _have_coral() -> bool:
    try:
        import coral_pytorch  # noqa: F401
    except ImportError:
        return False
    return True


def _neg_mae(pred: torch.Tensor, y: torch.Tensor) -> float:
    return -float((pred - y).abs().double().mean())


def run_unit(name: str, loss: str, seed: int, protocol: dict[str, Any]) -> dict[str, Any]:
    x, y = load(name)
    k = int(y.max()) + 1
    tree = Tree.chain(k)
    perm = np.random.default_rng(seed).permutation(len(y))
    ntr = int(0.7 * len(y))
    tr, te = perm[:ntr], perm[ntr:]
    xtr, xte = standardize(x[tr], x[te])
    ytr, yte = torch.from_numpy(y[tr]), torch.from_numpy(y[te])
    d = x.shape[1]
    if loss in ORDINAL:

        def make_model() -> torch.nn.Module:
            return torch.nn.Sequential(torch.nn.Linear(d, 64), torch.nn.ReLU(), ordinal_head(loss, 64, k))

        fn = ordinal_loss(loss, k)
        model, info = fit_tuned(
            make_model,
            lambda hp: fn,
            loss,
            xtr,
            ytr,
            protocol=protocol,
            seed=seed,
            score=lambda z, t: _neg_mae(ordinal_probabilities(loss, z)[1], t),
        )
        with torch.no_grad():
            probs, pred = ordinal_probabilities(loss, model(xte))
        result = chain_metrics(pred, yte, tree, probs=probs)
    else:
        model, info = fit_tuned(
            lambda: torch.nn.Sequential(torch.nn.Linear(d, 64), torch.nn.ReLU(), torch.nn.Linear(64, k)),
            lambda hp: make_loss(loss, tree, hp),
            loss,
            xtr,
            ytr,
            protocol=protocol,
            seed=seed,
            score=lambda z, t: _neg_mae(z.argmax(1), t),
        )
        with torch.no_grad():
            result = chain_metrics(model(xte), yte, tree)
    return {**result, "chosen": {k_: info[k_] for k_ in ("lr", "hp", "best_epoch", "epochs", "val_score")}}


def configuration(quick: bool, smoke: bool, seeds: int, losses: list[str]) -> dict[str, Any]:
    quick = quick or smoke
    return {
        "experiment": "ordinal",
        "datasets": ["lev"] if smoke else ["era", "lev"] if quick else list(DATASETS),
        "losses": losses,
        "seeds": seeds,
        "protocol": {
            "val_fraction": 0.2,
            "budget": 1 if smoke else 2 if quick else 6,
            "lr_range": [3e-4, 1e-2],
            "batch": 128,
            "max_epochs": 2 if smoke else 8 if quick else 300,
            "patience": 1 if smoke else 3 if quick else 20,
            "select": "validation MAE",
        },
        "model": "MLP(64), Adam wd 1e-4; 70/30 random split per seed, 20 % of the 70 for validation",
    }


@on_small_model_cpu
def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    out = runner.output_folder(args.out)
    seeds = num_seeds(args, 5)
    losses = [loss for loss in LOSSES if loss not in ORDINAL or _have_coral()]
    config = configuration(args.quick, args.smoke, seeds, losses)
    ckpt = runner.Checkpoint(out, config, resume=args.resume)
    units = [(d, loss, s) for d in config["datasets"] for s in range(seeds) for loss in losses]
    for d, loss, s in runner.progress(units, "ordinal", enabled=not args.no_progress):
        key = f"{d}/{loss}/{s}"
        if key not in ckpt:
            ckpt[key] = run_unit(d, loss, s, config["protocol"])
    results = {
        d: {loss: [ckpt[f"{d}/{loss}/{s}"] for s in range(seeds)] for loss in losses} for d in config["datasets"]
    }
    record = {"config": config, "results": results}
    header = runner.report_header("Ordinal classification on real tables (chains)", config)
    runner.publish(out, record, [header, render(record)])
    _plot(results, config["datasets"], losses, out / "ordinal_mae.png")
    runner.wrote(out, ["report.md", "results.json", "ordinal_mae.png"], time.perf_counter() - t0)
    return 0


def render(record: dict[str, Any]) -> str:
    """The report's tables from a run's ``{"config", "results"}`` (also what ``emdloss report`` prints)."""
    config, results = record["config"], record["results"]
    losses = config["losses"]
    text = []
    if any(loss not in losses for loss in LOSSES):
        text.append("CORAL and CORN were skipped: coral-pytorch is not installed (pip install 'emdloss[bench]').\n")
    for d in config["datasets"]:
        text.append(
            f"## {d}\n\n"
            + loss_table(results[d], losses, METRICS)
            + "\n\n"
            + paired_table(results[d], losses, METRICS)
            + "\n"
        )
    text.append(
        "Test split, mean ± std over seeds; paired differences to cross-entropy with 95 % percentile-bootstrap "
        "intervals over the seeds. Higher is better for accuracy and qwk; lower for mae and emd.\n"
    )
    return "\n".join(text)


#: The EMD-family losses whose verdicts against cross-entropy are drawn, and the metrics (which way is better).
VERDICT_LOSSES = ("emd", "relaxed", "ce+relaxed")
VERDICT_METRICS = (("accuracy", "higher"), ("mae", "lower"))


def verdicts(record: dict[str, Any]) -> str:
    """Per dataset and EMD-family loss: does it beat cross-entropy in accuracy and MAE? Paired differences over
    the seeds with bootstrap intervals (:func:`.training.versus_baseline`)."""
    rows = versus_baseline(record["results"], VERDICT_LOSSES, VERDICT_METRICS)
    table = verdict_table(rows, VERDICT_METRICS, record["config"]["seeds"])
    return "## Verdicts: does an EMD loss beat cross-entropy?\n\n" + table


def claim_summary(record: dict[str, Any]) -> str:
    """One sentence for the README: per EMD-family loss, on how many of the real tables it beat cross-entropy."""
    parts = []
    for loss in VERDICT_LOSSES:
        rows = versus_baseline(record["results"], (loss,), VERDICT_METRICS)
        if rows:
            parts.append(f"{loss}: accuracy {verdict_counts(rows, 'accuracy')}, MAE {verdict_counts(rows, 'mae')}")
    return (
        f"Against cross-entropy on {len(record['config']['datasets'])} real ordinal tables (datasets): "
        + "; ".join(parts)
        + "."
    )


def is_full(config: dict[str, Any]) -> bool:
    """Whether ``config`` is the full configuration (any number of seeds >= 5), the one verdicts may rest on."""
    full = configuration(False, False, 5, config["losses"])
    return config["seeds"] >= 5 and {**config, "seeds": 5} == full and set(config["losses"]) == set(LOSSES)


def _plot(results: dict[str, Any], datasets: list[str], losses: list[str], path: Path) -> None:
    plt = runner.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    width = 0.8 / len(losses)
    for ax, metric in zip(axes, ["mae", "qwk"]):
        for i, loss in enumerate(losses):
            sm = [summarize(results[d][loss], [metric])[metric] for d in datasets]
            ax.bar(
                np.arange(len(datasets)) + i * width,
                [m for m, _ in sm],
                width,
                yerr=[s for _, s in sm],
                label=loss,
                capsize=2,
            )
        ax.set_xticks(np.arange(len(datasets)) + 0.4 - width / 2, datasets)
        ax.set_ylabel(f"test {metric}")
        ax.legend(fontsize=7)
    runner.save_figure(fig, path)
