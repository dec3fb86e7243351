"""Sinkhorn against the exact tree EMD: bias, stability, gradients, iterations and cost.

    emdloss experiment sinkhorn --out DIR [--quick] [--seed S] [--resume]

On a chain, random trees and the ImageNet-1k WordNet tree (when the shared data is present), with
predictions ``p = softmax(x)``, ``x ~ N(0, 2^2)``, and soft targets ``q = softmax(z)``, ``z ~ N(0, 2^2)``
(with class-index targets Sinkhorn's plan is exact after one iteration, so only soft targets show its bias),
it measures:

1. ``value_error``: relative error of Sinkhorn's ``<T, M>`` against the exact EMD, per reg and iteration budget;
2. ``plain_min_reg``: the smallest reg for which the plain (non-log) variant stays finite, float32 and float64,
   beside the prediction ``max(M) / -log(tiny)``;
3. ``gradient``: cosine similarity and relative error of the gradient w.r.t. the logits against the exact
   closed-form gradient, for ``grad="envelope"`` and ``grad="autodiff"``;
4. ``iterations``: iterations until the batch's mean relative value error is <= 1%, per reg;
5. ``timing``: time per batch against the number of classes: exact closed form, our log-domain and plain
   Sinkhorn, POT's ``ot.solve_batch`` (log-Sinkhorn on torch tensors) and an ``ot.sinkhorn2`` loop.

``reg`` is given relative to the cost's scale (``reg = rel * max(M)``); the absolute value is recorded too.
Items 1, 3 and 4 compute in float64 so that the error measured is Sinkhorn's, not rounding's.
Writes ``results.json``, ``report.md`` and ``sinkhorn_*.png`` atomically; finished units are checkpointed.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from emdloss import Tree
from emdloss.functional import emd
from emdloss.sinkhorn import sinkhorn, underflow_reg
from .. import synthetic
from . import runner

NAME = "sinkhorn"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder (results.json, report.md, PNG plots)")
    parser.add_argument("--quick", action="store_true", help="a short run (< 2 min on 2 cores)")
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run that checks the pipeline end to end (its numbers mean nothing)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def make_config(quick: bool, smoke: bool, seed: int) -> dict[str, Any]:
    if smoke:
        return {
            "seed": seed,
            "chain": 6,
            "tree_nodes": [12],
            "imagenet": False,
            "batch": 4,
            "imagenet_batch": 2,
            "rel_regs": [0.1, 0.01],
            "imagenet_rel_regs": [],
            "budgets": [10, 50],
            "max_iter": 50,
            "imagenet_max_iter": 50,
            "grad_iters": 50,
            "plain_rel_regs": [0.1, 0.01, 0.001],
            "timing_classes": [8, 16],
            "timing_batch": 4,
            "timing_iters": 10,
            "timing_repeats": 1,
        }
    if quick:
        return {
            "seed": seed,
            "chain": 20,
            "tree_nodes": [60],
            "imagenet": True,
            "batch": 16,
            "imagenet_batch": 2,
            "rel_regs": [0.1, 0.03, 0.01, 0.003],
            "imagenet_rel_regs": [0.1, 0.01],
            "budgets": [10, 100, 300],
            "max_iter": 300,
            "imagenet_max_iter": 100,
            "grad_iters": 150,
            "plain_rel_regs": [10 ** (-k / 4) for k in range(17)],
            "timing_classes": [10, 100, 300],
            "timing_batch": 8,
            "timing_iters": 20,
            "timing_repeats": 2,
        }
    return {
        "seed": seed,
        "chain": 50,
        "tree_nodes": [60, 200],
        "imagenet": True,
        "batch": 16,
        "imagenet_batch": 2,
        "rel_regs": [0.3, 0.1, 0.03, 0.01, 0.003],
        "imagenet_rel_regs": [0.1, 0.03, 0.01, 0.003],
        "budgets": [10, 100, 300, 1000],
        "max_iter": 1000,
        "imagenet_max_iter": 300,
        "grad_iters": 500,
        "plain_rel_regs": [10 ** (-k / 8) for k in range(33)],
        "timing_classes": [10, 30, 100, 300, 1000],
        "timing_batch": 16,
        "timing_iters": 20,
        "timing_repeats": 3,
    }


# ---------------------------------------------------------------------- problems


def problems(config: dict[str, Any]) -> tuple[dict[str, Tree], str | None]:
    rng = np.random.default_rng(config["seed"])
    out = {f"chain-{config['chain']}": Tree.chain(config["chain"])}
    for n in config["tree_nodes"]:
        tree = synthetic.random_tree(rng, n, weight_range=(0.5, 2.0), permute_classes=False)
        out[f"random-tree-{n}n-{tree.num_classes}c"] = tree
    note = None
    if config["imagenet"]:
        from ..data import DataUnavailable, imagenet_tree

        try:
            out["imagenet-1k"] = imagenet_tree()
        except DataUnavailable as exc:
            note = f"ImageNet tree skipped: {exc}"
    return out, note


def batch(seed: int, n: int, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits x, soft target q), float64, both from N(0, 2^2) logits."""
    gen = torch.Generator().manual_seed(seed)
    x = 2.0 * torch.randn(n, c, generator=gen, dtype=torch.float64)
    q = torch.softmax(2.0 * torch.randn(n, c, generator=gen, dtype=torch.float64), dim=1)
    return x, q


