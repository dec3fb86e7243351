"""``emdloss experiment hierarchy``: hierarchical classification in the small-data regime (the headline claim).

The paper trains on ImageNet with 50 images a class and reports that an EMD loss on the WordNet tree beats
cross-entropy in top-1. The images are not here, so this experiment has two honest substitutes (and
``emdloss train-imagenet`` runs the real thing for whoever has the images):

(a) Real hierarchies, generated features. On the real ImageNet-1k WordNet tree (``imagenet_tree()``, 1,000
    classes), and on the iNaturalist-19 and tieredImageNet-H trees, features follow a hierarchical Gaussian model:

        mu(root) = 0,   mu(v) = mu(parent(v)) + sigma_node * w_v^(1/2) * eps_v,   eps_v ~ N(0, I_d)
        x | class c   ~ N(mu(c), sigma_within^2 I_d)

    so classes close in the tree are close in feature space (the squared distance of two class means is
    ``sigma_node^2 * d * D_tree`` in expectation). ``--per-class`` examples a class for training (50 as in the
    paper; swept over 5..100 on ImageNet), 10 a class for testing. Model: a linear classifier (the Bayes
    classifier for this model is linear), Adam, a fixed number of steps.
(b) Real images: scikit-learn's digits in a small-data regime (a few images a class), with the tree induced from
    the training split by average-linkage clustering of the class-mean images; a one-hidden-layer MLP.

Losses: cross-entropy, exact EMD (rho = 1), relaxed EMD (rho = 2), CE + relaxed EMD, and Bertinetto et al.'s
hierarchical cross-entropy (alpha = 0.1) and soft labels (beta = 5 over the tree distance) from
:mod:`.baselines`. Metrics from :mod:`emdloss.metrics`: top-1, top-5, mistake severity (tree distance and LCA
height of the mistakes), hierarchical distance of the top-5, mean exact EMD.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from emdloss.tree import Tree

from .. import data
from . import runner
from .training import (
    add_experiment_arguments,
    loss_table,
    make_loss,
    mlp,
    num_seeds,
    on_small_model_cpu,
    summarize,
    train,
    tree_metrics,
)

LOSSES = ("ce", "emd", "relaxed", "ce+relaxed", "hxe", "soft")
METRICS = ["top1", "top5", "mistake_severity", "lca_height", "hdist@5", "emd"]
TREES = {"imagenet": data.imagenet_tree, "inat19": data.inaturalist19_tree, "tiered": data.tiered_imagenet_tree}
LOSS_KW = {"alpha": 0.1, "beta": 5.0}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_experiment_arguments(parser, default_seeds=2)


def class_means(tree: Tree, dim: int, sigma_node: float, rng: np.random.Generator) -> np.ndarray:
    """(C, dim) class means of the hierarchical Gaussian model (see the module docstring)."""
    parents = np.asarray(tree.parents)
    w = np.asarray(tree.weights, dtype=np.float64)
    mu = np.zeros((tree.num_nodes, dim))
    steps = rng.standard_normal((tree.num_nodes, dim))
    for v in np.asarray(tree.preorder)[1:]:  # parents first
        mu[v] = mu[parents[v]] + sigma_node * np.sqrt(w[v]) * steps[v]
    return mu[np.asarray(tree.classes)]


def generated_task(tree: Tree, per_class: int, seed: int, cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Train (per_class a class) and test (cfg['test_per_class'] a class) sets of the generative model.

    The class means depend on the seed only, not on ``per_class``, so a sweep over ``per_class`` varies the
    amount of data and nothing else; the test set is the same across losses.
    """
    rng = np.random.default_rng([seed, 1])
    mu = class_means(tree, cfg["dim"], cfg["sigma_node"], rng)
    c = tree.num_classes

    def sample(k: int, stream: int) -> tuple[torch.Tensor, torch.Tensor]:
        r = np.random.default_rng([seed, stream])
        y = np.repeat(np.arange(c), k)
        x = mu[y] + cfg["sigma_within"] * r.standard_normal((y.size, cfg["dim"]))
        return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y)

    xtr, ytr = sample(per_class, 2)
    xte, yte = sample(cfg["test_per_class"], 3)
    scale = xtr.std()
    return {"x_train": xtr / scale, "y_train": ytr, "x_test": xte / scale, "y_test": yte}


def run_generated(tree_name: str, per_class: int, loss: str, seed: int, cfg: dict[str, Any]) -> dict[str, float]:
    tree = TREES[tree_name]()
    task = generated_task(tree, per_class, seed, cfg)
    runner.seed_everything(seed)
    model = mlp(cfg["dim"], tree.num_classes, 0)
    train(
        model,
        make_loss(loss, tree, **LOSS_KW),
        task["x_train"],
        task["y_train"],
        steps=cfg["steps"],
        lr=cfg["lr"],
        batch_size=cfg["batch"],
        seed=seed,
    )
    with torch.no_grad():
        return tree_metrics(model(task["x_test"]), task["y_test"], tree)


