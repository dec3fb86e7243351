"""``emdloss experiment histograms``: learning to predict histograms from inputs, scored on a test split.

Claim 1 (the relaxed EMD, rho = 2, converges faster than the exact EMD, rho = 1) in a learning setting. The
convergence experiment fits given targets; here a network maps inputs to histograms and is scored on inputs it
never saw, so speed of training and what it generalises both count.

Tasks (inputs -> a target histogram ``q`` over the classes):

- ``abalone`` (real inputs, a chain): UCI abalone's 10 features -> a discretised Gaussian label distribution over
  the 29 ring levels, centred on the true level: ``q_k ∝ exp(-(k - y)^2 / (2 sigma^2))``, sigma = 2 levels (the
  label distributions of deep label distribution learning, Gao et al. 2017).
- ``tree`` (generated inputs, a real tree): the tieredImageNet-H WordNet tree (608 classes); inputs from the
  hierarchical Gaussian model of the hierarchy experiment (:func:`.hierarchy.class_means`, 32-d), ``per_class``
  examples a class; target ``q ∝ exp(-D_hops[y, :] / tau)``, tau = 1, around the input's class (the convergence
  experiment's tree targets, :func:`.convergence.tree_histograms`).

Splits, drawn per seed: a test split (20 % of abalone; ``test_per_class`` examples a class on the tree) and a
validation split of 20 % carved from the training examples.

Model and training: an MLP with 128 hidden units from scratch, shuffled minibatches of 64 (epochs of a fresh
permutation each), a fixed number of steps, no weight decay, and three optimisers (SGD, SGD with momentum 0.9, Adam). Losses: ``EMD_rho`` for rho in
{1, 1.25, 1.5, 2} and, as the label-distribution-learning reference, cross-entropy to the target histogram
(``ce`` = KL(q || p) + a constant).

Tuning, the same budget for every loss: per seed, each learning rate of the optimiser's half-decade grid is trained,
and the one with the smallest area under the *validation* log-EMD curve (mean over the evaluations after the
start of ``log10 EMD_val``; the splits are evaluated every ``eval_every`` steps) is kept. Its test curve is what is reported. The metric throughout, for every loss, is the exact
EMD (rho = 1, float64) between predicted and target histograms, averaged over the split.

Reported per (task, optimiser, loss), over the seeds: steps until the test EMD has only 50/10/5/1 % left of the
gap between its start and the seed's reference (the smallest test EMD any loss reached with that optimiser); the
test EMD at the evaluation of least validation EMD (early stopping); the area under the test log-EMD curve; training
seconds. Verdicts: rho = 2 against rho = 1, paired over the seeds.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from emdloss.functional import emd
from emdloss.tree import Tree

from ..bench.harness import wait_for_kernel_compiles
from ..data import tiered_imagenet_tree
from . import runner
from .convergence import steps_to, tree_histograms
from .hierarchy import class_means
from .ordinal import load as load_table
from .training import add_experiment_arguments, mlp, num_seeds, on_small_model_cpu, standardize, validation_split

LOSSES = ("ce", "rho1", "rho1.25", "rho1.5", "rho2")
RHO = {"rho1": 1.0, "rho1.25": 1.25, "rho1.5": 1.5, "rho2": 2.0}
LABELS = {"ce": "CE to q", "rho1": "EMD rho=1", "rho1.25": "rho=1.25", "rho1.5": "rho=1.5", "rho2": "relaxed rho=2"}
TASKS = ("abalone", "tree")
OPTIMIZERS = ("sgd", "momentum", "adam")
GAP_LEFT = (0.5, 0.1, 0.05, 0.01)
#: learning rates tried for each optimiser (half-decade steps); the same grid for every loss
LR_GRIDS: dict[str, list[float]] = {
    "sgd": [10 ** (k / 2) for k in range(-2, 5)],  # 0.1 .. 100: rho = 2 gradients are small
    "momentum": [10 ** (k / 2) for k in range(-4, 3)],  # 0.01 .. 10
    "adam": [10 ** (k / 2) for k in range(-7, 0)],  # 3e-4 .. 0.3
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_experiment_arguments(parser, default_seeds=5)


def chain_label_distributions(y: np.ndarray, levels: int, sigma: float) -> np.ndarray:
    """(n, levels) discretised Gaussians ``q_k ∝ exp(-(k - y)^2 / (2 sigma^2))`` around the levels ``y`` (n,)."""
    k = np.arange(levels)[None, :]
    q = np.exp(-((k - np.asarray(y)[:, None]) ** 2) / (2.0 * sigma**2))
    return q / q.sum(1, keepdims=True)


def make_task(task: str, seed: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """The tree and the three splits of ``task`` for ``seed``: ``x_*`` float32 (n, d) inputs, ``q_*`` float64 (n, C)
    target histograms, for * in train, val, test."""
    return _make_task(
        task, seed, json.dumps(runner.to_jsonable(cfg["tasks"][task]), sort_keys=True), cfg["val_fraction"]
    )


@functools.lru_cache(maxsize=4)  # the units of one (task, seed) share it; cfg as JSON keeps the cache key hashable
def _make_task(task: str, seed: int, task_cfg_json: str, val_fraction: float) -> dict[str, Any]:
    c = json.loads(task_cfg_json)
    if task == "abalone":
        x, y = load_table("abalone")
        if c.get("max_examples"):
            keep = np.sort(np.random.default_rng([seed, 5]).permutation(len(y))[: c["max_examples"]])
            x, y = x[keep], y[keep]
        tree = Tree.chain(int(y.max()) + 1)
        perm = np.random.default_rng([seed, 1]).permutation(len(y))
        n_test = round(c["test_fraction"] * len(y))
        rest, test = perm[n_test:], perm[:n_test]
        q = chain_label_distributions(y, tree.num_classes, c["sigma"])
    elif task == "tree":
        tree = tiered_imagenet_tree()
        mu = class_means(tree, c["dim"], c["sigma_node"], np.random.default_rng([seed, 1]))
        y = np.repeat(np.arange(tree.num_classes), c["per_class"] + c["test_per_class"])
        x = mu[y] + c["sigma_within"] * np.random.default_rng([seed, 2]).standard_normal((y.size, c["dim"]))
        first = np.tile(np.arange(c["per_class"] + c["test_per_class"]) < c["test_per_class"], tree.num_classes)
        rest, test = np.flatnonzero(~first), np.flatnonzero(first)
        q = tree_histograms(tree, y, c["tau"])
    else:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    tr, va = validation_split(y[rest], val_fraction, seed)
    tr, va = rest[tr], rest[va]
    x_train, x_val, x_test = standardize(x[tr], x[va], x[test])
    return {
        "tree": tree,
        **{f"x_{s}": v for s, v in zip(("train", "val", "test"), (x_train, x_val, x_test))},
        **{f"q_{s}": torch.from_numpy(q[idx]) for s, idx in (("train", tr), ("val", va), ("test", test))},
    }


def _loss_fn(loss: str, tree: Tree) -> Any:
    if loss == "ce":
        return lambda z, q: -(q * F.log_softmax(z, 1)).sum(1).mean()
    return lambda z, q: emd(z, q, tree, rho=RHO[loss])


def train_curves(
    task: dict[str, Any], loss: str, optimizer: str, lr: float, seed: int, cfg: dict[str, Any]
) -> dict[str, Any]:
    """Train one model for ``cfg["steps"]`` steps; returns the mean exact EMD on the validation and test splits at
    step 0 and every ``cfg["eval_every"]`` steps (``val``, ``test``; NaN after a divergence) and the training
    seconds (evaluation not timed)."""
    tree, x, q = task["tree"], task["x_train"], task["q_train"].float()
    runner.seed_everything(seed)
    model = mlp(x.shape[1], tree.num_classes, cfg["model"]["hidden"])
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9 if optimizer == "momentum" else 0.0)
    loss_fn = _loss_fn(loss, tree)
    g = torch.Generator().manual_seed(seed)
    curves: dict[str, list[float]] = {"val": [], "test": []}

    def evaluate() -> None:
        with torch.no_grad():
            for split in curves:
                logits = model(task[f"x_{split}"]).double()
                ok = bool(torch.isfinite(logits).all())
                curves[split].append(float(emd(logits, task[f"q_{split}"], tree, rho=1.0)) if ok else math.nan)

    evaluate()
    n, batch, every = x.shape[0], cfg["batch"], cfg["eval_every"]
    order = torch.zeros(0, dtype=torch.int64)
    seconds = 0.0
    t0 = time.perf_counter()
    for step in range(1, cfg["steps"] + 1):
        if order.numel() < batch:  # a new epoch: a fresh permutation after the rest of the last one
            order = torch.cat([order, torch.randperm(n, generator=g)])
        idx, order = order[:batch], order[batch:]
        value = loss_fn(model(x[idx]), q[idx])
        if not torch.isfinite(value):
            break
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        if step % every == 0:
            seconds += time.perf_counter() - t0
            evaluate()
            t0 = time.perf_counter()
    points = cfg["steps"] // every + 1
    for split in curves:
        curves[split] += [math.nan] * (points - len(curves[split]))
    return {**curves, "seconds": seconds}


def warm_up(task: dict[str, Any], cfg: dict[str, Any]) -> None:
    """Run every loss once on a training batch and the evaluation once, and wait for the kernels' background
    compiles, so that no run's training seconds include a compile."""
    tree, x, q = task["tree"], task["x_train"], task["q_train"]
    model = mlp(x.shape[1], tree.num_classes, cfg["model"]["hidden"])
    for loss in cfg["losses"]:
        _loss_fn(loss, tree)(model(x[: cfg["batch"]]), q[: cfg["batch"]].float()).backward()
    with torch.no_grad():
        for split in ("val", "test"):
            emd(model(task[f"x_{split}"]).double(), task[f"q_{split}"], tree, rho=1.0)
    wait_for_kernel_compiles()


