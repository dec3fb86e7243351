"""``emdloss experiment convergence``: how fast does each rho fit target histograms, in exact-EMD terms?

The paper's claim: the relaxed EMD (rho = 2) converges faster than the exact EMD (rho = 1). We fit predicted
distributions ``p = softmax(z)`` to target histograms ``q`` with the loss ``EMD_rho(p, q)`` for rho in
{1, 1.25, 1.5, 2} and record, at every step, the mean exact EMD (rho = 1, float64) between ``p`` and ``q``.

Fairness: the answer depends on the optimiser, so there are three (plain gradient descent, SGD with momentum
0.9, Adam), and each (loss, optimiser, parametrisation, task) gets its own learning rate, chosen from the same
half-decade grid (:data:`LR_GRIDS`) on *held-out targets* (never the evaluated ones) by the smallest area under
the log-EMD curve (the mean over steps of ``log10(EMD_t / EMD_0)``, which rewards both speed and depth; a run
that diverges scores +inf). Adam normalises gradient magnitudes, so it hides the shrinking rho = 2 gradients
that plain gradient descent sees; reporting both shows which verdict depends on which.

Targets:

- chain: real ATR-FTIR coffee spectra (chemotools, 60 spectra x 1,841 bins), clipped at 0 and normalised to sum
  1, on ``Tree.chain(1841)`` (bin distance = 1); the first :data:`TUNE_SPECTRA` spectra tune, the others are
  evaluated (``n`` drawn per seed);
- tree: generated smooth histograms on the real tieredImageNet-H WordNet tree (608 classes):
  ``q ∝ exp(-D[y, :] / tau)`` around a random class ``y`` with ``tau = 1`` (hop units); tuning targets come from
  a random stream of their own.

Parametrisations: free logits ``z`` (N, C), started at 0; a small network ``z = MLP(e)`` (64 hidden units) of a
fixed random 32-d code ``e`` per target. Reported: steps until the EMD falls to 50 %, 10 %, 5 % and 1 % of its
start, the area under the log-EMD curve, the final relative EMD and the wall-clock time of the optimisation
(loss, backward and step; the EMD tracking is not timed).
"""

from __future__ import annotations

import argparse
import functools
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from emdloss.functional import emd
from emdloss.tree import Tree

from ..data import data_file, tiered_imagenet_tree
from . import runner
from .training import add_experiment_arguments, mlp, num_seeds, on_small_model_cpu

