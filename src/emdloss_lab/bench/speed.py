"""``emdloss bench``: forward+backward time of the EMD losses against cross-entropy and OT solvers.

What one run measures, all in one process unless said otherwise (see docs/speed.md):

1. **Ratios** on the real workloads (ImageNet-1k WordNet tree when the shared data is present, a chain of
   1,000 classes), batch 256, float32, hard and soft targets: every method's forward+backward time next to
   ``F.cross_entropy`` (class-index targets) on the same logits. Methods run *interleaved*: each round times
   every method once (in a rotated order), and a method's ratio is the median over rounds of its time divided
   by cross-entropy's time in the same round, so load from other processes hits both alike.
2. **Anchors**: the slow solvers (POT's exact LP ``ot.emd2`` one sample at a time, POT's batched Sinkhorn
   ``ot.solve_batch``, this project's ``functional.sinkhorn`` when it exists) run on a subsample of rows and
   are extrapolated linearly to the full batch; the table says so.
3. **Scaling**: chains and random trees with 10^3 .. 10^6 classes, at a fixed batch (for the log-log slope
   of time against classes) and at a fixed number of elements batch x classes (time per element).
4. **Peak extra memory** in a fresh subprocess: resident-set high-water mark (``VmHWM``, reset through
   ``/proc/self/clear_refs``) during one forward+backward minus the resident set before it, with glibc told
   to ``mmap`` every block over 128 KiB so that freed memory leaves the process and every byte any library
   (torch, numpy, numba) touches is counted. Reported as a multiple of the input tensor's bytes.
5. **JIT compile time** of the fused kernels: first calls in a subprocess with an empty numba cache
   directory, then again with that cache filled.

With ``--device cuda`` the ratio workloads run on the GPU (cross-entropy, the torch backend eager and under
``torch.compile``, the dense closed form), timed with CUDA events after warm-up; the fused kernel, the OT
anchors, the scaling sweep and the memory and JIT probes are CPU measurements and are left out.

Outputs in ``--out``: ``bench.json`` (everything, with the machine and configuration), ``bench.md`` (tables),
``bench.png`` (time against classes, log-log, one line per method). All written atomically.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from emdloss import functional
from .. import synthetic
from ..experiments import runner
from emdloss.losses import EMDLoss
from emdloss.tree import Tree

#: Largest C x E (classes x edges) for which the dense closed form is run (128 MiB of float32).
DENSE_MAX_ENTRIES = 2**25

Step = Callable[[], None]
LossFn = Callable[[Tensor, Tensor], Tensor]


# ---------------------------------------------------------------------- configuration


@dataclass
class Config:
    """Everything that decides what a run measures (stored in bench.json)."""

    quick: bool
    seed: int
    batch: int
    trees: list[str]
    sizes: list[int]
    scaling_batch: int
    scaling_elements: int
    rounds: int
    min_time: float
    slow: bool
    slow_rows: int
    slow_reps: int
    sinkhorn_iters: int
    compile: bool
    memory: bool
    memory_sizes: list[int]
    memory_elements: int
    memory_kinds: list[str]
    compile_time: bool
    threads: int
    device: str = "cpu"

    @staticmethod
    def from_args(args: argparse.Namespace) -> Config:
        quick = bool(args.quick)

        def pick(value: Any, default: Any, quick_default: Any) -> Any:
            return value if value is not None else (quick_default if quick else default)

        sizes = (
            _int_list(args.sizes)
            if args.sizes
            else ([1000, 10_000, 100_000] if quick else [1000, 10_000, 100_000, 1_000_000])
        )
        mem_default = [100_000] if quick else [100_000, 1_000_000]
        device = str(args.device)
        on_cpu = device == "cpu"
        if not on_cpu:
            try:
                kind = torch.device(device).type
            except RuntimeError:
                kind = None
            if kind != "cuda":
                raise ValueError(f"--device must be 'cpu' or a CUDA device such as 'cuda' or 'cuda:1', got {device!r}")
            if not torch.cuda.is_available():
                raise ValueError(f"--device {device}: no CUDA device is available (torch.cuda.is_available() is False)")
        return Config(
            quick=quick,
            seed=int(args.seed),
            batch=int(args.batch),
            trees=[t.strip() for t in args.trees.split(",") if t.strip()],
            sizes=sizes if on_cpu else [],
            scaling_batch=int(args.scaling_batch),
            scaling_elements=int(pick(args.scaling_elements, 2**20, 2**18)),
            rounds=int(pick(args.rounds, 15, 5)),
            min_time=float(pick(args.min_time, 0.01, 0.005)),
            slow=not args.no_slow and on_cpu,
            slow_rows=int(pick(args.slow_rows, 2, 1)),
            slow_reps=int(pick(args.slow_reps, 2, 1)),
            sinkhorn_iters=int(pick(args.sinkhorn_iters, 100, 20)),
            compile=pick(args.compile, True, False),
            memory=not args.no_memory and on_cpu,
            memory_sizes=_int_list(args.memory_sizes) if args.memory_sizes else mem_default,
            memory_elements=int(args.memory_elements),
            memory_kinds=["chain"] if quick else ["chain", "random"],
            compile_time=pick(args.compile_time, True, False) and on_cpu,
            threads=int(args.threads) if args.threads else torch.get_num_threads(),
            device=device,
        )


def _int_list(text: str) -> list[int]:
    try:
        values = [int(float(v)) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"expected a comma-separated list of integers, got {text!r}") from None
    if not values or min(values) < 2:
        raise ValueError(f"class counts must be integers >= 2, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="folder for bench.json, bench.md and bench.png")
    parser.add_argument(
        "--quick", action="store_true", help="a smaller run (< 1 min on 2 cores): fewer rounds and sizes"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=256, help="batch of the ratio workloads (default 256)")
    parser.add_argument(
        "--trees",
        default="imagenet,chain1000",
        help="ratio workloads: comma list of 'imagenet' (shared data; skipped when absent), 'chainN', 'randomN'",
    )
    parser.add_argument("--sizes", default=None, help="class counts of the scaling sweep (default 1e3,1e4,1e5,1e6)")
    parser.add_argument("--scaling-batch", type=int, default=8, help="batch of the fixed-batch scaling series")
    parser.add_argument(
        "--scaling-elements", type=int, default=None, help="batch x classes of the fixed-elements series"
    )
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 15, quick 5)")
    parser.add_argument(
        "--min-time", type=float, default=None, help="seconds per timing, by repeating calls (default 0.01)"
    )
    parser.add_argument(
        "--no-slow", action="store_true", help="skip the OT anchors (POT emd2 / Sinkhorn; hard targets)"
    )
    parser.add_argument("--slow-rows", type=int, default=None, help="rows the anchors run on (then extrapolated)")
    parser.add_argument("--slow-reps", type=int, default=None, help="repetitions of each anchor")
    parser.add_argument(
        "--sinkhorn-iters",
        type=int,
        default=None,
        help="fixed Sinkhorn iterations of the anchors (default 100, quick 20)",
    )
    parser.add_argument("--compile", dest="compile", action="store_true", default=None, help="include torch.compile")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile (quick default)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--memory-sizes", default=None, help="class counts of the memory probes (default 1e5,1e6)")
    parser.add_argument(
        "--memory-elements", type=int, default=2**23, help="batch x classes of the memory probes (default 2^23: 32 MiB)"
    )
    parser.add_argument(
        "--compile-time", dest="compile_time", action="store_true", default=None, help="measure numba JIT time"
    )
    parser.add_argument("--no-compile-time", dest="compile_time", action="store_false")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads for torch and numba (default: as they are; 1 is steadier on a busy machine)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--device",
        default="cpu",
        help="cpu (default) or cuda: on a GPU only the ratio workloads run, timed with CUDA events",
    )


# ---------------------------------------------------------------------- workloads


def build_tree(name: str, seed: int = 0) -> Tree:
    """'imagenet' (shared data), 'chainN' (N ordered classes) or 'randomN' (random tree with N leaf classes)."""
    if name == "imagenet":
        from ..data import imagenet_tree

        return imagenet_tree()
    for prefix, fn in (("chain", lambda n: Tree.chain(n)), ("random", lambda n: random_tree(n, seed))):
        if name.startswith(prefix):
            try:
                n = int(float(name[len(prefix) :]))
            except ValueError:
                break
            return fn(n)
    raise ValueError(f"unknown tree {name!r}: use 'imagenet', 'chainN' or 'randomN' (e.g. chain1000)")


def random_tree(num_classes: int, seed: int = 0) -> Tree:
    """A random tree with ``num_classes`` leaf classes under ``num_classes // 4`` internal nodes (a uniform
    random recursive tree, expected depth ~ ln of its size), edge lengths uniform in [0.5, 1.5], classes in
    random output order (so not in DFS order)."""
    n_internal = max(1, num_classes // 4)
    return synthetic.random_tree(np.random.default_rng(seed), n_internal + num_classes, num_internal=n_internal)


class DenseClosedForm:
    """The textbook closed form with a dense (C, E) subtree-membership matrix ``M``.

    ``M[j, e] = 1`` when class j lies below edge e, so the flows are ``f = (p - q) @ M`` (N, E) and the loss
    is ``mean_i sum_e w_e |f_ie|^rho``; autograd does the backward. O(N C E) time and O(C E) memory: the
    quadratic baseline that the O(nodes) backends replace.
    """

    def __init__(self, tree: Tree, rho: float, device: str = "cpu") -> None:
        pos = tree.position[tree.classes]
        lo = tree.position[tree.edge_nodes]
        hi = tree.subtree_end[lo]
        member = (pos[:, None] >= lo[None, :]) & (pos[:, None] < hi[None, :])
        self.M = torch.from_numpy(member.astype(np.float32)).to(device)
        self.w = torch.from_numpy(np.ascontiguousarray(tree.weights[tree.edge_nodes], dtype=np.float32)).to(device)
        self.rho = rho

    def __call__(self, x: Tensor, target: Tensor) -> Tensor:
        p = torch.softmax(x, dim=1)
        q = target if target.dtype.is_floating_point else F.one_hot(target, x.shape[1]).to(x.dtype)
        f = (p - q) @ self.M.to(p.dtype)
        a = f.abs() if self.rho == 1.0 else (f.square() if self.rho == 2.0 else f.abs().pow(self.rho))
        return (a @ self.w.to(p.dtype)).mean()


def cost_matrix(tree: Tree) -> Tensor:
    return torch.from_numpy(np.array(tree.distance_matrix(), dtype=np.float32))


def pot_emd2(cost: Tensor) -> LossFn:
    """POT's exact network-simplex LP, one sample at a time (gradient from its dual potentials)."""
    import ot

    def loss(x: Tensor, target: Tensor) -> Tensor:
        p = torch.softmax(x.double(), dim=1)
        q = target.double() if target.dtype.is_floating_point else F.one_hot(target, x.shape[1]).double()
        c = cost.double()
        return torch.stack([ot.emd2(p[i], q[i], c) for i in range(x.shape[0])]).mean()

    return loss


