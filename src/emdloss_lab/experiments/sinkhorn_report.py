"""Report of ``emdloss experiment sinkhorn``: the plots, the tables of ``report.md`` and the printed summary,
all drawn from the ``results`` dict that :func:`emdloss_lab.experiments.sinkhorn_study.run` writes to
``results.json`` (nothing here measures anything).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import runner

# (results["timing"] key, label) of the timed methods, in table and plot order
TIMING_COLUMNS = [
    ("exact", "exact EMD (closed form)"),
    ("exact_fwd_bwd", "exact EMD fwd+bwd"),
    ("ours_log", "emdloss sinkhorn (log)"),
    ("ours_plain", "emdloss sinkhorn (plain)"),
    ("pot_solve_batch_log", "POT solve_batch (log, torch)"),
    ("pot_sinkhorn2_loop", "POT sinkhorn2 loop (numpy)"),
]


def plots(results: dict[str, Any], out: Path) -> list[str]:
    """Draw the four figures into ``out`` (value error against reg per iteration budget, iterations to 1%,
    gradient cosine against reg, time per batch against C) and return their file names."""
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


def _fmt(v: Any) -> str:
    """A table cell: 3 significant digits for floats, a dash for a missing value."""
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def report(results: dict[str, Any], plot_files: list[str]) -> str:
    """``report.md``: one table per measured item (1-5) of :mod:`.sinkhorn_study`, then the plots."""
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
    for p in plot_files:
        lines.append(f"![{p}]({p})\n")
    return "\n".join(lines)


def summary(results: dict[str, Any]) -> str:
    """The lines printed at the end of a run: best value error per problem, the plain variant's smallest
    finite reg, and log Sinkhorn's time against the exact EMD at the largest C timed."""
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