LOSSES = ("rho1", "rho1.25", "rho1.5", "rho2")
RHO = {"rho1": 1.0, "rho1.25": 1.25, "rho1.5": 1.5, "rho2": 2.0}
LABELS = {"rho1": "EMD rho=1", "rho1.25": "rho=1.25", "rho1.5": "rho=1.5", "rho2": "relaxed rho=2"}
PARAMS = ("logits", "network")
OPTIMIZERS = ("gd", "momentum", "adam")
THRESHOLDS = (0.5, 0.1, 0.05, 0.01)
TUNE_SPECTRA = 10
#: learning rates tried for each optimiser (half-decade steps); the same grid for every loss
LR_GRIDS: dict[str, list[float]] = {
    "gd": [10 ** (k / 2) for k in range(-2, 10)],  # 0.1 .. 3e4: rho = 2 gradients are small
    "momentum": [10 ** (k / 2) for k in range(-4, 8)],  # 0.01 .. 3e3
    "adam": [10 ** (k / 2) for k in range(-7, 2)],  # 3e-4 .. 3
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_experiment_arguments(parser, default_seeds=5)


@functools.lru_cache(maxsize=1)
def _spectra_file() -> np.ndarray:
    return np.loadtxt(data_file("spectra/chemotools/coffee_spectra.csv"), delimiter=",", skiprows=1)


def spectra_targets() -> np.ndarray:
    """(60, 1841) coffee spectra clipped at 0 and normalised to histograms."""
    x = np.clip(_spectra_file(), 0.0, None)  # read once per process: the runs share it
    return x / x.sum(1, keepdims=True)


def tree_histograms(tree: Tree, ys: np.ndarray, tau: float = 1.0) -> np.ndarray:
    """(n, C) histograms ``q ∝ exp(-D_hops[y, :] / tau)`` around the classes ``ys`` (n,)."""
    lca = tree.lca_depth(hops=True)
    dh = np.diag(lca)[:, None] + np.diag(lca)[None, :] - 2 * lca  # hop distances between classes
    q = np.exp(-dh[np.asarray(ys)] / tau)
    return q / q.sum(1, keepdims=True)


def tree_targets(tree: Tree, n: int, rng: np.random.Generator, tau: float = 1.0) -> np.ndarray:
    """(n, C) histograms :func:`tree_histograms` around ``n`` distinct random classes."""
    return tree_histograms(tree, rng.choice(tree.num_classes, size=n, replace=False), tau)


def make_task(task: str, n: int, seed: int, tune: bool = False) -> tuple[Tree, torch.Tensor]:
    """(tree, (n, C) float64 targets) of ``task``: held-out tuning targets with ``tune=True``, else the
    evaluation targets of ``seed`` (disjoint spectra on the chain; another random stream on the tree)."""
    if task == "chain":
        q = spectra_targets()
        if tune:
            q = q[:TUNE_SPECTRA]
        else:
            rest = q[TUNE_SPECTRA:]
            q = rest[np.random.default_rng(seed).choice(len(rest), size=min(n, len(rest)), replace=False)]
        return Tree.chain(q.shape[1]), torch.from_numpy(q)
    tree = tiered_imagenet_tree()
    rng = np.random.default_rng([10_000, 1]) if tune else np.random.default_rng(seed)
    return tree, torch.from_numpy(tree_targets(tree, n, rng))


def fit(
    task: str, param: str, loss: str, optimizer: str, lr: float, seed: int, n: int, steps: int, tune: bool = False
) -> dict[str, Any]:
    """Optimise ``EMD_rho(softmax(z), q)``; returns the mean exact EMD before and after each step (``curve``; NaN
    after a divergence) and the optimisation's wall-clock seconds."""
    tree, q64 = make_task(task, n, seed, tune)
    q = q64.float()
    runner.seed_everything(seed)
    if param == "logits":
        z = torch.zeros_like(q, requires_grad=True)
        params, forward = [z], (lambda: z)
    else:
        codes = torch.randn(q.shape[0], 32, generator=torch.Generator().manual_seed(seed))
        net = mlp(32, tree.num_classes, 64)
        params, forward = list(net.parameters()), (lambda: net(codes))
    rho = RHO[loss]
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=lr)
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9 if optimizer == "momentum" else 0.0)
    curve: list[float] = []
    seconds = 0.0
    for step in range(steps + 1):
        t0 = time.perf_counter()
        logits = forward()
        seconds += time.perf_counter() - t0
        with torch.no_grad():
            value_emd = float(emd(logits.double(), q64, tree, rho=1.0)) if torch.isfinite(logits).all() else math.nan
        curve.append(value_emd)
        if step == steps or not math.isfinite(value_emd):
            break
        t0 = time.perf_counter()
        value = emd(logits, q, tree, rho=rho)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        seconds += time.perf_counter() - t0
    curve += [math.nan] * (steps + 1 - len(curve))
    return {"curve": curve, "seconds": seconds}


def steps_to(curve: list[float], tol: float, reference: float = 0.0) -> int | None:
    """First index whose EMD has at most ``tol`` of the gap between the start and ``reference`` left to close:
    ``curve[t] - reference <= tol * (curve[0] - reference)`` (None if never). With the default reference 0: the
    first step whose EMD is <= tol * EMD at step 0."""
    c = np.asarray(curve, dtype=np.float64)
    hit = np.flatnonzero(c - reference <= tol * (c[0] - reference))
    return int(hit[0]) if hit.size else None


def log_auc(curve: list[float]) -> float:
    """Area under the log-EMD curve per step: ``mean_t log10(EMD_t / EMD_0)`` over steps 1..T (+inf if the run
    diverged: any NaN or an EMD above 10x its start)."""
    c = np.asarray(curve, dtype=np.float64)
    rel = c[1:] / c[0]
    if rel.size == 0 or not np.all(np.isfinite(rel)) or np.any(rel > 10):
        return math.inf
    return float(np.mean(np.log10(np.maximum(rel, 1e-12))))


def configuration(quick: bool, smoke: bool, seeds: int) -> dict[str, Any]:
    quick = quick or smoke
    grids = {o: (g[1::5] if smoke else g[::2] if quick else g) for o, g in LR_GRIDS.items()}
    return {
        "experiment": "convergence",
        "tasks": {"chain": {"n": 4 if quick else 10}, "tree": {"n": 2 if smoke else 4 if quick else 16}},
        "params": ["logits"] if quick else list(PARAMS),
        "optimizers": list(OPTIMIZERS),
        "losses": list(LOSSES),
        "seeds": seeds,
        "steps": 8 if smoke else 40 if quick else 300,
        "lr_grids": grids,
        "lr_selection": "smallest mean log10(EMD_t/EMD_0) on held-out targets, same steps",
        "thresholds": list(THRESHOLDS),
    }


