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
5. **First use** (:mod:`.first_use`): the first forward+backward in a fresh process with an empty numba cache
   (10^4-class chain and tree, hard and soft, rho 1 and 2), then with the cache filled; and **small problems**,
   5 and 10 classes at batches 32 and 128, the default backend against cross-entropy.

With ``--device cuda`` the ratio workloads run on the GPU (cross-entropy, the Triton kernel ``backend="triton"``,
the torch backend eager and under ``torch.compile``, the dense closed form), timed with CUDA events after warm-up; the fused kernel, the OT
anchors, the scaling sweep and the memory and JIT probes are CPU measurements and are left out.

Outputs in ``--out``: ``bench.json`` (everything, with the machine and configuration), ``bench.md`` (tables),
``bench.png`` (time against classes, log-log, one line per method). All written atomically.

This module is the command line only (:func:`add_arguments`, :func:`run`); the rest lives next to it:
``harness`` (configuration, inputs, timing, threads), ``methods`` (the losses compared and the trees),
``probes`` (the ratio workloads, the scaling sweep, the memory and JIT subprocesses) and ``report``
(tables, bench.md, bench.png, the printed summary).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from typing import Any

import torch

from emdloss._optional import require
from emdloss.tree import Tree

from ..errors import UsageError
from ..experiments import runner
from .first_use import run_cold_start, run_small
from .harness import Config, loadavg, set_threads, threading_layer
from .methods import build_tree
from .probes import run_memory, run_scaling, run_workload, scaling_summary
from .report import plot, print_summary, report

# ---------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="folder for bench.json, bench.md and bench.png")
    parser.add_argument(
        "--quick", action="store_true", help="a smaller run (< 1 min on 2 cores): fewer rounds and sizes"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs and trees")
    parser.add_argument("--batch", type=int, default=256, help="batch of the ratio workloads (default 256)")
    parser.add_argument(
        "--trees",
        default="imagenet,chain1000",
        help="ratio workloads: comma list of 'imagenet' (shared data; skipped when absent), 'chainN', 'randomN'",
    )
    parser.add_argument(
        "--sizes", default=None, help="class counts of the scaling sweep (default 1e3,1e4,1e5,1e6; quick to 1e5)"
    )
    parser.add_argument("--scaling-batch", type=int, default=8, help="batch of the fixed-batch scaling series")
    parser.add_argument(
        "--scaling-elements",
        type=int,
        default=None,
        help="batch x classes of the fixed-elements series (default 2^20, quick 2^18)",
    )
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 15, quick 5)")
    parser.add_argument(
        "--min-time",
        type=float,
        default=None,
        help="seconds per timing, by repeating calls (default 0.01, quick 0.005)",
    )
    parser.add_argument(
        "--no-slow", action="store_true", help="skip the OT anchors (POT emd2 / Sinkhorn; hard targets)"
    )
    parser.add_argument(
        "--slow-rows", type=int, default=None, help="rows the anchors run on, then extrapolated (default 2, quick 1)"
    )
    parser.add_argument("--slow-reps", type=int, default=None, help="repetitions of each anchor (default 2, quick 1)")
    parser.add_argument(
        "--sinkhorn-iters",
        type=int,
        default=None,
        help="fixed Sinkhorn iterations of the anchors (default 100, quick 20)",
    )
    parser.add_argument(
        "--compile",
        dest="compile",
        action="store_true",
        default=None,
        help="include torch.compile (default unless --quick)",
    )
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile (quick default)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument(
        "--memory-sizes", default=None, help="class counts of the memory probes (default 1e5,1e6; quick 1e5)"
    )
    parser.add_argument(
        "--memory-elements", type=int, default=2**23, help="batch x classes of the memory probes (default 2^23: 32 MiB)"
    )
    parser.add_argument(
        "--compile-time",
        dest="compile_time",
        action="store_true",
        default=None,
        help="time the first call in fresh processes with an empty numba cache (default unless --quick)",
    )
    parser.add_argument(
        "--no-compile-time",
        dest="compile_time",
        action="store_false",
        help="skip the cold-start timing (quick default)",
    )
    parser.add_argument(
        "--no-small", action="store_true", help="skip the small-problem cells (5 and 10 classes, batches 32 and 128)"
    )
    parser.add_argument(
        "--only",
        choices=["first-use"],
        default=None,
        help="first-use: only the cold-start times and the small-problem ratios (about 3 minutes on 2 cores)",
    )
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
    parser.add_argument(
        "--triton",
        dest="triton",
        action="store_true",
        default=None,
        help="time backend='triton' (default with --device cuda; on the CPU it needs TRITON_INTERPRET=1: a smoke run)",
    )
    parser.add_argument("--no-triton", dest="triton", action="store_false", help="leave backend='triton' out")


# ---------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> int:
    import numba

    threads, numba_threads = torch.get_num_threads(), numba.get_num_threads()
    try:
        return _run(args)
    finally:  # run() may be called in-process (tests): leave the thread counts as they were
        torch.set_num_threads(threads)
        numba.set_num_threads(numba_threads)


def _run(args: argparse.Namespace) -> int:
    try:
        cfg = Config.from_args(args)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    out = runner.output_folder(args.out)
    if args.threads:
        set_threads(args.threads)
    gen = runner.seed_everything(cfg.seed)
    warnings.filterwarnings("ignore", message=".*not writable.*")
    started = time.time()
    load_before = loadavg()

    trees: list[tuple[str, Tree]] = []
    skipped_trees: dict[str, str] = {}
    for name in cfg.trees:
        try:
            trees.append((name, build_tree(name, cfg.seed)))
        except FileNotFoundError as exc:  # DataUnavailable: the shared data is not on this machine
            skipped_trees[name] = str(exc)
            print(f"emdloss bench: skipping {name}: {exc}", file=sys.stderr)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc

    workloads = [(n, t, k) for n, t in trees for k in ("hard", "soft")]
    total = (
        len(workloads)
        + 2 * len(cfg.sizes) * 2
        + (len(cfg.memory_sizes) * len(cfg.memory_kinds) if cfg.memory else 0)
        + int(cfg.compile_time)
        + int(cfg.small)
    )
    tqdm = require("tqdm.auto", "bench", "emdloss bench").tqdm

    bar = tqdm(total=total, desc="bench", file=sys.stderr, dynamic_ncols=True, disable=args.no_progress)

    def note(text: str) -> None:
        bar.set_postfix_str(text[:60])

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
    small: list[dict[str, Any]] = []
    if cfg.small:
        note("small problems")
        small = run_small(cfg, gen)
        bar.update(1)
    phases["small"], t_phase = time.time() - t_phase, time.time()
    cold_start: list[dict[str, Any]] = []
    if cfg.compile_time:
        note("cold start (fresh processes, empty numba cache)")
        cold_start = run_cold_start()
        bar.update(1)
    phases["cold_start"] = time.time() - t_phase
    bar.close()

    import numba

    machine = {
        **runner.machine_info(),
        "numba": numba.__version__,
        "numba_threads": numba.get_num_threads(),
        "numba_threading_layer": threading_layer(),
        "load_average_before": load_before,
        "load_average_after": loadavg(),
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
        "small": small,
        "cold_start": cold_start,
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
