"""Sinkhorn against the exact tree EMD: bias, stability, gradients, iterations and cost.

    emdloss experiment sinkhorn --out DIR [--quick|--smoke] [--seed S] [--resume]

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
import warnings
from typing import Any

import numpy as np
import torch

from emdloss import Tree
from emdloss._optional import require
from emdloss.functional import emd, sinkhorn
from emdloss.sinkhorn import SinkhornConvergenceWarning, underflow_reg

from .. import synthetic
from . import runner, sinkhorn_report

NAME = "sinkhorn"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The experiment's command-line options."""
    parser.add_argument("--out", required=True, help="output folder (results.json, report.md, PNG plots)")
    parser.add_argument("--quick", action="store_true", help="a short run (< 2 min on 2 cores)")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a seconds-long run that checks the pipeline end to end (its numbers mean nothing)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random problems")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def make_config(quick: bool, smoke: bool, seed: int) -> dict[str, Any]:
    """Problem sizes, regs, iteration budgets and timing grid of a full, ``--quick`` or ``--smoke`` run."""
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
    """The trees measured on (a chain, random trees, the ImageNet-1k tree if its data is present) by name,
    and a note saying why ImageNet was skipped (else None)."""
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
    """Elementwise relative error of ``a`` against the reference ``b``."""
    return (a - b).abs() / b.abs().clamp_min(1e-300)


def exact_grad(x: torch.Tensor, q: torch.Tensor, tree: Tree) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: exact tree EMD per row, (N,), and its closed-form gradient w.r.t. the logits, (N, C)."""
    xx = x.clone().requires_grad_()
    val = emd(xx, q, tree, reduction="none")
    val.sum().backward()
    return val.detach(), xx.grad


def grad_stats(g: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Agreement of a gradient ``g`` with the reference ``ref``: row cosine similarity (mean, min) and the
    relative error of the whole (N, C) gradient (Frobenius norm)."""
    cos = torch.nn.functional.cosine_similarity(g, ref, dim=1)
    return {
        "cosine_mean": float(cos.mean()),
        "cosine_min": float(cos.min()),
        "grad_rel_error": float((g - ref).norm() / ref.norm()),
    }


def value_and_iterations(name: str, tree: Tree, rel: float, config: dict[str, Any], big: bool) -> dict[str, Any]:
    """Items 1, 3 (envelope gradient at the full budget) and 4: the mean relative value error after each of
    :func:`trace_points` iterations (tol=0), the first of them with error <= 1%, and the worst row at max_iter.

    The trace comes from one run per segment between consecutive points, each warm-started from the
    previous segment's ``g`` (which continues the iterations exactly); the last segment gives the gradient."""
    n = config["imagenet_batch"] if big else config["batch"]
    max_iter = config["imagenet_max_iter"] if big else config["max_iter"]
    cost = tree.distance_matrix()
    reg = rel * float(cost.max())
    x, q = batch(config["seed"] + 1, n, tree.num_classes)
    exact, g_exact = exact_grad(x, q, tree)
    points = trace_points(max_iter, config["budgets"])
    # seconds: all segments together, i.e. max_iter iterations plus, per trace point, one call's set-up
    # (checks, softmax) and value <T, M>; the backward pass is not timed
    trace: dict[int, torch.Tensor] = {}
    g, seconds, done = None, 0.0, 0
    for k in points:  # one run for the segment (done, k], continuing the last: its value is that of k iterations
        xx = x.clone().requires_grad_() if k == max_iter else x  # the envelope gradient needs only the last run
        t0 = time.perf_counter()
        val, info = sinkhorn(
            xx, q, cost, reg=reg, tol=0.0, max_iter=k - done, reduction="none", return_info=True, warm_start=g
        )
        seconds += time.perf_counter() - t0
        trace[k], g, done = val.detach(), info.g, k
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
    plain = {"log_domain": False, "on_underflow": "ignore", "tol": 1e-6, "max_iter": iters, "reduction": "none"}
    for dtype in (torch.float32, torch.float64):
        smallest = None
        for rel in sorted(config["plain_rel_regs"], reverse=True):
            val = sinkhorn(x.to(dtype), q.to(dtype), cost, reg=rel * mmax, **plain)
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
    """:func:`timing` on the current threads: a chain or random tree with ``c`` classes (a random tree may
    get a few more), reg = 0.05 max(M), soft float32 targets."""
    ot = require("ot", "bench", "the Sinkhorn study's POT timings")

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

    return {
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


# ---------------------------------------------------------------------- entry point


def run(args: argparse.Namespace) -> int:
    """Measure every (problem, reg) unit and timing point (checkpointed), then write ``results.json``, the
    plots and ``report.md`` (:mod:`.sinkhorn_report`) and print a summary."""
    with warnings.catch_warnings():  # the study measures budgets that do not converge, on purpose
        warnings.simplefilter("ignore", SinkhornConvergenceWarning)
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    config = make_config(args.quick, args.smoke, args.seed)
    out = runner.output_folder(args.out)
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
    plots = sinkhorn_report.plots(results, out)
    runner.write_json(out / "results.json", results)
    runner.write_text(out / "report.md", sinkhorn_report.report(results, plots))
    print(sinkhorn_report.summary(results))
    runner.wrote(out, ["report.md", "results.json", *plots], time.perf_counter() - t0)
    return 0
