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

Losses: cross-entropy, exact EMD (rho = 1), relaxed EMD (rho = 2), CE + lam * relaxed EMD, and Bertinetto et al.'s
hierarchical cross-entropy and soft labels as they define them (:mod:`.baselines`).

Protocol (:func:`.training.fit_tuned`, the same for every loss): a validation split of 20 % carved from the
training examples (stratified by class); an equal tuning budget per loss (``budget`` trials of learning rate and
the loss's own hyper-parameter: ``lam``, ``alpha`` or ``beta`` over its published grid); training in epochs with
early stopping on validation top-1; the best trial is scored once on the test split. Per seed the generated
class means, the data and the split change; the losses of one seed share them, so they are compared in pairs
(differences to cross-entropy with 95 % bootstrap intervals over the seeds).

Metrics (test split): top-1, top-5; over the mistakes, the LCA height (Bertinetto et al.'s mistake severity) and
the path length; their average hierarchical distance@5 (LCA height) and the path-length version; the mean exact
EMD; and collapse diagnostics: the number of distinct predicted classes and the mean depth of the predicted
classes (the exact EMD with hard labels is not a proper scoring rule for top-1, see docs/theory.md: its
minimiser piles the mass on the class of least expected tree distance, often a few central ones).
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
    add_workers_argument,
    fit_tuned,
    loss_table,
    make_loss,
    mlp,
    num_seeds,
    on_small_model_cpu,
    paired_table,
    summarize,
    tree_metrics,
    verdict_counts,
    verdict_table,
    versus_baseline,
)

LOSSES = ("ce", "emd", "relaxed", "ce+relaxed", "hxe", "soft")
METRICS = ["top1", "top5", "lca_height", "mistake_path", "hdist@5", "hdist_path@5", "emd"]
PAIRED = ["top1", "lca_height", "hdist@5"]
COLLAPSE = ["distinct_pred", "pred_depth"]
TREES = {"imagenet": data.imagenet_tree, "inat19": data.inaturalist19_tree, "tiered": data.tiered_imagenet_tree}


def _top1(logits: torch.Tensor, y: torch.Tensor) -> float:
    """The validation criterion: top-1 accuracy."""
    return float((logits.argmax(1) == y).double().mean())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_experiment_arguments(parser, default_seeds=5)
    add_workers_argument(parser)


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


def _fit_and_score(task: dict[str, Any], tree: Tree, loss: str, seed: int, hidden: int, protocol: dict[str, Any]):
    model, info = fit_tuned(
        lambda: mlp(task["x_train"].shape[1], tree.num_classes, hidden),
        lambda hp: make_loss(loss, tree, hp),
        loss,
        task["x_train"],
        task["y_train"],
        protocol=protocol,
        seed=seed,
        score=_top1,
    )
    with torch.no_grad():
        result = tree_metrics(model(task["x_test"]), task["y_test"], tree)
    chosen = {k: info[k] for k in ("lr", "hp", "best_epoch", "epochs", "val_score")}
    return {**result, "chosen": chosen}


def run_generated(tree_name: str, per_class: int, loss: str, seed: int, cfg: dict[str, Any]) -> dict[str, Any]:
    tree = TREES[tree_name]()
    task = generated_task(tree, per_class, seed, cfg["generated"])
    return _fit_and_score(task, tree, loss, seed, 0, cfg["protocol"])


def run_digits(per_class: int, loss: str, seed: int, cfg: dict[str, Any]) -> dict[str, Any]:
    from .demo import tree_task

    task = tree_task(seed, per_class)
    protocol = {**cfg["protocol"], "batch": 64, "lr_range": cfg["digits"]["lr_range"]}
    return _fit_and_score(task, task["tree"], loss, seed, 64, protocol)


def configuration(quick: bool, seeds: int, smoke: bool = False) -> dict[str, Any]:
    quick = quick or smoke
    return {
        "experiment": "hierarchy",
        "seeds": seeds,
        "losses": list(LOSSES),
        "protocol": {
            "val_fraction": 0.2,
            "budget": 1 if smoke else 2 if quick else 6,
            "lr_range": [1e-3, 3e-2],
            "batch": 256,
            "max_epochs": 1 if smoke else 4 if quick else 60,
            "patience": 1 if smoke else 2 if quick else 5,
            "select": "validation top-1",
        },
        "generated": {"dim": 32, "sigma_node": 1.0, "sigma_within": 3.0, "test_per_class": 1 if smoke else 10},
        "imagenet_per_class": [2] if smoke else [5] if quick else [5, 10, 20, 50, 100],
        "other_trees": [] if quick else ["inat19", "tiered"],
        "other_per_class": 50,
        "digits": {
            "per_class": 5,
            "lr_range": [1e-3, 3e-2],
            "model": "MLP(64), batch 64; tree: average linkage of training class means",
        },
    }


@on_small_model_cpu
def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    out = runner.output_folder(args.out)
    seeds = num_seeds(args, 5)
    cfg = configuration(args.quick, seeds, args.smoke)
    ckpt = runner.Checkpoint(out, cfg, resume=args.resume)
    units: list[tuple[str, int, str, int]] = []
    for s in range(seeds):
        units += [("imagenet", k, loss, s) for k in cfg["imagenet_per_class"] for loss in LOSSES]
        units += [(t, cfg["other_per_class"], loss, s) for t in cfg["other_trees"] for loss in LOSSES]
        units += [("digits", cfg["digits"]["per_class"], loss, s) for loss in LOSSES]

    def compute(t: str, k: int, loss: str, s: int) -> dict[str, Any]:
        return run_digits(k, loss, s, cfg) if t == "digits" else run_generated(t, k, loss, s, cfg)

    results = runner.run_units(ckpt, units, compute, "hierarchy", not args.no_progress, args.workers)

    record = {"config": cfg, "results": results}
    header = runner.report_header("Hierarchical classification in the small-data regime", cfg)
    runner.publish(out, record, [header, render(record)])
    _plot(results, cfg["imagenet_per_class"], out / "hierarchy_imagenet_sweep.png")
    pareto(results, out / "hierarchy_pareto.png")
    names = ["report.md", "results.json", "hierarchy_imagenet_sweep.png", "hierarchy_pareto.png"]
    runner.wrote(out, names, time.perf_counter() - t0)
    return 0


def render(record: dict[str, Any]) -> str:
    """The report's tables from a run's ``{"config", "results"}`` (also what ``emdloss report`` prints)."""
    text = [group_report(group, by_loss) for group, by_loss in record["results"].items()]
    text.append(
        "Test split, mean ± std over seeds; paired differences to cross-entropy with 95 % percentile-bootstrap "
        "intervals over the seeds. Higher is better for top1/top5; lower for the others (LCA height and path "
        "length over the mistakes only). distinct_pred: number of different predicted classes; pred_depth: mean "
        "hop depth of the predicted classes.\n"
    )
    return "\n".join(text)


#: The losses whose verdicts against cross-entropy are drawn (the EMD family and Bertinetto et al.'s two), and
#: the metrics: top-1 (the paper's claim) and the mistake severity (LCA height over the mistakes).
VERDICT_LOSSES = ("emd", "relaxed", "ce+relaxed", "hxe", "soft")
VERDICT_METRICS = (("top1", "higher"), ("lca_height", "lower"))


def verdicts(record: dict[str, Any]) -> str:
    """Per (tree, examples a class) and loss: does it beat cross-entropy in top-1, and make milder mistakes?
    Paired differences over the seeds with bootstrap intervals (:func:`.training.versus_baseline`)."""
    rows = versus_baseline(record["results"], VERDICT_LOSSES, VERDICT_METRICS)
    table = verdict_table(rows, VERDICT_METRICS, record["config"]["seeds"])
    return "## Claim 2 verdicts: does a loss beat cross-entropy in top-1?\n\n" + table


def claim_summary(record: dict[str, Any]) -> str:
    """One sentence for the README: claim 2 (an EMD loss beats cross-entropy in top-1 with few examples a class)
    at 50 examples a class on the ImageNet tree, and over every group."""
    results = record["results"]
    at_50 = {g: by_loss for g, by_loss in results.items() if g == "imagenet/50"}
    parts = []
    for loss in ("emd", "relaxed", "ce+relaxed"):
        rows = versus_baseline(at_50, (loss,), VERDICT_METRICS)
        top1 = next((r for r in rows if r["metric"] == "top1"), None)
        if top1 is not None:
            d = top1["diff"]
            parts.append(f"{loss} {d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}] ({top1['word']})")
    every = versus_baseline(results, ("emd", "relaxed", "ce+relaxed"), VERDICT_METRICS)
    return (
        "Claim 2, top-1 minus cross-entropy's on the ImageNet tree at 50 examples a class (generated features): "
        + ("; ".join(parts) or "not run")
        + f". Over all {len(results)} groups, the EMD-family losses' top-1 against cross-entropy: "
        + f"{verdict_counts(every, 'top1')}; mistake severity (LCA height): {verdict_counts(every, 'lca_height')}."
    )


def is_full(config: dict[str, Any]) -> bool:
    """Whether ``config`` is the full configuration (any number of seeds >= 5), the one verdicts may rest on."""
    return config["seeds"] >= 5 and {**config, "seeds": 5} == configuration(False, 5)


TITLES = {
    "imagenet": "ImageNet-1k WordNet tree, generated features",
    "inat19": "iNaturalist-19 tree, generated features",
    "tiered": "tieredImageNet-H tree, generated features",
    "digits": "digits (real images), tree from clustering",
}


def group_report(group: str, by_loss: dict[str, list[dict[str, Any]]], heading: str | None = None) -> str:
    """The markdown section of one (tree, examples a class) group: metrics, paired differences, collapse and the
    chosen hyper-parameters, under ``heading`` (default: the tree's title and the examples a class)."""
    t, k = group.split("/")
    losses = [loss for loss in LOSSES if loss in by_loss]
    chosen_rows = []
    for loss in losses:
        ch = [r["chosen"] for r in by_loss[loss] if "chosen" in r]
        hps = sorted({c["hp"] for c in ch if c["hp"] is not None})
        chosen_rows.append(
            [
                loss,
                ", ".join(f"{c['lr']:.2g}" for c in ch),
                ", ".join(f"{h:g}" for h in hps) or "—",
                ", ".join(str(c["best_epoch"]) for c in ch),
            ]
        )
    return (
        f"## {heading or f'{TITLES[t]}, {k} training examples a class'}\n\n"
        + loss_table(by_loss, losses, METRICS)
        + "\n\n"
        + (paired_table(by_loss, losses, PAIRED) + "\n\n" if "ce" in by_loss else "")
        + loss_table(by_loss, losses, COLLAPSE)
        + "\n\n"
        + runner.markdown_table(["loss", "chosen lr (per seed)", "chosen hyper-parameter", "best epoch"], chosen_rows)
        + "\n"
    )


def _plot(
    results: dict[str, Any],
    sizes: list[int],
    path: Path,
    xlabel: str = "training examples a class",
    title: str = "ImageNet-1k WordNet tree, generated features",
) -> None:
    """Top-1, LCA height and hierarchical distance@5 of each loss against the ``imagenet/K`` group's size K."""
    plt = runner.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, metric in zip(axes, ["top1", "lca_height", "hdist@5"]):
        for loss in LOSSES:
            sm = [summarize(results[f"imagenet/{k}"][loss], [metric])[metric] for k in sizes]
            ax.errorbar(sizes, [m for m, _ in sm], yerr=[s for _, s in sm], marker="o", ms=3, capsize=2, label=loss)
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    runner.save_figure(fig, path)


def pareto(results: dict[str, Any], path: Path, columns: int = 3) -> None:
    """Top-1 against mistake severity (LCA height), one panel a group (``columns`` a row), one point a loss
    (mean ± std over the seeds)."""
    plt = runner.pyplot()
    groups = list(results)
    rows = -(-len(groups) // columns)
    cols = min(columns, len(groups))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(groups) :]:
        ax.axis("off")
    for ax, group in zip(axes.flat, groups):
        for i, loss in enumerate(LOSSES):
            if loss not in results[group]:  # a control group may run some of the losses only
                continue
            s = summarize(results[group][loss], ["top1", "lca_height"])
            ax.errorbar(
                s["lca_height"][0], s["top1"][0], xerr=s["lca_height"][1], yerr=s["top1"][1], fmt="o", color=f"C{i}"
            )
            ax.annotate(loss, (s["lca_height"][0], s["top1"][0]), fontsize=7)
        ax.set_title(group, fontsize=9)
        ax.set_xlabel("mistake severity (LCA height)")
        ax.set_ylabel("top-1")
    fig.tight_layout()  # the titles of a lower row clear the axis labels above them
    runner.save_figure(fig, path)