def trace_points(max_iter: int, budgets: list[int]) -> list[int]:
    """A geometric grid (factor 1.25) of iterations, plus the budgets and max_iter."""
    pts = {max_iter, *(b for b in budgets if b <= max_iter)}
    k = 1.0
    while k < max_iter:
        pts.add(round(k))
        k *= 1.25
    return sorted(pts)


# ---------------------------------------------------------------------- measurements


def _rel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs() / b.abs().clamp_min(1e-300)


def exact_grad(x: torch.Tensor, q: torch.Tensor, tree: Tree) -> tuple[torch.Tensor, torch.Tensor]:
    xx = x.clone().requires_grad_()
    val = emd(xx, q, tree, reduction="none")
    val.sum().backward()
    return val.detach(), xx.grad


def grad_stats(g: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    cos = torch.nn.functional.cosine_similarity(g, ref, dim=1)
    return {
        "cosine_mean": float(cos.mean()),
        "cosine_min": float(cos.min()),
        "grad_rel_error": float((g - ref).norm() / ref.norm()),
    }


def value_and_iterations(name: str, tree: Tree, rel: float, config: dict[str, Any], big: bool) -> dict[str, Any]:
    """Items 1, 3 (envelope at the full budget) and 4 from one run with tol=0 and a trace of values."""
    n = config["imagenet_batch"] if big else config["batch"]
    max_iter = config["imagenet_max_iter"] if big else config["max_iter"]
    cost = tree.distance_matrix()
    reg = rel * float(cost.max())
    x, q = batch(config["seed"] + 1, n, tree.num_classes)
    exact, g_exact = exact_grad(x, q, tree)
    points = trace_points(max_iter, config["budgets"])
    trace: dict[int, torch.Tensor] = {k: None for k in points}  # type: ignore[misc]
    xx = x.clone().requires_grad_()
    t0 = time.perf_counter()
    val = sinkhorn(xx, q, cost, reg=reg, tol=0.0, max_iter=max_iter, reduction="none", _trace=trace)
    seconds = time.perf_counter() - t0
    val.sum().backward()
    errs = {k: float(_rel(v, exact).mean()) for k, v in trace.items()}
    reached = next((k for k in points if errs[k] <= 0.01), None)
    budgets = {str(b): errs[b] for b in config["budgets"] if b in errs}
    return {
        "problem": name,
        "classes": tree.num_classes,
        "rel_reg": rel,
        "reg": reg,
        "batch": n,
        "rel_error": errs[max_iter],
        "rel_error_max": float(_rel(val.detach(), exact).max()),
        "by_budget": budgets,
        "trace": {str(k): v for k, v in errs.items()},
        "iters_to_1pct": reached,
        "max_iter": max_iter,
        "seconds": seconds,
        "envelope_full_budget": grad_stats(xx.grad, g_exact),
    }


def gradients(name: str, tree: Tree, rel: float, config: dict[str, Any], big: bool) -> dict[str, Any]:
    """Item 3: both gradient modes at ``grad_iters`` (tol 1e-6) against the exact closed-form gradient."""
    n = config["imagenet_batch"] if big else min(config["batch"], 8)
    iters = min(config["grad_iters"], config["imagenet_max_iter"]) if big else config["grad_iters"]
    cost = tree.distance_matrix()
    reg = rel * float(cost.max())
    x, q = batch(config["seed"] + 2, n, tree.num_classes)
    _, g_exact = exact_grad(x, q, tree)
    out: dict[str, Any] = {"problem": name, "rel_reg": rel, "reg": reg, "iters": iters}
    for mode in ("envelope", "autodiff"):
        c = tree.num_classes
        mem = n * c * c * iters * 8 * 6  # bytes autograd keeps: ~6 (N, C, C) float64 tensors per iteration
        if mode == "autodiff" and mem > 3e9:
            out[mode] = {"skipped": f"autodiff would keep ~{mem / 1e9:.0f} GB of iterations"}
            continue
        xx = x.clone().requires_grad_()
        t0 = time.perf_counter()
        sinkhorn(xx, q, cost, reg=reg, tol=1e-6, max_iter=iters, grad=mode, reduction="sum").backward()
        out[mode] = {**grad_stats(xx.grad, g_exact), "seconds": time.perf_counter() - t0}
    return out


def plain_min_reg(name: str, tree: Tree, config: dict[str, Any], big: bool) -> dict[str, Any]:
    """Item 2: scan reg downwards; the smallest reg whose plain-Sinkhorn result is finite for every row."""
    n = config["imagenet_batch"] if big else config["batch"]
    iters = config["imagenet_max_iter"] if big else config["max_iter"]
    cost = tree.distance_matrix()
    mmax = float(cost.max())
    x, q = batch(config["seed"] + 3, n, tree.num_classes)
    out: dict[str, Any] = {"problem": name, "max_cost": mmax, "iters": iters}
    for dtype in (torch.float32, torch.float64):
        smallest = None
        for rel in sorted(config["plain_rel_regs"], reverse=True):
            val = sinkhorn(
                x.to(dtype),
                q.to(dtype),
                cost,
                reg=rel * mmax,
                log_domain=False,
                on_underflow="ignore",
                tol=1e-6,
                max_iter=iters,
                reduction="none",
            )
            if not bool(torch.isfinite(val).all()):
                break
            smallest = rel
        key = str(dtype).replace("torch.", "")
        out[key] = {
            "min_rel_reg": smallest,
            "min_reg": None if smallest is None else smallest * mmax,
            "predicted_reg": underflow_reg(mmax, dtype),
        }
    return out


def _time(fn, repeats: int) -> float:
    """Best of ``repeats`` runs after a warm-up (numba compilation, allocator), the least disturbed on a
    shared machine; calls faster than 10 ms are repeated until 0.2 s is spent (at most 200 times)."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    if first < 0.01:
        repeats = max(repeats, min(200, int(0.2 / max(first, 1e-6))))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(min(times))


def timing(kind: str, c: int, config: dict[str, Any]) -> dict[str, Any]:
    """Item 5: seconds per batch (forward), float32, fixed iteration count for every Sinkhorn, on one
    thread (torch and numba): on a shared machine a parallel region waits for its slowest thread's time
    slice, which made multi-threaded timings of millisecond calls jump by 4-24 ms."""
    import numba

    threads = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    try:
        return _timing(kind, c, config)
    finally:
        torch.set_num_threads(threads[0])
        numba.set_num_threads(threads[1])


def _timing(kind: str, c: int, config: dict[str, Any]) -> dict[str, Any]:
    import ot

    rng = np.random.default_rng(config["seed"] + c)
    if kind == "chain":
        tree = Tree.chain(c)
    else:  # a random tree with c leaves: grow until it has them
        n = 2 * c
        tree = synthetic.random_tree(rng, n, weight_range=(0.5, 2.0), permute_classes=False)
        while tree.num_classes < c:
            n += max(1, c // 4)
            tree = synthetic.random_tree(rng, n, weight_range=(0.5, 2.0), permute_classes=False)
    c = tree.num_classes
    cost = tree.distance_matrix()
    reg, iters, reps = 0.05 * float(cost.max()), config["timing_iters"], config["timing_repeats"]
    x, q = batch(config["seed"] + 4, config["timing_batch"], c)
    x, q = x.float(), q.float()
    p = torch.softmax(x, 1)
    cost_t = torch.tensor(cost, dtype=torch.float32)
    cost_b = cost_t.expand(x.shape[0], c, c)
    p64, q64 = p.double().numpy(), q.double().numpy()

    def exact_fb() -> None:
        xx = x.clone().requires_grad_()
        emd(xx, q, tree).backward()

    res = {
        "kind": kind,
        "classes": c,
        "batch": x.shape[0],
        "iters": iters,
        "threads": 1,
        "exact": _time(lambda: emd(x, q, tree), reps),
        "exact_fwd_bwd": _time(exact_fb, reps),
        "ours_log": _time(lambda: sinkhorn(x, q, cost, reg=reg, tol=0.0, max_iter=iters), reps),
        "ours_plain": _time(
            lambda: sinkhorn(x, q, cost, reg=reg, tol=0.0, max_iter=iters, log_domain=False, on_underflow="ignore"),
            reps,
        ),
        "pot_solve_batch_log": _time(
            lambda: ot.solve_batch(
                cost_b, reg=reg, a=p, b=q, max_iter=iters, tol=0.0, method="log_sinkhorn", grad="detach"
            ),
            reps,
        ),
        "pot_sinkhorn2_loop": _time(
            lambda: [ot.sinkhorn2(p64[i], q64[i], cost, reg, numItermax=iters, stopThr=0.0) for i in range(len(p64))],
            reps,
        ),
    }
    return res


# ---------------------------------------------------------------------- report


def _plots(results: dict[str, Any], out: Path) -> list[str]:
    plt = runner.pyplot()
    names = []
    probs = sorted({r["problem"] for r in results["value_error"]}, key=list(results["problems"]).index)

    fig, axes = plt.subplots(1, len(probs), figsize=(4.2 * len(probs), 3.4), squeeze=False)
    for ax, prob in zip(axes[0], probs):
        rows = [r for r in results["value_error"] if r["problem"] == prob]
        for b in sorted({*results["config"]["budgets"], rows[0]["max_iter"]}):
            pts = [(r["rel_reg"], r["trace"].get(str(b))) for r in rows]
            pts = [(a, e) for a, e in pts if e is not None and e > 0]
            if pts:
                ax.loglog(*zip(*pts), marker="o", label=f"{b} iterations")
        ax.set_title(prob, fontsize=9)
        ax.set_xlabel("reg / max(M)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("mean relative error of <T, M> vs exact EMD")
    axes[0][0].legend(fontsize=7)
    runner.save_figure(fig, out / "sinkhorn_error_vs_reg.png")
    names.append("sinkhorn_error_vs_reg.png")

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for prob in probs:
        rows = [r for r in results["iterations"] if r["problem"] == prob]
        pts = [(r["rel_reg"], r["iters_to_1pct"]) for r in rows if r["iters_to_1pct"] is not None]
        if pts:
            ax.loglog(*zip(*pts), marker="o", label=prob)
    ax.set_xlabel("reg / max(M)")
    ax.set_ylabel("iterations to 1% mean value error")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    runner.save_figure(fig, out / "sinkhorn_iterations.png")
    names.append("sinkhorn_iterations.png")

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for prob in probs:
        rows = [r for r in results["gradient"] if r["problem"] == prob]
        for mode, style in (("envelope", "-"), ("autodiff", "--")):
            pts = [(r["rel_reg"], r[mode]["cosine_mean"]) for r in rows if "cosine_mean" in r[mode]]
            if pts:
                ax.semilogx(*zip(*pts), style, marker="o", label=f"{prob} {mode}")
    ax.set_xlabel("reg / max(M)")
    ax.set_ylabel("cosine(Sinkhorn grad, exact grad)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6)
    runner.save_figure(fig, out / "sinkhorn_gradient.png")
    names.append("sinkhorn_gradient.png")

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), squeeze=False)
    for ax, kind in zip(axes[0], ("chain", "tree")):
        rows = [r for r in results["timing"] if r["kind"] == kind]
        for key, label in TIMING_COLUMNS:
            ax.loglog([r["classes"] for r in rows], [r[key] * 1e3 for r in rows], marker="o", label=label)
        ax.set_title(
            f"{kind}, batch {rows[0]['batch'] if rows else '?'}, {results['config']['timing_iters']} iterations",
            fontsize=9,
        )
        ax.set_xlabel("classes C")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("ms per batch (forward, 1 thread)")
    axes[0][0].legend(fontsize=7)
    runner.save_figure(fig, out / "sinkhorn_time.png")
    names.append("sinkhorn_time.png")
    return names


TIMING_COLUMNS = [
    ("exact", "exact EMD (closed form)"),
    ("exact_fwd_bwd", "exact EMD fwd+bwd"),
    ("ours_log", "emdloss sinkhorn (log)"),
    ("ours_plain", "emdloss sinkhorn (plain)"),
    ("pot_solve_batch_log", "POT solve_batch (log, torch)"),
    ("pot_sinkhorn2_loop", "POT sinkhorn2 loop (numpy)"),
]


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def report(results: dict[str, Any], plots: list[str]) -> str:
    cfg = results["config"]
    lines = [runner.report_header("Sinkhorn vs exact tree EMD", cfg)]
    if results.get("note"):
        lines.append(f"Note: {results['note']}\n")
    lines.append("Problems: " + ", ".join(f"{k} ({v} classes)" for k, v in results["problems"].items()) + ".\n")
    lines.append("Predictions softmax(x), targets softmax(z), x, z ~ N(0, 4); reg = rel × max(M).\n")

    lines.append("## 1. Relative error of <T, M> against the exact EMD (mean over the batch)\n")
    budgets = [str(b) for b in cfg["budgets"]]
    rows = [
        [r["problem"], r["rel_reg"], r["reg"]]
        + [_fmt(r["by_budget"].get(b)) for b in budgets]
        + [f"{r['rel_error']:.3g} ({r['max_iter']} it)", r["rel_error_max"]]
        for r in results["value_error"]
    ]
    lines.append(
        runner.markdown_table(
            ["problem", "reg/max(M)", "reg"] + [f"{b} it" for b in budgets] + ["at max_iter", "worst row at max_iter"],
            rows,
        )
        + "\n"
    )

    lines.append("## 2. Plain (non-log) Sinkhorn: smallest finite reg\n")
    rows = []
    for r in results["plain_min_reg"]:
        for dt in ("float32", "float64"):
            d = r[dt]
            rows.append(
                [r["problem"], dt, r["max_cost"], _fmt(d["min_reg"]), _fmt(d["min_rel_reg"]), d["predicted_reg"]]
            )
    lines.append(
        runner.markdown_table(
            ["problem", "dtype", "max(M)", "smallest finite reg (scanned)", "as reg/max(M)", "max(M)/-log(tiny)"], rows
        )
        + "\n"
    )
    lines.append("The scan steps reg down by 10^(1/8) (10^(1/4) in --quick) and stops at the first non-finite value.\n")

    lines.append("## 3. Gradient w.r.t. the logits against the exact closed-form gradient\n")
    rows = []
    for r in results["gradient"]:
        for mode in ("envelope", "autodiff"):
            d = r[mode]
            if "skipped" in d:
                rows.append([r["problem"], r["rel_reg"], mode, r["iters"], "—", "—", "—", d["skipped"]])
            else:
                rows.append(
                    [
                        r["problem"],
                        r["rel_reg"],
                        mode,
                        r["iters"],
                        d["cosine_mean"],
                        d["cosine_min"],
                        d["grad_rel_error"],
                        f"{d['seconds']:.3g} s",
                    ]
                )
    lines.append(
        runner.markdown_table(
            ["problem", "reg/max(M)", "grad", "max iter", "cosine (mean)", "cosine (min row)", "rel. error", "time"],
            rows,
        )
        + "\n"
    )

    lines.append("## 4. Iterations to reach 1% mean relative value error\n")
    rows = [
        [
            r["problem"],
            r["rel_reg"],
            _fmt(r["iters_to_1pct"]) if r["iters_to_1pct"] else f"> {r['max_iter']}",
            r["rel_error"],
        ]
        for r in results["iterations"]
    ]
    lines.append(runner.markdown_table(["problem", "reg/max(M)", "iterations", "error at budget end"], rows) + "\n")

    lines.append("## 5. Time per batch (forward, float32, one thread, ms; best of the repeats)\n")
    rows = [
        [r["kind"], r["classes"], r["batch"], r["iters"]]
        + [r[k] * 1e3 for k, _ in TIMING_COLUMNS]
        + [r["ours_log"] / r["exact"]]
        for r in results["timing"]
    ]
    lines.append(
        runner.markdown_table(
            ["kind", "C", "batch", "iters"] + [lab for _, lab in TIMING_COLUMNS] + ["log Sinkhorn / exact"], rows
        )
        + "\n"
    )
    for p in plots:
        lines.append(f"![{p}]({p})\n")
    return "\n".join(lines)


def summary(results: dict[str, Any]) -> str:
    out = []
    for prob in results["problems"]:
        rows = [r for r in results["value_error"] if r["problem"] == prob]
        if rows:
            best = min(rows, key=lambda r: r["rel_error"])
            out.append(
                f"{prob}: best mean rel. error {best['rel_error']:.2e} at reg/max(M)={best['rel_reg']:g} "
                f"({best['max_iter']} it)"
            )
    for r in results["plain_min_reg"]:
        out.append(
            f"{r['problem']}: plain Sinkhorn finite down to reg {_fmt(r['float32']['min_reg'])} (float32), "
            f"{_fmt(r['float64']['min_reg'])} (float64)"
        )
    if results["timing"]:
        r = max(results["timing"], key=lambda r: r["classes"])
        out.append(
            f"{r['kind']} C={r['classes']}: log Sinkhorn {r['ours_log'] * 1e3:.1f} ms vs exact "
            f"{r['exact'] * 1e3:.2f} ms ({r['ours_log'] / r['exact']:.0f}x)"
        )
    return "\n".join(out)


# ---------------------------------------------------------------------- entry point


def run(args: argparse.Namespace) -> int:
    config = make_config(args.quick, args.smoke, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runner.seed_everything(args.seed)
    ckpt = runner.Checkpoint(out, config, resume=args.resume)
    probs, note = problems(config)
    show = not getattr(args, "no_progress", False)

    units: list[tuple[str, Any]] = []
    for name, tree in probs.items():
        big = name.startswith("imagenet")
        for rel in config["imagenet_rel_regs"] if big else config["rel_regs"]:
            units.append(
                (f"value/{name}/{rel}", lambda n=name, t=tree, r=rel, b=big: value_and_iterations(n, t, r, config, b))
            )
            units.append((f"grad/{name}/{rel}", lambda n=name, t=tree, r=rel, b=big: gradients(n, t, r, config, b)))
        units.append((f"plain/{name}", lambda n=name, t=tree, b=big: plain_min_reg(n, t, config, b)))
    for kind in ("chain", "tree"):
        for c in config["timing_classes"]:
            units.append((f"time/{kind}/{c}", lambda k=kind, c=c: timing(k, c, config)))

    done: dict[str, Any] = {}
    for key, fn in runner.progress(units, desc="sinkhorn", enabled=show):
        if key not in ckpt:
            ckpt[key] = fn()
        done[key] = ckpt[key]

    values = [v for k, v in done.items() if k.startswith("value/")]
    results = {
        "config": config,
        "machine": runner.machine_info(),
        "note": note,
        "problems": {k: t.num_classes for k, t in probs.items()},
        "value_error": [{k: v for k, v in r.items() if k != "envelope_full_budget"} for r in values],
        "plain_min_reg": [v for k, v in done.items() if k.startswith("plain/")],
        "gradient": [v for k, v in done.items() if k.startswith("grad/")],
        "iterations": [
            {k: r[k] for k in ("problem", "rel_reg", "reg", "iters_to_1pct", "max_iter", "rel_error", "trace")}
            for r in values
        ],
        "timing": [v for k, v in done.items() if k.startswith("time/")],
    }
    plots = _plots(results, out)
    runner.write_json(out / "results.json", results)
    runner.write_text(out / "report.md", report(results, plots))
    print(summary(results))
    print(f"wrote {out / 'results.json'}, {out / 'report.md'} and {len(plots)} plots")
    return 0