@on_small_model_cpu
def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    out = runner.output_folder(args.out)
    seeds = num_seeds(args, 5)
    cfg = configuration(args.quick, args.smoke, seeds)
    ckpt = runner.Checkpoint(out, cfg, resume=args.resume)
    combos = [
        (t, p, o, loss) for t in cfg["tasks"] for p in cfg["params"] for o in cfg["optimizers"] for loss in LOSSES
    ]
    tune_units = [(*c, lr) for c in combos for lr in cfg["lr_grids"][c[2]]]
    steps = cfg["steps"]
    for t, p, o, loss, lr in runner.progress(tune_units, "convergence: tuning", enabled=not args.no_progress):
        key = f"tune/{t}/{p}/{o}/{loss}/{lr:.6g}"
        if key not in ckpt:
            ckpt[key] = log_auc(fit(t, p, loss, o, lr, 0, cfg["tasks"][t]["n"], steps, tune=True)["curve"])
    chosen: dict[str, float] = {}
    for t, p, o, loss in combos:
        scores = {lr: ckpt[f"tune/{t}/{p}/{o}/{loss}/{lr:.6g}"] for lr in cfg["lr_grids"][o]}
        chosen[f"{t}/{p}/{o}/{loss}"] = min(scores, key=lambda lr: (scores[lr], lr))
    eval_units = [(*c, s) for c in combos for s in range(seeds)]
    for t, p, o, loss, s in runner.progress(eval_units, "convergence", enabled=not args.no_progress):
        key = f"{t}/{p}/{o}/{loss}/{s}"
        if key not in ckpt:
            lr = chosen[f"{t}/{p}/{o}/{loss}"]
            ckpt[key] = fit(t, p, loss, o, lr, s, cfg["tasks"][t]["n"], steps)

    summary: dict[str, Any] = {}
    curves: dict[str, list[list[float]]] = {}
    for t, p, o, loss in combos:
        runs = [ckpt[f"{t}/{p}/{o}/{loss}/{s}"] for s in range(seeds)]
        cs = [r["curve"] for r in runs]
        curves[f"{t}/{p}/{o}/{loss}"] = cs
        summary[f"{t}/{p}/{o}/{loss}"] = {
            "lr": chosen[f"{t}/{p}/{o}/{loss}"],
            "steps_to": {str(th): [steps_to(c, th) for c in cs] for th in THRESHOLDS},
            "log_auc": [log_auc(c) for c in cs],
            "final_relative_emd": [c[-1] / c[0] for c in cs],
            "seconds": [r["seconds"] for r in runs],
        }
    header = runner.report_header("Convergence: steps to fit target histograms, per-loss tuned rates", cfg)
    record = {"config": cfg, "results": summary}
    runner.publish(out, {**record, "chosen_lr": chosen, "curves": curves}, [header, render(record)])
    _plot(curves, cfg, out / "convergence.png")
    runner.wrote(out, ["report.md", "results.json", "convergence.png"], time.perf_counter() - t0)
    return 0


def render(record: dict[str, Any]) -> str:
    """The report's tables from a run's ``{"config", "results"}`` (``results``: the per-seed summary), also what
    ``emdloss report`` prints."""
    cfg, summary = record["config"], record["results"]
    text = []
    header = ["loss", "lr", *(f"steps to {th:g}" for th in THRESHOLDS), "log-AUC", "final", "seconds"]
    for t in cfg["tasks"]:
        for p in cfg["params"]:
            for o in cfg["optimizers"]:
                rows = [_row(loss, summary[f"{t}/{p}/{o}/{loss}"], cfg["seeds"]) for loss in LOSSES]
                text.append(f"## {t}, {p}, {o}\n\n" + runner.markdown_table(header, rows) + "\n")
    text.append(
        "Steps: mean ± std over the seeds that reached the threshold (how many did, in brackets; — if none). "
        "log-AUC: mean over steps of log10(EMD_t / EMD_0), lower is better. final: EMD after the last step / "
        "EMD at the start. seconds: optimisation wall-clock per run (this machine, shared). lr: the rate chosen "
        "on held-out targets for that loss and optimiser.\n"
    )
    return "\n".join(text)


