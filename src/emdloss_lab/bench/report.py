"""What ``emdloss bench`` writes and prints, from the result dictionary that is stored as bench.json.

- markdown tables: :func:`ratio_table` (every workload row), :func:`headline_table` (methods x workloads, for a
  README), :func:`scaling_table`, :func:`summary_table` (log-log slopes) and :func:`memory_table`;
- :func:`report`: bench.md, the tables with the text that says how to read them;
- :func:`plot`: bench.png, time against classes (log-log), one line per method;
- :func:`print_summary`: the short summary on stdout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..experiments import runner
from .first_use import cold_table, small_table
from .harness import Config

# ---------------------------------------------------------------------- tables


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


# ---------------------------------------------------------------------- markdown report


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
    if result["ratios"]:
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
    if result.get("small"):
        parts.append(
            "## Small problems\n\nChains of 5 and 10 classes, class-index targets, forward+backward with default "
            "thread settings; `x CE` as above (fastest round in brackets).\n\n" + small_table(result["small"]) + "\n"
        )
    if result.get("cold_start"):
        parts.append(
            "## First call (cold start)\n\nFirst forward+backward of the default backend in a fresh process "
            f"(batch {result['cold_start'][0]['batch']}), with an empty numba cache (`NUMBA_CACHE_DIR`), then again "
            "with the cache that run filled. Import time is not included. Distance table: building the (C, C) table of "
            "the hard rho = 1 kernel again for an uncached copy of the tree (the first call includes it).\n\n"
            + cold_table(result["cold_start"])
            + "\n"
        )
    return "\n".join(parts)


# ---------------------------------------------------------------------- plot and summary


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
    if result["ratios"]:
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
    if result.get("small"):
        print("\nSmall problems (chain, class indices; default backend over F.cross_entropy):")
        print("\n".join("  " + line for line in small_table(result["small"]).splitlines()))
    if result.get("cold_start"):
        print("\nFirst call in a fresh process (numba cache empty, then filled):")
        print("\n".join("  " + line for line in cold_table(result["cold_start"]).splitlines()))
