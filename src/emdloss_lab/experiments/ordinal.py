"""``emdloss experiment ordinal``: ordinal classification on real tables, classes on a chain.

Datasets (read in place from the shared data folder, see its PROVENANCE.md): UCI wine quality (red, white),
UCI abalone (rings), and Ben-David's ERA and LEV (WEKA/OpenML). The classes are the integer levels from the
smallest to the largest observed target, in order (levels with no example stay in the chain, so the chain
distance is the difference of levels); the hierarchy is ``Tree.chain(K)``.

Protocol: for each seed a random stratification-free split (70 % train, 30 % test), features standardised on the
training split, a one-hidden-layer MLP (64 units) trained by Adam for a fixed number of steps with each loss:
cross-entropy, exact EMD (rho = 1), relaxed EMD (rho = 2) and CE + relaxed EMD. Reported on the test split: accuracy,
mean absolute error in classes, quadratic weighted kappa and mean exact EMD of the predicted distribution.
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
from .training import (
    add_experiment_arguments,
    chain_metrics,
    loss_table,
    make_loss,
    mlp,
    num_seeds,
    on_small_model_cpu,
    standardize,
    summarize,
    train,
)

DATASETS = ("wine-red", "wine-white", "abalone", "era", "lev")
LOSSES = ("ce", "emd", "relaxed", "ce+relaxed")
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


def run_unit(name: str, loss: str, seed: int, steps: int) -> dict[str, float]:
    x, y = load(name)
    k = int(y.max()) + 1
    tree = Tree.chain(k)
    perm = np.random.default_rng(seed).permutation(len(y))
    ntr = int(0.7 * len(y))
    tr, te = perm[:ntr], perm[ntr:]
    xtr, xte = standardize(x[tr], x[te])
    ytr, yte = torch.from_numpy(y[tr]), torch.from_numpy(y[te])
    runner.seed_everything(seed)
    model = mlp(x.shape[1], k, 64)
    train(model, make_loss(loss, tree), xtr, ytr, steps=steps, lr=3e-3, batch_size=128, seed=seed)
    with torch.no_grad():
        return chain_metrics(model(xte), yte, tree)


@on_small_model_cpu
def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    out = runner.output_folder(args.out)
    seeds = num_seeds(args, 5)
    config = {
        "experiment": "ordinal",
        "datasets": ["lev"] if args.smoke else ["era", "lev"] if args.quick else list(DATASETS),
        "losses": list(LOSSES),
        "seeds": seeds,
        "steps": 20 if args.smoke else 150 if args.quick else 1500,
        "model": "MLP(64) Adam lr 3e-3 wd 1e-4 batch 128; 70/30 random split per seed",
    }
    ckpt = runner.Checkpoint(out, config, resume=args.resume)
    units = [(d, loss, s) for d in config["datasets"] for s in range(seeds) for loss in LOSSES]
    for d, loss, s in runner.progress(units, "ordinal", enabled=not args.no_progress):
        key = f"{d}/{loss}/{s}"
        if key not in ckpt:
            ckpt[key] = run_unit(d, loss, s, config["steps"])
    results = {
        d: {loss: [ckpt[f"{d}/{loss}/{s}"] for s in range(seeds)] for loss in LOSSES} for d in config["datasets"]
    }
    text = [runner.report_header("Ordinal classification on real tables (chains)", config)]
    for d in config["datasets"]:
        text.append(f"## {d}\n\n" + loss_table(results[d], LOSSES, METRICS) + "\n")
    text.append("Test split, mean ± std over seeds. Higher is better for accuracy and qwk; lower for mae and emd.\n")
    runner.publish(out, {"config": config, "results": results}, text)
    _plot(results, config["datasets"], out / "ordinal_mae.png")
    runner.wrote(out, ["report.md", "results.json", "ordinal_mae.png"], time.perf_counter() - t0)
    return 0


def _plot(results: dict[str, Any], datasets: list[str], path: Path) -> None:
    plt = runner.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    width = 0.8 / len(LOSSES)
    for ax, metric in zip(axes, ["mae", "qwk"]):
        for i, loss in enumerate(LOSSES):
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
