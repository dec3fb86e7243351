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
import os
import platform
import random
import shlex
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from emdloss._atomic import atomic_path, write_text

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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | os.PathLike[str], **kwargs: Any) -> None:
    """Save a matplotlib figure atomically (PNG unless the suffix says otherwise) and close it."""
    buf = io.BytesIO()
    fig.savefig(
        buf, format=Path(path).suffix.lstrip(".") or "png", dpi=kwargs.pop("dpi", 120), bbox_inches="tight", **kwargs
    )
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())
    import matplotlib.pyplot as plt

    plt.close(fig)


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

    def __contains__(self, key: str) -> bool:
        return key in self.done

    def __getitem__(self, key: str) -> Any:
        return self.done[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self.done[key] = to_jsonable(value)
        write_json(self.path, {"config_hash": self.hash, "config": self.config, "done": self.done, "time": time.time()})

    def __len__(self) -> int:
        return len(self.done)


# ---------------------------------------------------------------------- reports


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
    """Write ``results.json`` and ``report.md`` (``sections`` joined; the first is :func:`report_header`'s)
    to ``out``, atomically, and print the report without its header."""
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
    )