def log_area(curve: list[float]) -> float:
    """Mean of ``log10 EMD`` over the evaluations after the start (+inf if the run diverged: a NaN, or an EMD above
    10x its start)."""
    c = np.asarray(curve, dtype=np.float64)
    if c.size < 2 or not np.all(np.isfinite(c)) or np.any(c[1:] > 10 * c[0]):
        return math.inf
    return float(np.mean(np.log10(np.maximum(c[1:], 1e-300))))


def configuration(quick: bool, smoke: bool, seeds: int) -> dict[str, Any]:
    quick = quick or smoke
    grids = {o: (g[1::4] if smoke else g[::3] if quick else g) for o, g in LR_GRIDS.items()}
    return {
        "experiment": "histograms",
        "seeds": seeds,
        "tasks": {
            "abalone": {"sigma": 2.0, "test_fraction": 0.2, "max_examples": 300 if smoke else None},
            "tree": {
                "per_class": 2 if smoke else 5,
                "test_per_class": 1 if smoke else 2,
                "dim": 32,
                "sigma_node": 1.0,
                "sigma_within": 3.0,
                "tau": 1.0,
            },
        },
        "val_fraction": 0.2,
        "optimizers": list(OPTIMIZERS),
        # the smoke run skips the non-integer rhos: their kernels would add two cold compiles to the test suite
        "losses": ["ce", "rho1", "rho2"] if smoke else list(LOSSES),
        "model": {"hidden": 128},
        "batch": 64,
        "steps": 10 if smoke else 100 if quick else 400,
        "eval_every": 5 if smoke else 10 if quick else 20,
        "lr_grids": grids,
        "lr_selection": "per seed, smallest mean log10(validation EMD) over the evaluations after step 0",
        "gap_left": list(GAP_LEFT),
    }