def pot_sinkhorn_batch(cost: Tensor, iters: int) -> LossFn:
    """POT's batched Sinkhorn (``ot.solve_batch``, method 'sinkhorn'), ``iters`` fixed iterations,
    entropic regularisation 0.1 x the median cost, gradient through the last iteration ('last_step').
    The (C, C) cost is broadcast to (n, C, C) without a copy; the plans are (n, C, C)."""
    import ot

    reg = 0.1 * float(cost[cost > 0].median()) if (cost > 0).any() else 1.0

    def loss(x: Tensor, target: Tensor) -> Tensor:
        n, c = x.shape
        p = torch.softmax(x, dim=1)
        q = target if target.dtype.is_floating_point else F.one_hot(target, c).to(x.dtype)
        q = (q + 1e-6) / (1 + 1e-6 * c)  # Sinkhorn needs positive marginals
        res = ot.solve_batch(
            cost.expand(n, c, c), reg=reg, a=p, b=q, max_iter=iters, tol=0.0, method="sinkhorn", grad="last_step"
        )
        return res.value_linear.mean()  # <T, M>: the transport cost, without the entropy term

    return loss


def project_sinkhorn(cost: Tensor, iters: int) -> LossFn:
    """This project's ``functional.sinkhorn`` (when it exists), ``iters`` iterations, reg 0.1 x median cost."""
    reg = 0.1 * float(cost[cost > 0].median()) if (cost > 0).any() else 1.0

    def loss(x: Tensor, target: Tensor) -> Tensor:
        return functional.sinkhorn(  # type: ignore[attr-defined]
            x, target, cost, reg=reg, max_iter=iters, tol=0.0, log_domain=False, from_logits=True, reduction="mean"
        )

    return loss


