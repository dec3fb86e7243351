"""What every experiment shares: output folders, seeds, progress bars, atomic writes and checkpoints.

Nothing a run writes is ever half-written: every file goes to a temporary name in the same folder and is
renamed into place (``os.replace`` is atomic on POSIX). Long runs record each finished unit of work in a
checkpoint; a run started again with the same output folder and configuration skips what is done and ends
with the same results as an uninterrupted run. A checkpoint whose configuration differs, or that cannot be
read, stops the run with :class:`CheckpointError` instead of silently starting over.

Files are created with the permissions the umask gives new files (``0o666 & ~umask``, e.g. 0644 under umask
022), as ``open`` would (:mod:`emdloss._atomic` sees to it).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import platform
import random
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from emdloss._atomic import atomic_path, write_text
from emdloss._optional import require

from ..errors import UsageError

CHECKPOINT_NAME = "checkpoint.json"


class CheckpointError(UsageError, RuntimeError):
    """A checkpoint that is corrupt or belongs to another configuration (a :class:`UsageError`: the command
    line exits with status 2 and the message)."""


# ---------------------------------------------------------------------- option types


def int_at_least(low: int) -> Callable[[str], int]:
    """argparse ``type``: an integer >= ``low`` (argparse reports anything else as a usage error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


positive_int = int_at_least(1)
nonnegative_int = int_at_least(0)


# ---------------------------------------------------------------------- output folder and atomic writes


def output_folder(path: str | os.PathLike[str]) -> Path:
    """``--out`` as a folder that exists (created with its parents), or a :class:`UsageError` saying why not."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder: choose a folder for the results")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create the output folder --out {out}: {exc.strerror or exc}") from exc
    return out


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    write_text(path, json.dumps(to_jsonable(data), indent=2, sort_keys=False, allow_nan=True) + "\n")


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (figures go to files, never to a screen)."""
    require("matplotlib", "cli", "the experiments' figures").use("Agg")
    return require("matplotlib.pyplot", "cli", "the experiments' figures")


def save_figure(fig: Any, path: str | os.PathLike[str], **kwargs: Any) -> None:
    """Save a matplotlib figure atomically (PNG unless the suffix says otherwise) and close it."""
    buf = io.BytesIO()
    fig.savefig(
        buf, format=Path(path).suffix.lstrip(".") or "png", dpi=kwargs.pop("dpi", 120), bbox_inches="tight", **kwargs
    )
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())
    pyplot().close(fig)


def torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` atomically (for model checkpoints)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def to_jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    return x


# ---------------------------------------------------------------------- seeds and environment


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a torch Generator seeded the same way."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - third-party code draws from numpy's global state
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def machine_info() -> dict[str, Any]:
    """A short description of where a result was measured."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def git_state() -> dict[str, Any]:
    """The commit the code runs at and whether the working tree differs from it (None when not in a git
    checkout or git is missing): ``{"commit": "78e6f52...", "dirty": False}``."""
    import subprocess

    root = Path(__file__).resolve().parents[3]
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit or None, "dirty": bool(dirty)}


def versions() -> dict[str, str | None]:
    """Versions of emdloss and of the packages a result depends on (None: not installed)."""
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in ("emdloss", "torch", "numpy", "numba", "scipy", "scikit-learn", "POT", "coral-pytorch"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def provenance(config: dict[str, Any]) -> dict[str, Any]:
    """What a result needs to be traced: commit, versions, machine, command, configuration and the time."""
    return {
        "git": git_state(),
        "versions": versions(),
        "machine": machine_info(),
        "command": command_line(),
        "config": to_jsonable(config),
        "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def command_line() -> str:
    """The command that is running, as a user would type it."""
    argv = sys.argv[:]
    if argv and argv[0].endswith(("emdloss", "__main__.py")):
        argv[0] = "emdloss"
    return " ".join(shlex.quote(a) for a in argv)


def config_changes(old: Any, new: Any) -> str:
    """What differs between two configurations, e.g. ``seeds 1 -> 2, steps 20 -> 150`` ('' if unknown)."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return ""
    old, new = to_jsonable(old), to_jsonable(new)

    def show(d: dict[str, Any], key: str) -> str:
        text = json.dumps(d[key]) if key in d else "(unset)"
        return text if len(text) <= 40 else text[:37] + "..."

    keys = [*old, *(k for k in new if k not in old)]
    return ", ".join(
        f"{k} {show(old, k)} -> {show(new, k)}" for k in keys if k not in old or k not in new or old[k] != new[k]
    )


def config_hash(config: dict[str, Any]) -> str:
    text = json.dumps(to_jsonable(config), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------- progress


def progress(iterable: Iterable[Any], desc: str, total: int | None = None, enabled: bool = True) -> Iterable[Any]:
    """A tqdm progress bar on stderr (plain iteration when tqdm is missing or ``enabled`` is False)."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with the cli extra
        return iterable
    # On a terminal the finished bar is erased; in a log (stderr not a terminal) it is left with its newline, so
    # that what is printed next (a table) starts on a line of its own instead of after the bar's last update.
    leave = not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty())
    return tqdm(iterable, desc=desc, total=total, file=sys.stderr, dynamic_ncols=True, leave=leave)


def end_progress_bars() -> None:
    """Close any progress bar still open (an error stopped its loop), so that a message starts a fresh line."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return
    for bar in list(getattr(tqdm, "_instances", ())):
        with contextlib.suppress(Exception):
            bar.close()


# ---------------------------------------------------------------------- checkpoints


class Checkpoint:
    """Finished units of work of one run, kept in ``out/checkpoint.json`` and written atomically.

    Usage::

        ckpt = Checkpoint(out_dir, config)          # raises CheckpointError on a mismatch
        for key in units:
            if key in ckpt:
                result = ckpt[key]
            else:
                result = compute(key)
                ckpt[key] = result                   # persisted at once
    """

    def __init__(self, out_dir: str | os.PathLike[str], config: dict[str, Any], resume: bool = True) -> None:
        self.path = Path(out_dir) / CHECKPOINT_NAME
        self.config = to_jsonable(config)
        self.hash = config_hash(config)
        self.done: dict[str, Any] = {}
        # the code each session of the run computed its units with: provenance.json, written at the end, would
        # otherwise name whatever the checkout holds by then
        self.code: list[dict[str, Any]] = []
        if Path(out_dir).exists() and not Path(out_dir).is_dir():
            raise CheckpointError(f"--out {out_dir} is a file, not a folder: choose a folder for the results")
        if self.path.exists():
            if not resume:
                raise CheckpointError(
                    f"--out {out_dir} already holds a run ({self.path}): pass --resume to continue it (or to "
                    "report a finished one again), or choose another --out"
                )
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                stored_hash, done = data["config_hash"], data["done"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(
                    f"checkpoint {self.path} is corrupt ({exc.__class__.__name__}: {exc}); "
                    "delete it to start over, or restore it"
                ) from None
            if stored_hash != self.hash:
                changed = config_changes(data.get("config"), self.config) if isinstance(data, dict) else ""
                raise CheckpointError(
                    f"--resume: checkpoint {self.path} belongs to a different configuration "
                    f"({changed or f'stored {stored_hash}, this run {self.hash}'}); resume with the options of "
                    "the earlier run, or use another --out for the new ones"
                )
            self.done = dict(done)
            stored_code = data.get("code")
            self.code = list(stored_code) if isinstance(stored_code, list) else []
        now = git_state()
        if not self.code or self.code[-1] != now:
            self.code.append(now)

    def __contains__(self, key: str) -> bool:
        return key in self.done

    def __getitem__(self, key: str) -> Any:
        return self.done[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self.done[key] = to_jsonable(value)
        write_json(
            self.path,
            {
                "config_hash": self.hash,
                "config": self.config,
                "done": self.done,
                "code": self.code,
                "time": time.time(),
            },
        )

    def __len__(self) -> int:
        return len(self.done)


Unit = tuple[str, int, str, int]  # (group, examples a class, loss, seed)


def run_units(
    ckpt: Checkpoint,
    units: list[Unit],
    compute: Callable[[str, int, str, int], Any],
    desc: str,
    show_progress: bool = True,
    workers: int = 1,
) -> dict[str, dict[str, list[Any]]]:
    """Compute each unit ``(group, examples a class, loss, seed)`` not yet in ``ckpt`` with ``compute`` (checkpointed
    under ``"group/k/loss/seed"``), then return every unit's result as ``{"group/k": {loss: [per seed]}}``.

    With ``workers`` > 1 the units run in that many forked processes (:func:`in_workers`) and are checkpointed as
    they finish, in any order. The results are the same: ``compute`` must make a unit's result a function of the
    unit alone (the experiments seed every trial from the unit's seed), and the returned dict follows ``units``."""
    todo = [u for u in units if unit_key(u) not in ckpt]
    done = in_workers(compute, todo, workers) if workers > 1 and len(todo) > 1 else ((u, compute(*u)) for u in todo)
    for unit, result in progress(done, desc, total=len(todo), enabled=show_progress):
        ckpt[unit_key(unit)] = result
    results: dict[str, dict[str, list[Any]]] = {}
    for unit in units:
        g, k, loss, _ = unit
        results.setdefault(f"{g}/{k}", {}).setdefault(loss, []).append(ckpt[unit_key(unit)])
    return results


def unit_key(unit: Unit) -> str:
    """The checkpoint key of a unit: ``"group/k/loss/seed"``."""
    return "/".join(str(part) for part in unit)


_worker_compute: Callable[..., Any] | None = None  # what forked workers run: set before the fork, inherited


def _run_in_worker(unit: Unit) -> tuple[Unit, Any]:
    assert _worker_compute is not None, "set by in_workers before the fork"
    return unit, _worker_compute(*unit)


def _worker_signals() -> None:
    """Workers leave Ctrl-C to the parent, which stops them, and die quietly of the parent's SIGTERM (not through
    the handler they inherit): one message, no traceback from each worker."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def in_workers(compute: Callable[..., Any], units: list[Unit], workers: int) -> Iterator[tuple[Unit, Any]]:
    """``(unit, compute(*unit))`` for every unit, computed in ``workers`` forked processes and yielded as each
    finishes. Forked, so that ``compute`` (a closure over the run's configuration and data) need not be pickled,
    and the workers inherit the caller's torch settings (threads, denormal flushing: the experiments call this under
    one torch thread, as a forked child of a multi-threaded parent should run). A unit that raises stops
    the run with its error; the units finished before it have been yielded (and checkpointed) already.

    Ctrl-C or SIGTERM stops the workers with the run (SIGTERM is raised as ``KeyboardInterrupt`` meanwhile, so that
    the pool is terminated instead of leaving its workers to finish their units for nobody)."""
    global _worker_compute
    if "fork" not in multiprocessing.get_all_start_methods():
        raise UsageError("--workers needs processes started by fork (Linux); run with --workers 1")
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None
    _worker_compute = compute
    try:
        context = multiprocessing.get_context("fork")
        with context.Pool(min(workers, len(units)), initializer=_worker_signals) as pool:
            yield from pool.imap_unordered(_run_in_worker, units)
    finally:
        _worker_compute = None
        if main_thread:  # None: the handler was not set from Python, i.e. the default
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


# ---------------------------------------------------------------------- reports


def paired_bootstrap(
    a: Iterable[float], b: Iterable[float], n_resamples: int = 10_000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """Mean paired difference ``mean(a_i - b_i)`` and its percentile-bootstrap interval.

    The pairs (seed i of method A and seed i of method B share data and split) are resampled with replacement,
    ``n_resamples`` times; the interval is the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles
    of the resampled means (as ``scipy.stats.bootstrap(..., method="percentile")``). Pairs with a NaN are dropped;
    no pair gives NaNs. With few pairs (5 seeds) the percentile interval is narrower than a t interval: read it
    as a description of the seeds' spread, not as a test.
    """
    x = np.asarray(list(a), dtype=np.float64) - np.asarray(list(b), dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return float("nan"), float("nan"), float("nan")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_resamples, x.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(x.mean()), float(lo), float(hi)


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    arr = np.asarray(list(values), dtype=np.float64)
    if arr.size == 0:
        return float("nan"), float("nan")
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def fmt_mean_std(values: Iterable[float], digits: int = 3) -> str:
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A GitHub markdown table."""

    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def wrote(out: str | os.PathLike[str], names: Iterable[str], seconds: float | None = None) -> None:
    """Print where a command wrote: ``wrote report.md, results.json and x.png to OUT/ in 12 s``."""
    names = list(names)
    listing = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    took = f" in {seconds:.0f} s" if seconds is not None else ""
    print(f"wrote {listing} to {os.path.join(str(out), '')}{took}")


def publish(out: Path, results: dict[str, Any], sections: list[str]) -> None:
    """Write ``results.json``, ``provenance.json`` (:func:`provenance`) and ``report.md`` (``sections`` joined; the
    first is :func:`report_header`'s) to ``out``, atomically, and print the report without its header."""
    # What produced the results goes beside them, not into them: results.json stays a pure function of the
    # configuration (a resumed run's equals an uninterrupted one's), provenance.json says where and when.
    prov = provenance(results.get("config", {}))
    try:  # the code the units were computed with (Checkpoint.code), when a checkpoint records it
        code = json.loads((out / CHECKPOINT_NAME).read_text(encoding="utf-8")).get("code")
    except (OSError, ValueError, AttributeError):
        code = None
    if isinstance(code, list) and code:
        prov["computed_with"] = code
    write_json(out / "provenance.json", prov)
    write_json(out / "results.json", results)
    write_text(out / "report.md", "\n".join(sections))
    print("\n".join(sections[1:]))


def report_header(title: str, config: dict[str, Any]) -> str:
    """The top of every report.md: title, the exact command, the configuration and the machine."""
    return (
        f"# {title}\n\n"
        f"Command: `{command_line()}`\n\n"
        f"Configuration:\n\n```json\n{json.dumps(to_jsonable(config), indent=2)}\n```\n\n"
        f"Machine: `{json.dumps(machine_info())}`\n\n"
        f"Code: `{json.dumps({**git_state(), 'versions': versions()})}`\n\n"
    )


# ---------------------------------------------------------------------- recorded results and `emdloss report`

#: the experiments whose results docs/results.md reports, with the command of their full run and its cost
RECORDED: dict[str, dict[str, str]] = {
    "convergence": {
        "command": "emdloss experiment convergence --out OUT",
        "cost": "42 min wall here on 2 shared, loaded cores (768 optimisation runs of 300 steps)",
    },
    "ordinal": {
        "command": "emdloss experiment ordinal --out OUT",
        "cost": "56 min wall at one torch thread on a shared 2-core machine (150 units of 6 trials, early stopping)",
    },
    "hierarchy": {
        "command": "emdloss experiment hierarchy --out OUT",
        "cost": "estimated 8-20 h of CPU from --quick (29 s CPU; full: 240 units of 6 trials up to 60 epochs); "
        "--workers N spreads the units over N cores",
    },
    "histograms": {
        "command": "emdloss experiment histograms --out OUT",
        "cost": "28 min at one torch thread on a shared 2-core machine (1,050 runs of 400 steps: 2 tasks x 5 seeds x "
        "3 optimisers x 5 losses x 7 learning rates)",
    },
    "proxy": {
        "command": "emdloss experiment proxy --out OUT",
        "cost": "estimated 1.4-1.8 h on 1 core from measured units (imagenet/50 ce 52 s, emd 14 s, others 52-62 s; "
        "full: 5 seeds x 31 units of 3 trials up to 40 epochs, 100 classes a seed)",
    },
}
BEGIN_MARK = "<!-- BEGIN generated by `emdloss report` from docs/results/*.json: edit those, not this block -->"
END_MARK = "<!-- END generated by `emdloss report` -->"
SUMMARY_BEGIN_MARK = "<!-- BEGIN claims summary generated by `emdloss report --readme`: edit docs/results/*.json -->"
SUMMARY_END_MARK = "<!-- END claims summary -->"
DESCRIPTION = (
    "Record an experiment's per-seed results under docs/results/ (--add OUT) and generate the tables of "
    "docs/results.md from the records (--write docs/results.md replaces the generated block). Experiments "
    "without a recorded full run are listed as pending, with the command that would produce one."
)


def _experiment_module(name: str) -> Any:
    import importlib

    if name not in RECORDED:
        raise UsageError(f"no report for experiment {name!r}: one of {', '.join(RECORDED)}")
    return importlib.import_module(f"emdloss_lab.experiments.{name}")


def record_run(out: str | os.PathLike[str], results_dir: str | os.PathLike[str]) -> Path:
    """Copy the per-seed results of the run in ``out`` (its results.json and provenance.json) to ``results_dir/NAME.json`` (a full
    run) or ``results_dir/NAME-partial.json`` (a --quick/--smoke or few-seed run), with its provenance.

    The record holds no curves or checkpoints, only what the generated tables need, so it stays small.
    """
    path = Path(out) / "results.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        config = data["config"]
        name = config["experiment"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"--add {out}: no readable results.json of an experiment there ({exc})") from None
    full = bool(_experiment_module(name).is_full(config))
    try:
        prov = json.loads((Path(out) / "provenance.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        prov = {"note": "no provenance.json beside results.json"}
    record = {
        "experiment": name,
        "full": full,
        "provenance": prov,
        "config": config,
        "results": data["results"],
    }
    folder = Path(results_dir)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{name}{'' if full else '-partial'}.json"
    write_text(target, json.dumps(to_jsonable(record), separators=(",", ":"), allow_nan=True) + "\n")
    return target


def verdict(diff: tuple[float, float, float], better: str) -> str:
    """``supported`` when the whole interval of ``diff`` (mean, lo, hi) is on the ``better`` side of 0
    (``"lower"`` or ``"higher"``), ``refuted`` when it is all on the other side, else ``inconclusive``."""
    _, lo, hi = diff
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return "inconclusive"
    good, bad = (hi < 0, lo > 0) if better == "lower" else (lo > 0, hi < 0)
    return "supported" if good else "refuted" if bad else "inconclusive"


def _commit_text(git: dict[str, Any]) -> str:
    return (git.get("commit") or "unknown")[:12] + (" (working tree modified)" if git.get("dirty") else "")


def generate_report(results_dir: str | os.PathLike[str]) -> str:
    """The generated block of docs/results.md: per experiment, its recorded full run (provenance, verdicts where
    the experiment defines them, tables) or a pending note."""
    folder = Path(results_dir)
    parts = [
        BEGIN_MARK,
        "",
        "### Results under the protocol of issue 16 (generated)",
        "",
        "Generated by `emdloss report --write docs/results.md` from the per-seed records in docs/results/ "
        "(`emdloss report --add OUT` records a run). Only full runs (the experiment's default configuration, "
        ">= 5 seeds) are reported here and only they carry verdicts.",
        "",
    ]
    for name, info in RECORDED.items():
        full = folder / f"{name}.json"
        parts.append(f"#### {name}\n")
        if not full.exists():
            partial = " (a partial run is recorded: not evidence)" if (folder / f"{name}-partial.json").exists() else ""
            parts.append(
                f"**Pending: no full run under the new protocol is recorded{partial}.** No verdict is drawn. To "
                f"produce one: `{info['command']}` ({info['cost']}), then `emdloss report --add OUT --write "
                "docs/results.md`.\n"
            )
            continue
        record = json.loads(full.read_text(encoding="utf-8"))
        prov = record.get("provenance", {})
        commits = ", then ".join(f"`{_commit_text(g)}`" for g in prov.get("computed_with") or [prov.get("git") or {}])
        parts.append(
            f"Run at commit {commits}, {prov.get('utc', 'time unknown')}: `{prov.get('command', '?')}`; "
            f"{record['config']['seeds']} seeds; versions `{json.dumps(prov.get('versions', {}))}`.\n"
        )
        module = _experiment_module(name)
        text = (module.verdicts(record) + "\n" if hasattr(module, "verdicts") else "") + module.render(record)
        # the experiment's "## section" headings sit under this block's "#### experiment" heading
        parts.append("\n".join("###" + line if line.startswith("## ") else line for line in text.split("\n")))
    parts += [END_MARK, ""]
    return "\n".join(parts)


