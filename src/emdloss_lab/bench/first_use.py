"""The two first-use measurements of ``emdloss bench`` (issue: no long wait on the first call, small problems as
fast as cross-entropy):

- **cold start**: :func:`run_cold_start` starts :func:`cold_start_child` once per (tree kind, target, rho) in a
  fresh Python process with an empty numba cache directory, and times the first forward+backward (numba
  compiling the kernel variant it needs), then the same first call again with that cache filled;
- **small problems**: :func:`run_small` times the default backend on the most common ordinal sizes (5 and 10
  classes, batches of 32 and 128, rho 1 and 2) against ``F.cross_entropy`` on the same logits, interleaved, with
  default thread settings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from emdloss.losses import EMDLoss

from .harness import Config, best_ratio, interleaved, make_inputs, make_step, median_ratio

#: (tree kind, classes, target, rho) of the cold-start probe: 1,000 classes (lane and distance-matrix kernels at
#: this batch) and 10^4, the largest size the first-call goal names (the one-row kernel); and the largest
#: distance table the hard rho = 1 kernel builds (4,096 classes).
COLD_CASES = [
    (kind, classes, target, rho)
    for classes in (1_000, 10_000)
    for kind in ("chain", "tree")
    for target in ("hard", "soft")
    for rho in (1.0, 2.0)
] + [("tree", 4_096, "hard", 1.0)]
COLD_BATCH = 64

#: (classes, batch, rho) of the small-problem cells.
SMALL_CASES = [(c, b, rho) for c in (5, 10) for b in (32, 128) for rho in (1.0, 2.0)]


# ---------------------------------------------------------------------- cold start (subprocesses)


def cold_start_child(kind: str, classes: int, target: str, rho: float, batch: int) -> None:
    """Print (JSON) the first and second forward+backward times of the default backend in this process."""
    from emdloss.backends.numba_kernels import DISTANCE_MATRIX_MAX_CLASSES
    from emdloss.backends.numba_kernels.tree_arrays import distance_rows
    from emdloss.tree import Tree

    from .methods import build_tree

    tree = build_tree(f"chain{classes}" if kind == "chain" else f"random{classes}")
    gen = torch.Generator().manual_seed(0)
    x, y = make_inputs(batch, tree.num_classes, target, gen)
    loss = EMDLoss(tree, rho=rho)
    t, cpu = time.perf_counter(), time.process_time()
    make_step(loss, x, y)()
    first, first_cpu = time.perf_counter() - t, time.process_time() - cpu
    t = time.perf_counter()
    make_step(loss, x, y)()
    times = {"first_s": first, "first_cpu_s": first_cpu, "second_s": time.perf_counter() - t}
    if target == "hard" and rho == 1.0 and classes <= DISTANCE_MATRIX_MAX_CLASSES:
        # the first call built the (C, C) distance table; build it again for an uncached copy of the tree
        copy = Tree.from_dict(tree.to_dict())
        t = time.perf_counter()
        distance_rows(copy, np.dtype(np.float32))
        times["table_s"] = time.perf_counter() - t
    print(json.dumps(times))


def _child(case: tuple[str, int, str, float], cache: str) -> dict[str, Any]:
    kind, classes, target, rho = case
    code = (
        "from emdloss_lab.bench.first_use import cold_start_child; "
        f"cold_start_child({kind!r}, {classes}, {target!r}, {rho}, {COLD_BATCH})"
    )
    env = {**os.environ, "NUMBA_CACHE_DIR": cache}
    proc = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env, timeout=900
    )
    if proc.returncode != 0:
        return {"skipped": f"subprocess failed: {proc.stderr.strip()[-300:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_cold_start(cases: list[tuple[str, int, str, float]] | None = None) -> list[dict[str, Any]]:
    """One row per case: the first call with an empty numba cache (``cold``) and with it filled (``cached``),
    each in a fresh process."""
    rows = []
    for case in cases or COLD_CASES:
        kind, classes, target, rho = case
        with tempfile.TemporaryDirectory(prefix="emdloss-numba-cache-") as cache:
            cold = _child(case, cache)
            cached = _child(case, cache)
        row = {"tree": kind, "classes": classes, "target": target, "rho": rho, "batch": COLD_BATCH}
        rows.append({**row, "cold": cold, "cached": cached})
    return rows


# ---------------------------------------------------------------------- small problems


def run_small(cfg: Config, gen: torch.Generator) -> list[dict[str, Any]]:
    """``EMDLoss`` (default backend, and ``backend="torch"``) against ``F.cross_entropy`` on small chains, and
    against ``nn.CrossEntropyLoss`` (module for module: both pay ``nn.Module.__call__``); one row per cell."""
    from emdloss.tree import Tree

    rows = []
    for classes, batch, rho in SMALL_CASES:
        x, y = make_inputs(batch, classes, "hard", gen)
        tree = Tree.chain(classes)
        steps = {
            "cross_entropy": make_step(lambda x, t: F.cross_entropy(x, t), x, y),
            "CrossEntropyLoss": make_step(nn.CrossEntropyLoss(), x, y),
            "emdloss": make_step(EMDLoss(tree, rho=rho), x, y),
            "emdloss torch": make_step(EMDLoss(tree, rho=rho, backend="torch"), x, y),
        }
        times = interleaved(steps, cfg.rounds, cfg.min_time)
        base = times["cross_entropy"]
        row: dict[str, Any] = {"classes": classes, "batch": batch, "rho": rho}
        for name in ("cross_entropy", "CrossEntropyLoss", "emdloss", "emdloss torch"):
            t = times[name]
            row[name] = {
                "seconds": float(torch.tensor(t).median()),
                "ratio_to_ce": median_ratio(t, base),
                "best_ratio_to_ce": best_ratio(t, base),
            }
        row["emdloss"]["ratio_to_module"] = median_ratio(times["emdloss"], times["CrossEntropyLoss"])
        rows.append(row)
    return rows


# ---------------------------------------------------------------------- tables


def small_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| classes | batch | rho | cross-entropy (us) | EMDLoss (us) | x CE (best) | x nn.CrossEntropyLoss "
        "| backend='torch' x CE |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ce, emd, ref = r["cross_entropy"], r["emdloss"], r["emdloss torch"]
        module = f"{emd['ratio_to_module']:.2f}" if "ratio_to_module" in emd else ""  # absent in older reports
        lines.append(
            f"| {r['classes']} | {r['batch']} | {r['rho']:g} | {ce['seconds'] * 1e6:.0f} | {emd['seconds'] * 1e6:.0f} | "
            f"{emd['ratio_to_ce']:.2f} ({emd['best_ratio_to_ce']:.2f}) | {module} | {ref['ratio_to_ce']:.2f} |"
        )
    return "\n".join(lines)


def cold_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| tree | classes | target | rho | first call, empty cache (s) | its CPU time (s) | first call, cache filled (s) "
        "| distance table (s) |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cold, cached = r["cold"], r["cached"]
        if "skipped" in cold or "skipped" in cached:
            lines.append(
                f"| {r['tree']} | {r['classes']} | {r['target']} | {r['rho']:g} | {cold.get('skipped', '')} | | | |"
            )
            continue
        lines.append(
            f"| {r['tree']} | {r['classes']} | {r['target']} | {r['rho']:g} | {cold['first_s']:.2f} | "
            f"{cold['first_cpu_s']:.2f} | {cached['first_s']:.2f} | "
            + (f"{cold['table_s']:.2f} |" if "table_s" in cold else "|")
        )
    return "\n".join(lines)