@dataclass
class Method:
    """One timed loss. ``rows``: the number of batch rows it runs on (fewer than the batch: extrapolated)."""

    name: str
    fn: LossFn | None
    family: str
    rho: float | None = None
    rows: int | None = None
    note: str = ""
    skip: str = ""
    warmup_s: float = float("nan")


def loss_methods(
    tree: Tree, target_kind: str, cfg: Config, *, compile_ok: bool, dense_ok: bool, anchors: bool
) -> list[Method]:
    """The methods of one workload, cross-entropy first."""
    methods = [Method("cross_entropy", lambda x, t: F.cross_entropy(x, t), "ce")]
    for rho in (1.0, 2.0):
        r = f"rho={rho:g}"
        if cfg.device == "cpu":
            methods.append(Method(f"emd fused {r}", EMDLoss(tree, rho=rho, backend="numba"), "fused", rho))
        methods.append(Method(f"emd torch {r}", EMDLoss(tree, rho=rho, backend="torch"), "torch", rho))
        if compile_ok:
            fn = torch.compile(EMDLoss(tree, rho=rho, backend="torch", validate=False))
            methods.append(Method(f"emd torch.compile {r}", fn, "compiled", rho, note="validate=False"))
        entries = tree.num_classes * tree.num_edges
        if dense_ok:
            if entries <= DENSE_MAX_ENTRIES:
                methods.append(Method(f"dense closed form {r}", DenseClosedForm(tree, rho, cfg.device), "dense", rho))
            else:
                methods.append(
                    Method(
                        f"dense closed form {r}",
                        None,
                        "dense",
                        rho,
                        skip=f"C x E = {entries:.2g} > {DENSE_MAX_ENTRIES:.2g}",
                    )
                )
    if anchors:
        n = min(cfg.slow_rows, cfg.batch)
        cost = cost_matrix(tree)
        try:
            import ot  # noqa: F401

            methods.append(Method("POT ot.emd2 (exact LP, per sample)", pot_emd2(cost), "pot_emd2", 1.0, rows=n))
            methods.append(
                Method(
                    f"POT ot.solve_batch Sinkhorn ({cfg.sinkhorn_iters} it)",
                    pot_sinkhorn_batch(cost, cfg.sinkhorn_iters),
                    "pot_sinkhorn",
                    1.0,
                    rows=n,
                )
            )
        except ImportError:
            methods.append(Method("POT", None, "pot_emd2", skip="POT not installed (pip install pot)"))
        if hasattr(functional, "sinkhorn"):
            methods.append(
                Method(
                    f"emdloss sinkhorn ({cfg.sinkhorn_iters} it)",
                    project_sinkhorn(cost, cfg.sinkhorn_iters),
                    "sinkhorn",
                    1.0,
                    rows=min(cfg.batch, max(n, 16)),
                )
            )
    return methods


def make_inputs(
    batch: int, num_classes: int, target_kind: str, gen: torch.Generator, device: str = "cpu"
) -> tuple[Tensor, Tensor]:
    """Logits (B, C) ~ N(0, 2^2) with grad, and class indices (B,) or a soft target (softmax of N(0, 1)); drawn
    on the CPU (the same numbers on every device), then moved to ``device``."""
    x = 2.0 * torch.randn(batch, num_classes, generator=gen)
    if target_kind == "hard":
        target = torch.randint(0, num_classes, (batch,), generator=gen)
    else:
        target = torch.softmax(torch.randn(batch, num_classes, generator=gen), dim=1)
    return x.to(device).requires_grad_(), target.to(device)


def make_step(fn: LossFn, x: Tensor, target: Tensor) -> Step:
    def step() -> None:
        x.grad = None
        fn(x, target).backward()

    return step


def rows_of(x: Tensor, target: Tensor, n: int) -> tuple[Tensor, Tensor]:
    return x.detach()[:n].clone().requires_grad_(), target[:n].clone()


# ---------------------------------------------------------------------- timing