def generate_summary(results_dir: str | os.PathLike[str]) -> str:
    """The generated block of the README's claims section: per experiment, one sentence of verdict counts from
    its recorded full run (the experiment's ``claim_summary``), or that it is pending."""
    folder = Path(results_dir)
    lines = [SUMMARY_BEGIN_MARK, ""]
    for name, info in RECORDED.items():
        full = folder / f"{name}.json"
        if not full.exists():
            lines.append(f"- **{name}: pending.** No full run under the protocol is recorded; `{info['command']}`.")
            continue
        record = json.loads(full.read_text(encoding="utf-8"))
        commits = ", then ".join(
            _commit_text(g)
            for g in record["provenance"].get("computed_with") or [record["provenance"].get("git") or {}]
        )
        module = _experiment_module(name)
        summary = module.claim_summary(record) if hasattr(module, "claim_summary") else "see docs/results.md."
        lines.append(f"- **{name}** ({record['config']['seeds']} seeds, commit {commits}): {summary}")
    lines += ["", SUMMARY_END_MARK, ""]
    return "\n".join(lines)


def write_generated_block(
    markdown_path: str | os.PathLike[str], block: str, begin: str = BEGIN_MARK, end: str = END_MARK
) -> None:
    """Replace the text between ``begin`` and ``end`` in ``markdown_path`` by ``block`` (which carries both
    marks); without the marks, append the block."""
    path = Path(markdown_path)
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1]
        text = head + block.rstrip("\n") + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block
    write_text(path, text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``emdloss report``'s options."""
    parser.add_argument(
        "--add", action="append", default=[], metavar="OUT", help="record the run in OUT (repeatable) first"
    )
    parser.add_argument("--results", default="docs/results", help="folder of the per-seed records")
    parser.add_argument("--write", metavar="FILE", help="replace the generated block of FILE (else print it)")
    parser.add_argument(
        "--readme", metavar="FILE", help="also replace the claims summary block of FILE (the README's claims section)"
    )


def run(args: argparse.Namespace) -> int:
    """``emdloss report``."""
    for out in args.add:
        print(f"recorded {record_run(out, args.results)}")
    block = generate_report(args.results)
    if args.write:
        write_generated_block(args.write, block)
        print(f"wrote the generated block of {args.write}")
    else:
        print(block)
    if args.readme:
        write_generated_block(args.readme, generate_summary(args.results), SUMMARY_BEGIN_MARK, SUMMARY_END_MARK)
        print(f"wrote the claims summary block of {args.readme}")
    return 0