@on_small_model_cpu
def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    out = runner.output_folder(args.out)
    seeds = num_seeds(args, 5)
    cfg = configuration(args.quick, args.smoke, seeds)
    ckpt = runner.Checkpoint(out, cfg, resume=args.resume)
    units = [
        (t, o, loss, s, lr)
        for t in TASKS
        for s in range(seeds)
        for o in cfg["optimizers"]
        for loss in cfg["losses"]
        for lr in cfg["lr_grids"][o]
    ]
    if len(ckpt) < len(units):
        for t in TASKS:
            warm_up(make_task(t, 0, cfg), cfg)
    for t, o, loss, s, lr in runner.progress(units, "histograms", enabled=not args.no_progress):
        key = f"{t}/{o}/{loss}/{s}/{lr:.6g}"
        if key not in ckpt:
            ckpt[key] = train_curves(make_task(t, s, cfg), loss, o, lr, s, cfg)
    results = summarize_runs(ckpt.done, cfg)
    record = {"config": cfg, "results": results}
    header = runner.report_header("Learning to predict histograms: test-split convergence, per-loss tuned rates", cfg)
    runner.publish(out, record, [header, verdicts(record), render(record)])
    _plot(results, cfg, out / "histograms.png")
    runner.wrote(out, ["report.md", "results.json", "histograms.png"], time.perf_counter() - t0)
    return 0