def time_calls(step: Step, reps: int, device: str = "cpu") -> float:
    """Seconds per call over ``reps`` back-to-back calls: wall time on the CPU; on a GPU, CUDA events around the
    calls (after a synchronisation, so that earlier work is not counted), read once the last call is done."""
    if device == "cpu":
        t0 = time.perf_counter()
        for _ in range(reps):
            step()
        return (time.perf_counter() - t0) / reps
    torch.cuda.synchronize(device)
    stream = torch.cuda.current_stream(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record(stream)
    for _ in range(reps):
        step()
    end.record(stream)
    end.synchronize()
    return start.elapsed_time(end) / 1000.0 / reps


def interleaved(steps: dict[str, Step], rounds: int, min_time: float, device: str = "cpu") -> dict[str, list[float]]:
    """Per-call seconds of every step in each of ``rounds`` rounds; steps run in a rotated order per round.

    Each step is warmed up twice first; a timing repeats the call enough times to last ``min_time``.
    """
    reps: dict[str, int] = {}
    for name, step in steps.items():
        step()
        t = time_calls(step, 1, device)
        reps[name] = max(1, min(1000, math.ceil(min_time / max(t, 1e-7))))
    names = list(steps)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            out[name].append(time_calls(steps[name], reps[name], device))
    return out


def median_ratio(times: list[float], base: list[float]) -> float:
    """Median over rounds of time / cross-entropy's time in the same round (the headline ratio)."""
    return float(np.median(np.asarray(times) / np.asarray(base)))


def best_ratio(times: list[float], base: list[float]) -> float:
    """Fastest time / cross-entropy's fastest time: the ratio least disturbed by other processes."""
    return float(np.min(times) / np.min(base))


def reference_value(x: Tensor, target: Tensor, tree: Tree, rho: float) -> float:
    """The loss by the torch reference backend in float64 (to check what is being timed)."""
    with torch.no_grad():
        t = target.double() if target.dtype.is_floating_point else target
        return float(functional.emd(x.detach().double(), t, tree, rho=rho, backend="torch"))


def warm_up(m: Method, x: Tensor, target: Tensor, tree: Tree) -> tuple[Step | None, float | None]:
    """One forward+backward (also the compile for torch.compile); returns the timed step and the relative
    difference of the loss from :func:`reference_value`, or records why the method failed."""
    t0 = time.perf_counter()
    try:
        x.grad = None
        loss = m.fn(x, target)  # type: ignore[misc]
        loss.backward()
    except Exception as exc:  # noqa: BLE001 - a failing method is a result too: reported, not fatal
        m.skip = f"failed: {type(exc).__name__}: {exc}"[:200]
        return None, None
    m.warmup_s = time.perf_counter() - t0
    diff = None
    if m.rho is not None:
        ref = reference_value(x, target, tree, m.rho)
        diff = abs(float(loss.detach()) - ref) / max(abs(ref), 1e-12)
    return make_step(m.fn, x, target), diff  # type: ignore[arg-type]


def run_workload(
    tree_name: str,
    tree: Tree,
    target_kind: str,
    batch: int,
    cfg: Config,
    *,
    compile_ok: bool,
    dense_ok: bool,
    anchors: bool,
    gen: torch.Generator,
    progress: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Time every method of one (tree, batch, target) workload; one result row per method."""
    x, target = make_inputs(batch, tree.num_classes, target_kind, gen, cfg.device)
    methods = loss_methods(tree, target_kind, cfg, compile_ok=compile_ok, dense_ok=dense_ok, anchors=anchors)
    if target_kind == "soft":
        methods.insert(1, Method("cross_entropy (soft target)", lambda x, t: F.cross_entropy(x, t), "ce_soft"))
    ce_target = target if target_kind == "hard" else target.argmax(dim=1)
    errors: dict[str, float | None] = {}

    full: dict[str, Step] = {}
    for m in methods:
        if m.fn is None or m.skip or m.rows:
            continue
        step, errors[m.name] = warm_up(m, x, ce_target if m.family == "ce" else target, tree)
        if step is not None:
            full[m.name] = step
    times = interleaved(full, cfg.rounds, cfg.min_time, cfg.device)
    base = times["cross_entropy"]
    ce_median = float(np.median(base))

    rows: list[dict[str, Any]] = []
    for m in methods:
        row: dict[str, Any] = {
            "tree": tree_name,
            "classes": tree.num_classes,
            "nodes": tree.num_nodes,
            "batch": batch,
            "target": target_kind,
            "method": m.name,
            "family": m.family,
            "rho": m.rho,
            "rel_diff_vs_reference": errors.get(m.name),
            "note": m.note,
        }
        if m.name in times:
            t = times[m.name]
            row.update(
                seconds=float(np.median(t)),
                ratio_to_ce=median_ratio(t, base),
                best_ratio_to_ce=best_ratio(t, base),
                rounds=len(t),
                seconds_all=t,
                first_call_s=m.warmup_s,
            )
            if m.family == "compiled":
                row["note"] = f"{m.note}; first call (compile) {m.warmup_s:.1f} s".lstrip("; ")
        elif m.rows and not m.skip and m.fn is not None:
            xs, ts = rows_of(x, target, m.rows)
            progress(f"{tree_name} {target_kind} {m.name}")
            step, row["rel_diff_vs_reference"] = warm_up(m, xs, ts, tree)
            if step is None:
                row.update(skipped=m.skip)
                rows.append(row)
                continue
            # no JIT in these solvers: the warm-up call is the first sample
            sub = [m.warmup_s] + [time_calls(step, 1) for _ in range(cfg.slow_reps - 1)]
            secs = float(np.median(sub)) * batch / m.rows
            row.update(seconds=secs, ratio_to_ce=secs / ce_median, rounds=len(sub))
            if m.rows < batch:
                row.update(
                    extrapolated_from_rows=m.rows,
                    note=f"extrapolated: {m.rows} of {batch} rows timed, x{batch / m.rows:g}; not interleaved",
                )
            else:
                row.update(note="not interleaved (timed after the others)")
        else:
            row.update(skipped=m.skip or "not run")
        rows.append(row)
    return rows


# ---------------------------------------------------------------------- scaling


def slope(classes: list[int], seconds: list[float]) -> float:
    """Least-squares slope of log(seconds) against log(classes)."""
    if len(classes) < 2:
        return float("nan")
    return float(np.polyfit(np.log(classes), np.log(seconds), 1)[0])


def run_scaling(cfg: Config, gen: torch.Generator, bar: Any) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for kind in ("chain", "random"):
        for size in cfg.sizes:
            tree = build_tree(f"{kind}{size}", cfg.seed)
            series = [("fixed batch", cfg.scaling_batch), ("fixed elements", max(1, cfg.scaling_elements // size))]
            for label, batch in series:
                x, target = make_inputs(batch, size, "hard", gen)
                methods = [Method("cross_entropy", lambda x, t: F.cross_entropy(x, t), "ce")]
                for rho in (1.0, 2.0):
                    methods.append(
                        Method(f"emd fused rho={rho:g}", EMDLoss(tree, rho=rho, backend="numba"), "fused", rho)
                    )
                # the reference does the same work for every rho: one line suffices
                methods.append(Method("emd torch rho=1", EMDLoss(tree, rho=1.0, backend="torch"), "torch", 1.0))
                if size * tree.num_edges <= DENSE_MAX_ENTRIES:
                    methods.append(Method("dense closed form rho=1", DenseClosedForm(tree, 1.0), "dense", 1.0))
                steps = {m.name: make_step(m.fn, x, target) for m in methods if m.fn is not None}
                times = interleaved(steps, max(3, cfg.rounds // 3), cfg.min_time)
                base = times["cross_entropy"]
                for m in methods:
                    t = times[m.name]
                    sec = float(np.median(t))
                    rows.append(
                        {
                            "kind": kind,
                            "series": label,
                            "classes": size,
                            "batch": batch,
                            "nodes": tree.num_nodes,
                            "method": m.name,
                            "family": m.family,
                            "seconds": sec,
                            "seconds_best": float(np.min(t)),
                            "ns_per_element": sec / (batch * size) * 1e9,
                            "ratio_to_ce": median_ratio(t, base),
                            "best_ratio_to_ce": best_ratio(t, base),
                        }
                    )
                bar.update(1)
            del tree
            gc.collect()
    return rows


def scaling_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (tree kind, method): slope at fixed batch and max/min time per element at fixed elements."""
    out = []
    keys = sorted({(r["kind"], r["method"]) for r in rows}, key=lambda k: (k[0], k[1]))
    for kind, method in keys:
        fb = [r for r in rows if r["kind"] == kind and r["method"] == method and r["series"] == "fixed batch"]
        fe = [r for r in rows if r["kind"] == kind and r["method"] == method and r["series"] == "fixed elements"]
        per_el = [r["ns_per_element"] for r in fe]
        out.append(
            {
                "kind": kind,
                "method": method,
                "slope_fixed_batch": slope([r["classes"] for r in fb], [r["seconds"] for r in fb]),
                "slope_fixed_batch_best": slope([r["classes"] for r in fb], [r["seconds_best"] for r in fb]),
                "classes_range": [min(r["classes"] for r in fb), max(r["classes"] for r in fb)] if fb else None,
                "ns_per_element_min": min(per_el) if per_el else float("nan"),
                "ns_per_element_max": max(per_el) if per_el else float("nan"),
            }
        )
    return out


# ---------------------------------------------------------------------- memory (subprocess)

_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072", "MALLOC_TOP_PAD_": "0"}


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def memory_child() -> None:
    """Entry point of the memory subprocess: reads a JSON job on stdin, prints a JSON result line."""
    job = json.loads(sys.stdin.read())
    set_threads(job["threads"])
    tree = build_tree(job["tree"], job["seed"])
    gen = torch.Generator().manual_seed(job["seed"])
    x, target = make_inputs(job["batch"], tree.num_classes, "hard", gen)
    input_bytes = x.numel() * x.element_size()
    fns: dict[str, LossFn] = {"cross_entropy": lambda x, t: F.cross_entropy(x, t)}
    for rho in (1.0, 2.0):
        fns[f"emd fused rho={rho:g}"] = EMDLoss(tree, rho=rho, backend="numba")
    fns["emd torch rho=1"] = EMDLoss(tree, rho=1.0, backend="torch")
    result: dict[str, Any] = {"input_bytes": input_bytes, "methods": {}}
    for name, fn in fns.items():
        step = make_step(fn, x, target)
        step()
        step()
        x.grad = None
        gc.collect()
        base = _proc_status("VmRSS")
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset VmHWM to the current RSS
        loss = fn(x, target)
        loss.backward()
        peak = _proc_status("VmHWM")
        del loss
        x.grad = None
        gc.collect()
        result["methods"][name] = {"extra_bytes": peak - base, "x_input": (peak - base) / input_bytes}
    print(json.dumps(result))


def run_memory(tree: str, batch: int, cfg: Config) -> dict[str, Any]:
    """Peak extra memory of one forward+backward per method, measured in a fresh subprocess (see module doc)."""
    if not Path("/proc/self/clear_refs").exists():
        return {"tree": tree, "batch": batch, "skipped": "needs Linux /proc/self/clear_refs"}
    job = {"tree": tree, "batch": batch, "seed": cfg.seed, "threads": cfg.threads}
    env = {**os.environ, **_MALLOC_ENV}
    code = "from emdloss_lab.bench.speed import memory_child; memory_child()"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        input=json.dumps(job),
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    if proc.returncode != 0:
        return {"tree": tree, "batch": batch, "skipped": f"subprocess failed: {proc.stderr.strip()[-300:]}"}
    return {"tree": tree, "batch": batch, **json.loads(proc.stdout.strip().splitlines()[-1])}


# ---------------------------------------------------------------------- JIT compile time (subprocess)


def compile_child(t0: float) -> None:
    """First-call times of the fused kernels (float32 logits; chain, tree; hard, soft; rho 1, 2, 1.5; batch 1
    and 256, which take the one-row and the lane kernel); ``t0`` is the time before ``import emdloss``."""
    out: dict[str, Any] = {"import_s": time.perf_counter() - t0, "calls": {}}
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    for tree_name in ("chain64", "random64"):
        tree = build_tree(tree_name)
        for kind in ("hard", "soft"):
            for rho in (1.0, 2.0, 1.5):
                for batch in (1, 256):
                    x, target = make_inputs(batch, tree.num_classes, kind, gen)
                    t = time.perf_counter()
                    make_step(EMDLoss(tree, rho=rho, backend="numba"), x, target)()
                    out["calls"][f"{tree_name} {kind} rho={rho:g} batch {batch}"] = time.perf_counter() - t
    out["total_s"] = time.perf_counter() - t0
    import numba

    out["numba_threads"] = numba.get_num_threads()
    out["torch_threads"] = torch.get_num_threads()
    print(json.dumps(out))


def run_compile_time() -> dict[str, Any]:
    """Cold (empty numba cache) and warm (cache filled) first calls, each in a fresh subprocess."""
    code = (
        "import time; t0 = time.perf_counter(); from emdloss_lab.bench.speed import compile_child; compile_child(t0)"
    )
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="emdloss-numba-cache-") as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}
        for label in ("cold", "cached"):
            proc = subprocess.run(
                [sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env, timeout=900
            )
            if proc.returncode != 0:
                result[label] = {"skipped": f"subprocess failed: {proc.stderr.strip()[-300:]}"}
            else:
                result[label] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


# ---------------------------------------------------------------------- reporting


def _fmt_ms(s: float | None) -> str:
    if s is None or not np.isfinite(s):
        return "-"
    ms = s * 1e3
    return f"{ms:.3g}" if ms < 1000 else f"{ms:,.0f}"


def ratio_table(rows: list[dict[str, Any]]) -> str:
    header = [
        "tree",
        "C",
        "B",
        "target",
        "method",
        "ms fwd+bwd",
        "x CE",
        "x CE (best)",
        "rel. diff vs reference",
        "note",
    ]
    body = []
    for r in rows:
        diff = r.get("rel_diff_vs_reference")
        body.append(
            [
                r["tree"],
                r["classes"],
                r["batch"],
                r["target"],
                r["method"],
                _fmt_ms(r.get("seconds")),
                f"{r['ratio_to_ce']:.2f}" if "ratio_to_ce" in r else "-",
                f"{r['best_ratio_to_ce']:.2f}" if "best_ratio_to_ce" in r else "-",
                f"{diff:.1e}" if diff is not None else "-",
                r.get("skipped") or r.get("note", ""),
            ]
        )
    return runner.markdown_table(header, body)


def headline_table(rows: list[dict[str, Any]]) -> str:
    """Methods x workloads, each cell "median ratio (best ratio)" to cross-entropy: the table for a README."""
    workloads = list(dict.fromkeys((r["tree"], r["target"]) for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    methods.sort(key=lambda m: 0 if m == "cross_entropy" else (1 if m.startswith("cross_entropy") else 2))  # stable
    cells = {(r["method"], r["tree"], r["target"]): r for r in rows}
    body = []
    for m in methods:
        line = [m]
        for tree, target in workloads:
            r = cells.get((m, tree, target))
            if r is None or "ratio_to_ce" not in r:
                line.append("-")
            elif "best_ratio_to_ce" in r:
                line.append(f"{r['ratio_to_ce']:.2f} ({r['best_ratio_to_ce']:.2f})")
            else:
                line.append(f"{r['ratio_to_ce']:,.0f}" + ("*" if "extrapolated_from_rows" in r else ""))
        body.append(line)
    header = ["x F.cross_entropy: median (best)"] + [f"{t}, {k} targets" for t, k in workloads]
    return runner.markdown_table(header, body)


def scaling_table(rows: list[dict[str, Any]]) -> str:
    header = ["tree", "series", "C", "B", "method", "ms fwd+bwd", "ns / element", "x CE", "x CE (best)"]
    body = [
        [
            r["kind"],
            r["series"],
            r["classes"],
            r["batch"],
            r["method"],
            _fmt_ms(r["seconds"]),
            f"{r['ns_per_element']:.3g}",
            f"{r['ratio_to_ce']:.2f}",
            f"{r['best_ratio_to_ce']:.2f}",
        ]
        for r in rows
    ]
    return runner.markdown_table(header, body)


def summary_table(summary: list[dict[str, Any]]) -> str:
    def fmt(v: float) -> str:
        return f"{v:.2f}" if np.isfinite(v) else "- (one size)"

    header = [
        "tree",
        "method",
        "log-log slope (fixed batch)",
        "slope of best times",
        "ns / element min..max (fixed elements)",
    ]
    body = [
        [
            s["kind"],
            s["method"],
            fmt(s["slope_fixed_batch"]),
            fmt(s["slope_fixed_batch_best"]),
            f"{s['ns_per_element_min']:.3g} .. {s['ns_per_element_max']:.3g}",
        ]
        for s in summary
    ]
    return runner.markdown_table(header, body)


def memory_table(mem: list[dict[str, Any]]) -> str:
    header = ["tree", "B", "input MiB", "method", "peak extra MiB", "x input"]
    body = []
    for m in mem:
        if "skipped" in m:
            body.append([m["tree"], m["batch"], "-", "-", "-", m["skipped"]])
            continue
        for name, v in m["methods"].items():
            body.append(
                [
                    m["tree"],
                    m["batch"],
                    f"{m['input_bytes'] / 2**20:.1f}",
                    name,
                    f"{v['extra_bytes'] / 2**20:.1f}",
                    f"{v['x_input']:.2f}",
                ]
            )
    return runner.markdown_table(header, body)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    plt = runner.pyplot()
    kinds = sorted({r["kind"] for r in rows})
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4.5), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        sub = [r for r in rows if r["kind"] == kind and r["series"] == "fixed batch"]
        for method in dict.fromkeys(r["method"] for r in sub):
            pts = sorted((r["classes"], r["seconds"]) for r in sub if r["method"] == method)
            ax.plot(
                [p[0] for p in pts],
                [p[1] * 1e3 for p in pts],
                marker="o",
                label=method,
                linestyle="--" if "cross_entropy" in method else "-",
            )
        batch = sub[0]["batch"] if sub else "?"
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="classes C",
            ylabel="ms per forward+backward",
            title=f"{kind}: batch {batch}, float32, CPU",
        )
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    runner.save_figure(fig, path)


def print_summary(result: dict[str, Any]) -> None:
    print("\nRatios to F.cross_entropy (forward+backward, medians of interleaved rounds):")
    for r in result["ratios"]:
        ratio = f"{r['ratio_to_ce']:8.2f}x" if "ratio_to_ce" in r else "       -"
        extra = " (extrapolated)" if "extrapolated_from_rows" in r else ""
        if "best_ratio_to_ce" in r:
            extra += f"  best {r['best_ratio_to_ce']:.2f}x"
        print(
            f"  {r['tree']:>10} {r['target']:>4}  {r['method']:<40} {_fmt_ms(r.get('seconds')):>9} ms {ratio}{extra}"
            f"{'  ' + r['skipped'] if 'skipped' in r else ''}"
        )
    if result.get("scaling_summary"):
        print("\nScaling (log-log slope of time vs classes at fixed batch):")
        for s in result["scaling_summary"]:
            print(
                f"  {s['kind']:>6}  {s['method']:<28} slope {s['slope_fixed_batch']:.2f} "
                f"(best times {s['slope_fixed_batch_best']:.2f})  "
                f"ns/element {s['ns_per_element_min']:.3g}..{s['ns_per_element_max']:.3g}"
            )
    for m in result.get("memory", []):
        if "skipped" in m:
            print(f"\nMemory {m['tree']}: {m['skipped']}")
            continue
        print(f"\nPeak extra memory, {m['tree']} B={m['batch']} (input {m['input_bytes'] / 2**20:.1f} MiB):")
        for name, v in m["methods"].items():
            print(f"  {name:<24} {v['extra_bytes'] / 2**20:8.1f} MiB  {v['x_input']:.2f}x input")


# ---------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> int:
    import numba

    threads, numba_threads = torch.get_num_threads(), numba.get_num_threads()
    try:
        return _run(args)
    finally:  # run() may be called in-process (tests): leave the thread counts as they were
        torch.set_num_threads(threads)
        numba.set_num_threads(numba_threads)


def set_threads(n: int) -> None:
    """Use ``n`` threads in torch and in numba's parallel kernels (capped at numba's pool size)."""
    import numba

    torch.set_num_threads(n)
    numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))