def claim1_rows(record: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """Claim 1 (rho = 2 converges faster than rho = 1) per setting: paired differences rho=2 - rho=1 over seeds
    in steps to 5 % (a run that never got there counts as steps + 1) and in log-AUC, 95 % bootstrap intervals,
    and the verdict (supported: rho = 2 needs fewer steps in the whole interval; refuted: more), as table cells."""
    cfg, summary = record["config"], record["results"]
    cap = cfg["steps"] + 1
    rows = []
    for t in cfg["tasks"]:
        for p in cfg["params"]:
            for o in cfg["optimizers"]:
                a, b = summary[f"{t}/{p}/{o}/rho2"], summary[f"{t}/{p}/{o}/rho1"]
                s2 = [cap if h is None else h for h in a["steps_to"]["0.05"]]
                s1 = [cap if h is None else h for h in b["steps_to"]["0.05"]]
                d_steps = runner.paired_bootstrap(s2, s1)
                d_auc = runner.paired_bootstrap(a["log_auc"], b["log_auc"])
                neither = all(h == cap for h in s1 + s2)
                rows.append(
                    (
                        f"{t}, {p}, {o}",
                        "neither reached 5 %"
                        if neither
                        else f"{d_steps[0]:+.1f} [{d_steps[1]:+.1f}, {d_steps[2]:+.1f}]",
                        f"{d_auc[0]:+.3f} [{d_auc[1]:+.3f}, {d_auc[2]:+.3f}]",
                        "inconclusive" if neither else runner.verdict(d_steps, "lower"),
                    )
                )
    return rows


def verdicts(record: dict[str, Any]) -> str:
    """:func:`claim1_rows` as the report's verdict table."""
    header = ["setting", "steps to 5 %: rho=2 - rho=1", "log-AUC: rho=2 - rho=1", "claim 1 (steps)"]
    note = (
        "Paired over the 5 seeds (same targets for both rhos); 95 % percentile-bootstrap intervals, which with 5 "
        "pairs describe the seeds' spread rather than test anything. Each rho has its own learning rate, tuned on "
        "held-out targets; steps of runs that never reached 5 % count as the budget + 1.\n"
    )
    table = runner.markdown_table(header, [list(r) for r in claim1_rows(record)])
    return "## Claim 1 verdicts\n\n" + table + "\n\n" + note


def claim_summary(record: dict[str, Any]) -> str:
    """One sentence for the README: in how many settings rho = 2 reached 5 % of the starting EMD sooner."""
    words = [r[3] for r in claim1_rows(record)]
    return (
        "Claim 1, steps to 5 % of the starting EMD, rho = 2 against rho = 1 with per-rho tuned learning rates "
        f"(3 optimisers x chain/tree x logits/network): supported in {words.count('supported')}, refuted in "
        f"{words.count('refuted')}, inconclusive in {words.count('inconclusive')} of {len(words)} settings."
    )


def is_full(config: dict[str, Any]) -> bool:
    """Whether ``config`` is the full configuration (any number of seeds >= 5), the one verdicts may rest on."""
    return config["seeds"] >= 5 and {**config, "seeds": 5} == runner.to_jsonable(configuration(False, False, 5))


def _row(loss: str, entry: dict[str, Any], seeds: int) -> list[str]:
    cells = [LABELS[loss], f"{entry['lr']:.3g}"]
    for th in THRESHOLDS:
        hits = [h for h in entry["steps_to"][str(th)] if h is not None]
        cells.append((runner.fmt_mean_std(hits, 1) if hits else "—") + f" ({len(hits)}/{seeds})")
    auc = [a for a in entry["log_auc"] if math.isfinite(a)]
    cells.append(runner.fmt_mean_std(auc, 2) if auc else "diverged")
    cells.append(runner.fmt_mean_std(entry["final_relative_emd"], 4))
    cells.append(runner.fmt_mean_std(entry["seconds"], 2))
    return cells


def _plot(curves: dict[str, list[list[float]]], cfg: dict[str, Any], path: Path) -> None:
    plt = runner.pyplot()
    panels = [(t, p) for t in cfg["tasks"] for p in cfg["params"]]
    opts = cfg["optimizers"]
    fig, axes = plt.subplots(
        len(panels), len(opts), figsize=(4 * len(opts), 3.2 * len(panels)), squeeze=False, sharey="row"
    )
    for i, (t, p) in enumerate(panels):
        for j, o in enumerate(opts):
            ax = axes[i][j]
            for k, loss in enumerate(LOSSES):
                rel = np.array([np.asarray(c, dtype=np.float64) / c[0] for c in curves[f"{t}/{p}/{o}/{loss}"]])
                with np.errstate(invalid="ignore", divide="ignore"):
                    ax.plot(np.exp(np.nanmean(np.log(np.maximum(rel, 1e-12)), 0)), label=LABELS[loss], color=f"C{k}")
            for th in THRESHOLDS:
                ax.axhline(th, color="gray", ls=":", lw=0.8)
            ax.set_yscale("log")
            ax.set_title(f"{t}, {p}, {o}", fontsize=9)
            ax.set_xlabel("step")
            if j == 0:
                ax.set_ylabel("exact EMD / start (geo. mean)")
            ax.legend(fontsize=7)
    runner.save_figure(fig, path)