def _steps(evaluation: int | None, every: int) -> int | None:
    return None if evaluation is None else evaluation * every


def summarize_runs(done: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    """Per ``task/optimiser/loss``: the learning rate chosen per seed on validation and that run's test curve,
    steps to each gap left, test EMD at the evaluation of least validation EMD, test log-area and seconds."""
    chosen: dict[str, list[dict[str, Any]]] = {}
    for t in TASKS:
        for o in cfg["optimizers"]:
            for loss in cfg["losses"]:
                runs: list[dict[str, Any]] = []
                for s in range(cfg["seeds"]):
                    trials = {lr: done[f"{t}/{o}/{loss}/{s}/{lr:.6g}"] for lr in cfg["lr_grids"][o]}
                    lr = min(trials, key=lambda r: (log_area(trials[r]["val"]), r))
                    runs.append({"lr": lr, **trials[lr]})
                chosen[f"{t}/{o}/{loss}"] = runs
    results: dict[str, Any] = {}
    every = cfg["eval_every"]
    for t in TASKS:
        for o in cfg["optimizers"]:
            # the seed's reference: the least test EMD any loss reached with this optimiser
            refs = [
                min(float(np.nanmin(chosen[f"{t}/{o}/{loss}"][s]["test"])) for loss in cfg["losses"])
                for s in range(cfg["seeds"])
            ]
            for loss in cfg["losses"]:
                runs = chosen[f"{t}/{o}/{loss}"]
                stop = [int(np.nanargmin(r["val"])) for r in runs]
                results[f"{t}/{o}/{loss}"] = {
                    "lr": [r["lr"] for r in runs],
                    "test_curve": [r["test"] for r in runs],
                    "reference": refs,
                    "steps_to_gap": {
                        str(g): [_steps(steps_to(r["test"], g, ref), every) for r, ref in zip(runs, refs)]
                        for g in GAP_LEFT
                    },
                    "test_emd": [r["test"][e] for r, e in zip(runs, stop)],
                    "stop_step": [e * every for e in stop],
                    "test_log_area": [log_area(r["test"]) for r in runs],
                    "seconds": [r["seconds"] for r in runs],
                }
    return results


def _row(loss: str, entry: dict[str, Any], seeds: int) -> list[str]:
    lrs = sorted(set(entry["lr"]))
    cells = [LABELS[loss], ", ".join(f"{lr:.3g}" for lr in lrs)]
    for g in GAP_LEFT:
        hits = [h for h in entry["steps_to_gap"][str(g)] if h is not None]
        cells.append((runner.fmt_mean_std(hits, 0) if hits else "—") + f" ({len(hits)}/{seeds})")
    cells.append(runner.fmt_mean_std(entry["test_emd"], 4))
    area = [a for a in entry["test_log_area"] if math.isfinite(a)]
    cells.append(runner.fmt_mean_std(area, 3) if area else "diverged")
    cells.append(runner.fmt_mean_std(entry["seconds"], 1))
    return cells


def render(record: dict[str, Any]) -> str:
    """The report's tables from a run's ``{"config", "results"}`` (also what ``emdloss report`` prints)."""
    cfg, results = record["config"], record["results"]
    header = ["loss", "lr chosen", *(f"steps to {g:g} left" for g in GAP_LEFT), "test EMD", "test log-area", "seconds"]
    text = []
    for t in TASKS:
        for o in cfg["optimizers"]:
            rows = [_row(loss, results[f"{t}/{o}/{loss}"], cfg["seeds"]) for loss in cfg["losses"]]
            text.append(f"## {t}, {o}\n\n" + runner.markdown_table(header, rows) + "\n")
    text.append(
        "Test split, evaluated every eval_every steps. steps to X left: first evaluation whose test EMD has at most X "
        "of the gap between its start and the "
        "seed's reference (the least test EMD any loss reached with that optimiser) still to close; mean ± std over "
        "the seeds that got there (how many did, in brackets). test EMD: at the evaluation of least validation EMD. "
        "test log-area: mean over the evaluations of log10(test EMD), lower is better. lr chosen: per seed on validation. "
        "seconds: training wall-clock per run (this machine, shared).\n"
    )
    return "\n".join(text)


def claim1_rows(record: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """Per (task, optimiser): paired differences rho=2 - rho=1 over the seeds in steps to 5 % of the gap left (a run
    that never got there counts as the budget + eval_every) and in test EMD at the early-stopping evaluation, 95 %
    bootstrap intervals, and the verdicts (supported: rho = 2 needs fewer steps, or reaches a lower test EMD)."""
    cfg, results = record["config"], record["results"]
    cap = cfg["steps"] + cfg["eval_every"]
    rows = []
    for t in TASKS:
        for o in cfg["optimizers"]:
            a, b = results[f"{t}/{o}/rho2"], results[f"{t}/{o}/rho1"]
            e2 = [cap if h is None else h for h in a["steps_to_gap"]["0.05"]]
            e1 = [cap if h is None else h for h in b["steps_to_gap"]["0.05"]]
            d_steps = runner.paired_bootstrap(e2, e1)
            d_emd = runner.paired_bootstrap(a["test_emd"], b["test_emd"])
            neither = all(h == cap for h in e1 + e2)
            rows.append(
                (
                    f"{t}, {o}",
                    "neither reached 5 %" if neither else f"{d_steps[0]:+.0f} [{d_steps[1]:+.0f}, {d_steps[2]:+.0f}]",
                    "inconclusive" if neither else runner.verdict(d_steps, "lower"),
                    f"{d_emd[0]:+.4f} [{d_emd[1]:+.4f}, {d_emd[2]:+.4f}]",
                    runner.verdict(d_emd, "lower"),
                )
            )
    return rows


def verdicts(record: dict[str, Any]) -> str:
    """:func:`claim1_rows` as the report's verdict table."""
    header = ["setting", "steps to 5 % left: rho=2 - rho=1", "faster", "test EMD: rho=2 - rho=1", "lower EMD"]
    note = (
        f"Paired over the {record['config']['seeds']} seeds (same data, split and initialisation for both rhos); 95 % "
        "percentile-bootstrap intervals, which with 5 pairs describe the seeds' spread rather than test anything. "
        "Each rho has its own learning rate per seed, chosen on validation.\n"
    )
    table = runner.markdown_table(header, [list(r) for r in claim1_rows(record)])
    return "## Claim 1 verdicts on a learning task (test split)\n\n" + table + "\n\n" + note


def claim_summary(record: dict[str, Any]) -> str:
    """One sentence for the README: in how many (task, optimiser) settings rho = 2 trained faster and generalised
    better than rho = 1."""
    rows = claim1_rows(record)
    speed, level = [r[2] for r in rows], [r[4] for r in rows]

    def counts(words: list[str]) -> str:
        return ", ".join(f"{w} in {words.count(w)}" for w in ("supported", "refuted", "inconclusive"))

    return (
        "Claim 1 on a learning task (predicting histograms, abalone chain and tieredImageNet tree, scored on a test "
        f"split; per-rho rates tuned on validation; 3 optimisers): rho = 2 reaching 5 % of the gap sooner than "
        f"rho = 1: {counts(speed)} of {len(rows)} settings; a lower test EMD: {counts(level)}."
    )


def is_full(config: dict[str, Any]) -> bool:
    """Whether ``config`` is the full configuration (any number of seeds >= 5), the one verdicts may rest on."""
    return config["seeds"] >= 5 and {**config, "seeds": 5} == runner.to_jsonable(configuration(False, False, 5))


def _plot(results: dict[str, Any], cfg: dict[str, Any], path: Path) -> None:
    """Test EMD against steps (geometric mean over the seeds), one panel per (task, optimiser)."""
    plt = runner.pyplot()
    opts = cfg["optimizers"]
    fig, axes = plt.subplots(len(TASKS), len(opts), figsize=(4 * len(opts), 3.2 * len(TASKS)), squeeze=False)
    for i, t in enumerate(TASKS):
        for j, o in enumerate(opts):
            ax = axes[i][j]
            for k, loss in enumerate(cfg["losses"]):
                c = np.asarray(results[f"{t}/{o}/{loss}"]["test_curve"], dtype=np.float64)
                with np.errstate(invalid="ignore", divide="ignore"):
                    steps = np.arange(c.shape[1]) * cfg["eval_every"]
                    ax.plot(steps, np.exp(np.nanmean(np.log(c), 0)), label=LABELS[loss], color=f"C{k}")
            ax.set_yscale("log")
            ax.set_title(f"{t}, {o}", fontsize=9)
            ax.set_xlabel("step")
            if j == 0:
                ax.set_ylabel("test exact EMD (geo. mean)")
            ax.legend(fontsize=7)
    runner.save_figure(fig, path)
