"""``emdloss demo``: cross-entropy, exact EMD and relaxed EMD on a real chain task and a real tree task.

Everything it needs ships with scikit-learn (``pip install -e .[demo]``); nothing is downloaded.

- Chain (ordered classes): scikit-learn's diabetes data (442 patients, 10 clinical features). Its target, a
  quantitative measure of disease progression one year later, is binned into ``--chain-classes`` ordered
  quantile classes (computed on the training split), so the classes are ordered levels of a real outcome
  and the hierarchy is the chain ``Tree.chain(K)``. This binning is ours, not part of the dataset.
- Tree: scikit-learn's handwritten digits (1,797 8x8 images, 10 classes) in a small-data regime
  (``--per-class`` training images per class, the rest for testing). The tree is induced from the training
  split only: average-linkage clustering of the class-mean images (:func:`emdloss.hierarchies.from_embeddings`),
  so similar-looking digits share a subtree.

Each loss trains the same model (a one-hidden-layer MLP) with the same seeds; the table shows test metrics as
mean ± std over seeds and the PNG the test exact EMD along training. The run ends with a short conclusion drawn
from those numbers (:func:`conclusion`): which loss did best on each headline metric, and whether its lead over
the comparison exceeds the spread over seeds.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from emdloss._optional import require
from emdloss.tree import Tree

from . import runner
from .training import (
    chain_metrics,
    loss_table,
    make_loss,
    mlp,
    on_small_model_cpu,
    standardize,
    summarize,
    train,
    tree_metrics,
)

#: what ``emdloss demo --help`` says
DESCRIPTION = (
    "Train cross-entropy, exact EMD and relaxed EMD on two real tasks that ship with scikit-learn (nothing is "
    "downloaded; no shared data needed): diabetes progression binned into ordered classes (a chain), and "
    "handwritten digits with a few training images a class (a tree clustered from the training split). Prints a "
    "table of test metrics per task and a short conclusion, and writes report.md, results.json and demo.png to "
    "--out. About a minute on 2 CPUs with the defaults."
)
DEMO_LOSSES = ("ce", "emd", "relaxed")
LABELS = {"ce": "cross-entropy", "emd": "EMD (rho=1)", "relaxed": "relaxed EMD (rho=2)"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="emdloss-demo", help="output folder for report.md, results.json and demo.png")
    parser.add_argument("--seeds", type=runner.positive_int, default=3, help="number of seeds (runs of each loss)")
    parser.add_argument("--steps", type=runner.positive_int, default=200, help="training steps per run")
    parser.add_argument(
        "--per-class",
        type=runner.positive_int,
        default=10,
        help="digits training images per class (the rest are the test split)",
    )
    parser.add_argument(
        "--chain-classes",
        type=runner.int_at_least(2),
        default=10,
        help="ordered classes the diabetes outcome is binned into",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


# ---------------------------------------------------------------------- data


def chain_task(seed: int, num_classes: int) -> dict[str, Any]:
    """Diabetes progression in ``num_classes`` quantile classes; a random half for training."""
    load_diabetes = require("sklearn.datasets", "demo", "emdloss demo").load_diabetes

    x, t = load_diabetes(return_X_y=True)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(t))
    tr, te = perm[: len(t) // 2], perm[len(t) // 2 :]
    edges = np.quantile(t[tr], np.linspace(0, 1, num_classes + 1)[1:-1])
    y = np.searchsorted(edges, t, side="right")
    xtr, xte = standardize(x[tr], x[te])
    return {
        "tree": Tree.chain(num_classes),
        "x_train": xtr,
        "y_train": torch.from_numpy(y[tr]),
        "x_test": xte,
        "y_test": torch.from_numpy(y[te]),
        "metrics": chain_metrics,
    }


def tree_task(seed: int, per_class: int) -> dict[str, Any]:
    """Digits with ``per_class`` training images a class and a tree clustered from the training class means."""
    load_digits = require("sklearn.datasets", "demo", "emdloss demo").load_digits

    from emdloss.hierarchies import from_embeddings

    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(seed)
    tr = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:per_class] for c in range(10)])
    te = np.setdiff1d(np.arange(len(y)), tr)
    means = np.stack([x[tr][y[tr] == c].mean(0) for c in range(10)])
    tree = from_embeddings(means, [str(c) for c in range(10)], method="average")
    xtr, xte = standardize(x[tr], x[te])
    return {
        "tree": tree,
        "x_train": xtr,
        "y_train": torch.from_numpy(y[tr]),
        "x_test": xte,
        "y_test": torch.from_numpy(y[te]),
        "metrics": tree_metrics,
    }


# ---------------------------------------------------------------------- one run


def run_one(
    task: dict[str, Any], loss: str, seed: int, steps: int, hidden: int, lr: float, batch: int
) -> dict[str, Any]:
    """Train one model; return the final test metrics and the test-EMD curve."""
    tree = task["tree"]
    runner.seed_everything(seed)
    model = mlp(task["x_train"].shape[1], tree.num_classes, hidden)
    curve: list[tuple[int, float]] = []

    def on_eval(step: int, m: torch.nn.Module) -> None:
        curve.append((step, task["metrics"](m(task["x_test"]), task["y_test"], tree)["emd"]))

    train(
        model,
        make_loss(loss, tree),
        task["x_train"],
        task["y_train"],
        steps=steps,
        lr=lr,
        batch_size=batch,
        seed=seed,
        eval_every=max(1, steps // 10),
        on_eval=on_eval,
    )
    with torch.no_grad():
        result = task["metrics"](model(task["x_test"]), task["y_test"], tree)
    return {**result, "curve": curve}


# ---------------------------------------------------------------------- main


TASKS = {
    # name: (title, metrics shown)
    "chain": ("diabetes progression, ordered classes (chain)", ["accuracy", "mae", "qwk", "emd"]),
    "tree": ("digits, few examples a class (tree from clustering)", ["top1", "mistake_severity", "hdist@5", "emd"]),
}


@on_small_model_cpu
def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    out = runner.output_folder(args.out)
    again = " (replacing the results there)" if (out / "results.json").exists() else ""
    print(
        f"emdloss demo: writing to {os.path.join(str(out.resolve()), '')}{again}; choose the folder with --out",
        flush=True,
    )
    config = {
        "seeds": args.seeds,
        "steps": args.steps,
        "per_class": args.per_class,
        "chain_classes": args.chain_classes,
        "losses": list(DEMO_LOSSES),
        "model": "MLP 1 hidden layer (32 chain / 64 tree), Adam lr 1e-2, weight decay 1e-4",
    }
    units = [(task, loss, seed) for task in TASKS for seed in range(args.seeds) for loss in DEMO_LOSSES]
    results: dict[str, dict[str, list[dict[str, Any]]]] = {t: {loss: [] for loss in DEMO_LOSSES} for t in TASKS}
    cache: dict[tuple[str, int], dict[str, Any]] = {}
    for task_name, loss, seed in runner.progress(units, "emdloss demo", enabled=not args.no_progress):
        if (task_name, seed) not in cache:
            cache[(task_name, seed)] = (
                chain_task(seed, args.chain_classes) if task_name == "chain" else tree_task(seed, args.per_class)
            )
        task = cache[(task_name, seed)]
        hidden, batch = (32, 256) if task_name == "chain" else (64, 64)
        results[task_name][loss].append(run_one(task, loss, seed, args.steps, hidden, 1e-2, batch))

    text = [runner.report_header("emdloss demo", config)]
    for task_name, (title, keys) in TASKS.items():
        table = loss_table(results[task_name], DEMO_LOSSES, keys, LABELS)
        text.append(f"## {title}\n\n{table}\n")
    arrows = (
        "Higher is better for accuracy, qwk and top1; lower for mae, mistake_severity (mean LCA height of "
        "the mistakes, Bertinetto et al. 2020), hdist@5 (LCA height, top 5) and emd (mean exact EMD to the true "
        "class on the test split)."
    )
    summary = conclusion(results, args.seeds, args.steps)
    report = "\n".join(text) + "\n" + arrows + "\n\n## Conclusion\n\n" + summary + "\n"
    runner.write_text(out / "report.md", report)
    runner.write_json(out / "results.json", {"config": config, "results": results, "conclusion": summary})
    _plot(results, out / "demo.png")
    print("\n".join(text[1:]))
    print(arrows)
    print(f"\nConclusion\n\n{summary}\n")
    runner.wrote(out, ["report.md", "results.json", "demo.png"], time.perf_counter() - t0)
    return 0


#: what the conclusion compares: (task, metric, higher is better, what the best loss had, unit)
VERDICTS = [
    ("chain", "mae", False, "the smallest mean absolute error", " classes"),
    ("chain", "qwk", True, "the highest quadratic weighted kappa", ""),
    ("tree", "mistake_severity", False, "the mildest mistakes (mean LCA height of a wrong guess)", ""),
    ("tree", "top1", True, "the highest top-1 accuracy", ""),
]
SHORT = {"chain": "Diabetes, ordered classes", "tree": "Digits, tree"}
METRIC_NAMES = {"mae": "MAE", "qwk": "QWK", "mistake_severity": "mistake severity", "top1": "top-1"}


def conclusion(results: dict[str, dict[str, list[dict[str, Any]]]], seeds: int, steps: int) -> str:
    """A few plain sentences drawn from ``results``: for each headline metric, the loss with the best mean,
    its mean ± std against cross-entropy's (or, when cross-entropy is best, against the best EMD loss), and
    whether the gap exceeds the spread over seeds (the two mean ± std intervals do not overlap)."""
    lines: list[str] = []
    ahead: dict[str, list[str]] = {"emd": [], "ce": []}
    for task in SHORT:
        parts = []
        for t, metric, higher, words, unit in VERDICTS:
            if t != task:
                continue
            stats = {loss: summarize(results[task][loss], [metric])[metric] for loss in DEMO_LOSSES}

            def rank(loss: str, stats: dict = stats, higher: bool = higher) -> float:
                m = stats[loss][0]
                return -math.inf if math.isnan(m) else (m if higher else -m)

            ranked = sorted(DEMO_LOSSES, key=rank, reverse=True)
            best = ranked[0]
            other = "ce" if best != "ce" else ranked[1]
            (mb, sb), (mo, so) = stats[best], stats[other]
            if math.isnan(mb) or math.isnan(mo):
                parts.append(f"{METRIC_NAMES[metric]} could not be compared (no value for some loss)")
                continue
            if math.isclose(mb, mo, rel_tol=1e-12, abs_tol=1e-12):
                parts.append(f"{LABELS[best]} and {LABELS[other]} tied on {METRIC_NAMES[metric]} at {mb:.3f}")
                continue
            clear = seeds > 1 and abs(mb - mo) > sb + so
            verdict = (
                "beyond the spread over seeds"
                if clear
                else "a gap within the spread over seeds"
                if seeds > 1
                else "one seed, so no spread to judge by"
            )
            parts.append(
                f"{LABELS[best]} had {words}, {mb:.3f} ± {sb:.3f}{unit} against {mo:.3f} ± {so:.3f} for "
                f"{LABELS[other]} ({verdict})"
            )
            if clear:
                ahead["ce" if best == "ce" else "emd"].append(f"{METRIC_NAMES[metric]} ({task})")
        lines.append(f"- {SHORT[task]}: " + "; ".join(parts) + ".")
    if seeds < 2:
        short = (
            "With one seed there is no spread to tell a real difference from chance: run with --seeds 3 or "
            "more before drawing a conclusion."
        )
    elif not ahead["emd"] and not ahead["ce"]:
        short = (
            f"No gap exceeds the spread over the {seeds} seeds, so at {steps} steps these runs do not separate "
            "the losses; more --seeds (or --steps) would give a firmer answer."
        )
    else:
        said = []
        if ahead["emd"]:
            said.append("an EMD loss led cross-entropy beyond the spread over seeds on " + ", ".join(ahead["emd"]))
        if ahead["ce"]:
            said.append("cross-entropy led the EMD losses beyond that spread on " + ", ".join(ahead["ce"]))
        rest = len(VERDICTS) - len(ahead["emd"]) - len(ahead["ce"])
        others = {0: "", 1: "; the other comparison is within the spread"}.get(
            rest, f"; the other {rest} comparisons are within the spread"
        )
        short = "; ".join(said) + others + "."
        short = short[0].upper() + short[1:]
    runs = f"{seeds} seed{'s' if seeds != 1 else ''}, {steps} step{'s' if steps != 1 else ''} a run"
    return "\n".join(lines) + f"\n\nIn short ({runs}): {short}"


def _plot(results: dict[str, dict[str, list[dict[str, Any]]]], path: Path) -> None:
    plt = runner.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, (task_name, (title, _)) in zip(axes, TASKS.items()):
        for loss in DEMO_LOSSES:
            runs = results[task_name][loss]
            steps = [s for s, _ in runs[0]["curve"]]
            vals = np.array([[v for _, v in r["curve"]] for r in runs])
            m, s = vals.mean(0), vals.std(0)
            ax.plot(steps, m, label=LABELS[loss])
            ax.fill_between(steps, m - s, m + s, alpha=0.2)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("training step")
        ax.set_ylabel("test exact EMD to the true class")
        ax.legend(fontsize=8)
    runner.save_figure(fig, path)