def _run(args: argparse.Namespace) -> int:
    try:
        cfg = Config.from_args(args)
    except ValueError as exc:
        print(f"emdloss bench: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        set_threads(args.threads)
    gen = runner.seed_everything(cfg.seed)
    warnings.filterwarnings("ignore", message=".*not writable.*")
    started = time.time()
    load_before = _loadavg()

    trees: list[tuple[str, Tree]] = []
    skipped_trees: dict[str, str] = {}
    for name in cfg.trees:
        try:
            trees.append((name, build_tree(name, cfg.seed)))
        except FileNotFoundError as exc:  # DataUnavailable: the shared data is not on this machine
            skipped_trees[name] = str(exc)
            print(f"emdloss bench: skipping {name}: {exc}", file=sys.stderr)
        except ValueError as exc:
            print(f"emdloss bench: {exc}", file=sys.stderr)
            return 2

    workloads = [(n, t, k) for n, t in trees for k in ("hard", "soft")]
    total = (
        len(workloads)
        + 2 * len(cfg.sizes) * 2
        + (len(cfg.memory_sizes) * len(cfg.memory_kinds) if cfg.memory else 0)
        + int(cfg.compile_time)
    )
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="bench", file=sys.stderr, dynamic_ncols=True, disable=args.no_progress)
    note = lambda text: bar.set_postfix_str(text[:60])

    phases: dict[str, float] = {}
    t_phase = time.time()
    ratios: list[dict[str, Any]] = []
    for name, tree, kind in workloads:
        note(f"{name} {kind}")
        ratios += run_workload(
            name,
            tree,
            kind,
            cfg.batch,
            cfg,
            compile_ok=cfg.compile and kind == "hard",
            dense_ok=True,
            anchors=cfg.slow and kind == "hard",
            gen=gen,
            progress=note,
        )
        bar.update(1)

    phases["ratios"], t_phase = time.time() - t_phase, time.time()
    note("scaling")
    scaling = run_scaling(cfg, gen, bar) if cfg.sizes else []
    phases["scaling"], t_phase = time.time() - t_phase, time.time()
    summary = scaling_summary(scaling)

    memory: list[dict[str, Any]] = []
    if cfg.memory:
        for size in cfg.memory_sizes:
            for kind in cfg.memory_kinds:
                note(f"memory {kind}{size}")
                batch = max(1, cfg.memory_elements // size)
                memory.append(run_memory(f"{kind}{size}", batch, cfg))
                bar.update(1)

    phases["memory"], t_phase = time.time() - t_phase, time.time()
    compile_time: dict[str, Any] = {}
    if cfg.compile_time:
        note("numba compile time")
        compile_time = run_compile_time()
        bar.update(1)
    phases["numba_compile"] = time.time() - t_phase
    bar.close()

    import numba

    machine = {
        **runner.machine_info(),
        "numba": numba.__version__,
        "numba_threads": numba.get_num_threads(),
        "numba_threading_layer": _threading_layer(),
        "load_average_before": load_before,
        "load_average_after": _loadavg(),
        "device": cfg.device,
        "device_name": torch.cuda.get_device_name(cfg.device) if cfg.device != "cpu" else None,
    }
    result = {
        "config": cfg.__dict__,
        "command": runner.command_line(),
        "machine": machine,
        "seconds_total": time.time() - started,
        "seconds_by_phase": phases,
        "skipped_trees": skipped_trees,
        "ratios": ratios,
        "scaling": scaling,
        "scaling_summary": summary,
        "memory": memory,
        "numba_compile": compile_time,
    }
    runner.write_json(out / "bench.json", result)
    runner.write_text(out / "bench.md", report(result, cfg))
    if scaling:
        plot(scaling, out / "bench.png")
    print_summary(result)
    load, cpus = machine.get("load_average_after"), os.cpu_count() or 1
    if load and load[0] > cpus and cfg.threads > 1:
        print(
            f"\nnote: load average {load[0]:.1f} on {cpus} CPUs: other processes competed for the cores and stall "
            "multi-threaded calls; for steadier numbers run again with --threads 1",
            file=sys.stderr,
        )
    print(
        f"\nwrote {out / 'bench.json'}, {out / 'bench.md'}"
        + (f", {out / 'bench.png'}" if scaling else "")
        + f" in {result['seconds_total']:.0f} s"
    )
    return 0


def _loadavg() -> list[float] | None:
    """1, 5 and 15 minute load averages: how busy the machine was (other processes skew timings)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover - not on this platform
        return None


def _threading_layer() -> str:
    try:
        import numba

        return str(numba.threading_layer())
    except Exception:  # noqa: BLE001 - raises until a parallel kernel has run
        return "not initialised"


def report(result: dict[str, Any], cfg: Config) -> str:
    parts = [runner.report_header("emdloss speed benchmark", cfg.__dict__)]
    parts.append(
        "Times are medians over interleaved rounds; `x CE` is the median over rounds of the method's time divided by "
        "`F.cross_entropy` (class-index targets, same logits) in the same round. Rows marked *extrapolated* ran on a "
        "subsample of the batch and were scaled linearly. `rel. diff vs reference` compares the loss value with the "
        "torch reference backend in float64 (Sinkhorn rows differ by their entropic bias).\n"
    )
    m = result["machine"]
    parts.append(
        f"Load average (1, 5, 15 min) before the run {m.get('load_average_before')}, after "
        f"{m.get('load_average_after')}, on {m.get('cpu_count')} CPUs; torch threads {m.get('torch_threads')}, "
        f"numba threads {m.get('numba_threads')}. A load above the CPU count means other processes competed for the "
        "cores: the `best` columns (fastest round) are then the better estimate of each method's own cost.\n"
    )
    if cfg.device != "cpu":
        parts.append(
            f"Device: {cfg.device} ({m.get('device_name')}). Times are CUDA events around the calls, after warm-up; "
            "the fused CPU kernel, the OT anchors, scaling, memory and JIT probes are CPU measurements, not run here.\n"
        )
    if result["skipped_trees"]:
        parts.append("Skipped workloads: " + "; ".join(f"{k}: {v}" for k, v in result["skipped_trees"].items()) + "\n")
    parts.append(
        "## Summary\n\nForward+backward time over `F.cross_entropy` (class indices) on the same logits, batch "
        f"{cfg.batch}, float32; median over interleaved rounds (fastest round in brackets). * = extrapolated from a "
        "subsample of rows.\n\n" + headline_table(result["ratios"]) + "\n"
    )
    parts.append("## Ratios to cross-entropy\n\n" + ratio_table(result["ratios"]) + "\n")
    if result["scaling"]:
        parts.append(
            "## Scaling\n\n"
            + summary_table(result["scaling_summary"])
            + "\n\n"
            + scaling_table(result["scaling"])
            + "\n"
        )
    if result["memory"]:
        parts.append(
            "## Peak extra memory\n\nResident-set high-water mark during one forward+backward minus the resident set "
            "before it, in a fresh process with glibc mmap threshold 128 KiB (freed blocks return to the OS). "
            "Includes the input-sized gradient of the logits.\n\n" + memory_table(result["memory"]) + "\n"
        )
    ct = result.get("numba_compile") or {}
    if ct:
        lines = ["## Fused kernel JIT time\n"]
        for label in ("cold", "cached"):
            v = ct.get(label, {})
            if "skipped" in v:
                lines.append(f"- {label}: {v['skipped']}")
            elif v:
                lines.append(
                    f"- {label} numba cache: first calls {v['total_s']:.1f} s in all "
                    f"({len(v['calls'])} first calls), import {v['import_s']:.1f} s; numba threads "
                    f"{v['numba_threads']}, torch threads {v['torch_threads']}"
                )
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)
