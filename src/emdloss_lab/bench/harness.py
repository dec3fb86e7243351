"""The timing harness of ``emdloss bench``: what a run is configured to do, and how one call is timed.

- :class:`Config`, built from the command-line options by :meth:`Config.from_args` (stored in bench.json);
- inputs and steps: :func:`make_inputs` draws logits and targets, :func:`make_step` wraps a loss into one
  forward+backward, :func:`rows_of` takes the first rows of a batch;
- timing: :func:`time_calls` (wall clock on the CPU, CUDA events on a GPU), :func:`interleaved` (every method once
  per round, in a rotated order), and the ratios to cross-entropy :func:`median_ratio` and :func:`best_ratio`;
- the machine: :func:`set_threads` for torch and numba, :func:`loadavg` and :func:`threading_layer` for the record.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

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
    small: bool = True  # the small-problem cells (first_use.run_small)
    device: str = "cpu"
    triton: bool = False  # time backend="triton" (default on a GPU; on the CPU only in Triton's interpreter)

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
        if getattr(args, "only", None) == "first-use":  # the cold-start times and small-problem ratios alone
            only = {"trees": "", "no_slow": True, "no_memory": True, "compile": False, "compile_time": True}
            args = argparse.Namespace(**{**vars(args), **only})  # a copy: the caller's arguments stay as given
        return Config(
            quick=quick,
            seed=int(args.seed),
            batch=int(args.batch),
            trees=[t.strip() for t in args.trees.split(",") if t.strip()],
            sizes=sizes if on_cpu and getattr(args, "only", None) is None else [],
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
            small=not getattr(args, "no_small", False) and on_cpu,
            device=device,
            triton=bool(args.triton) if getattr(args, "triton", None) is not None else not on_cpu,
        )


def _int_list(text: str) -> list[int]:
    try:
        values = [int(float(v)) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"expected a comma-separated list of integers, got {text!r}") from None
    if not values or min(values) < 2:
        raise ValueError(f"class counts must be integers >= 2, got {text!r}")
    return values


# ---------------------------------------------------------------------- inputs and steps


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


def wait_for_kernel_compiles() -> None:
    """Block until the fused kernels' background compiles (if any started) are done."""
    module = sys.modules.get("emdloss.backends.numba_kernels.background_compile")
    if module is not None:
        module.wait()


def interleaved(steps: dict[str, Step], rounds: int, min_time: float, device: str = "cpu") -> dict[str, list[float]]:
    """Per-call seconds of every step in each of ``rounds`` rounds; steps run in a rotated order per round.

    Each step is warmed up first, until the fused kernels' parallel twins have compiled (they compile in the
    background while the first big batches run on one thread); a timing repeats the call enough times to last
    ``min_time``.
    """
    for step in steps.values():
        step()
    wait_for_kernel_compiles()
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


# ---------------------------------------------------------------------- threads and machine load


def set_threads(n: int) -> None:
    """Use ``n`` threads in torch and in numba's parallel kernels (capped at numba's pool size)."""
    import numba

    torch.set_num_threads(n)
    numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))


def loadavg() -> list[float] | None:
    """1, 5 and 15 minute load averages: how busy the machine was (other processes skew timings)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover - not on this platform
        return None


def threading_layer() -> str:
    try:
        import numba

        return str(numba.threading_layer())
    except Exception:
        return "not initialised"