def run_digits(per_class: int, loss: str, seed: int, steps: int) -> dict[str, float]:
    from .demo import tree_task

    task = tree_task(seed, per_class)
    runner.seed_everything(seed)
    model = mlp(task["x_train"].shape[1], 10, 64)
    train(
        model,
        make_loss(loss, task["tree"], **LOSS_KW),
        task["x_train"],
        task["y_train"],
        steps=steps,
        lr=1e-2,
        batch_size=64,
        seed=seed,
    )
    with torch.no_grad():
        return tree_metrics(model(task["x_test"]), task["y_test"], task["tree"])


def configuration(quick: bool, seeds: int, smoke: bool = False) -> dict[str, Any]:
    quick = quick or smoke
    gen = {
        "dim": 32,
        "sigma_node": 1.0,
        "sigma_within": 3.0,
        "test_per_class": 2 if smoke else 10,
        "lr": 1e-2,
        "batch": 256,
        "steps": 5 if smoke else 60 if quick else 250,
    }
    return {
        "experiment": "hierarchy",
        "seeds": seeds,
        "losses": list(LOSSES),
        "loss_options": LOSS_KW,
        "generated": gen,
        "imagenet_per_class": [2] if smoke else [20] if quick else [5, 10, 20, 50, 100],
        "other_trees": [] if quick else ["inat19", "tiered"],
        "other_per_class": 50,
        "digits": {
            "per_class": 5,
            "steps": 10 if smoke else 100 if quick else 300,
            "model": "MLP(64) Adam lr 1e-2 batch 64; tree: average linkage of training class means",
        },
    }


@on_small_model_cpu
def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    out = runner.output_folder(args.out)
    seeds = num_seeds(args, 2)
    cfg = configuration(args.quick, seeds, args.smoke)
    ckpt = runner.Checkpoint(out, cfg, resume=args.resume)
    units: list[tuple[str, int, str, int]] = []
    for s in range(seeds):
        units += [("imagenet", k, loss, s) for k in cfg["imagenet_per_class"] for loss in LOSSES]
        units += [(t, cfg["other_per_class"], loss, s) for t in cfg["other_trees"] for loss in LOSSES]
        units += [("digits", cfg["digits"]["per_class"], loss, s) for loss in LOSSES]
    for t, k, loss, s in runner.progress(units, "hierarchy", enabled=not args.no_progress):
        key = f"{t}/{k}/{loss}/{s}"
        if key in ckpt:
            continue
        if t == "digits":
            ckpt[key] = run_digits(k, loss, s, cfg["digits"]["steps"])
        else:
            ckpt[key] = run_generated(t, k, loss, s, cfg["generated"])
    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    for t, k, loss, s in units:
        results.setdefault(f"{t}/{k}", {}).setdefault(loss, []).append(ckpt[f"{t}/{k}/{loss}/{s}"])

    titles = {
        "imagenet": "ImageNet-1k WordNet tree, generated features",
        "inat19": "iNaturalist-19 tree, generated features",
        "tiered": "tieredImageNet-H tree, generated features",
        "digits": "digits (real images), tree from clustering",
    }
    text = [runner.report_header("Hierarchical classification in the small-data regime", cfg)]
    for group, by_loss in results.items():
        t, k = group.split("/")
        text.append(f"## {titles[t]}, {k} training examples a class\n\n" + loss_table(by_loss, LOSSES, METRICS) + "\n")
    text.append(
        "Test split, mean ± std over seeds. Higher is better for top1/top5; lower for the others "
        "(mistake severity and LCA height are over the mistakes only).\n"
    )
    runner.publish(out, {"config": cfg, "results": results}, text)
    _plot(results, cfg["imagenet_per_class"], out / "hierarchy_imagenet_sweep.png")
    runner.wrote(out, ["report.md", "results.json", "hierarchy_imagenet_sweep.png"], time.perf_counter() - t0)
    return 0


def _plot(results: dict[str, Any], sizes: list[int], path: Path) -> None:
    plt = runner.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, metric in zip(axes, ["top1", "mistake_severity", "hdist@5"]):
        for loss in LOSSES:
            sm = [summarize(results[f"imagenet/{k}"][loss], [metric])[metric] for k in sizes]
            ax.errorbar(sizes, [m for m, _ in sm], yerr=[s for _, s in sm], marker="o", ms=3, capsize=2, label=loss)
        ax.set_xscale("log")
        ax.set_xlabel("training examples a class")
        ax.set_ylabel(metric)
        ax.legend(fontsize=7)
    fig.suptitle("ImageNet-1k WordNet tree, generated features", fontsize=10)
    runner.save_figure(fig, path)
