"""The measurements of ``emdloss bench``, each producing the rows of one section of bench.json.

- ratios: :func:`run_workload` times every method of one (tree, batch, target) workload against cross-entropy,
  the fast ones interleaved, the OT anchors on a subsample of rows, extrapolated (:func:`warm_up` makes the first
  call and checks the loss value against the reference);
- scaling: :func:`run_scaling` sweeps chains and random trees over the class counts, at a fixed batch and at a
  fixed number of elements; :func:`scaling_summary` fits the log-log :func:`slope` of each method;
- peak memory: :func:`run_memory` starts :func:`memory_child` in a fresh subprocess (glibc told to ``mmap``
  every block over 128 KiB, ``VmHWM`` reset through ``/proc/self/clear_refs``).

The first-use measurements (cold start, small problems) are in :mod:`.first_use`.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from emdloss.losses import EMDLoss
from emdloss.tree import Tree

from .harness import (
    Config,
    LossFn,
    Step,
    best_ratio,
    interleaved,
    make_inputs,
    make_step,
    median_ratio,
    rows_of,
    set_threads,
    time_calls,
    wait_for_kernel_compiles,
)
from .methods import DENSE_MAX_ENTRIES, DenseClosedForm, Method, build_tree, loss_methods, reference_value

# ---------------------------------------------------------------------- ratios


def warm_up(m: Method, x: Tensor, target: Tensor, tree: Tree) -> tuple[Step | None, float | None]:
    """One forward+backward (also the compile for torch.compile); returns the timed step and the relative
    difference of the loss from :func:`reference_value`, or records why the method failed."""
    t0 = time.perf_counter()
    try:
        x.grad = None
        loss = m.fn(x, target)  # type: ignore[misc]
        loss.backward()
    except Exception as exc:
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
        wait_for_kernel_compiles()  # a parallel twin compiling in the background would count in the peak
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
    code = "from emdloss_lab.bench.probes import memory_child; memory_child()"
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
