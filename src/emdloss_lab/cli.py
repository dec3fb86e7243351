"""The ``emdloss`` command. Each subcommand lives in its own module with ``add_arguments`` and ``run``.

:func:`main` parses the command line and runs the subcommand. A :class:`~emdloss_lab.errors.UsageError` (a
mistake the user can fix: an output folder holding another run, changed options under ``--resume``, missing
data, a bad ``--root``) is printed as one line, ``emdloss: error: MESSAGE``, and exits with status 2; the
traceback is shown only with ``emdloss --debug`` (or for genuine bugs, which are not caught).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import textwrap
from collections.abc import Sequence

from .errors import UsageError

DESCRIPTION = "Train and compare Earth Mover's Distance losses on class hierarchies (trees) and ordered classes."

EPILOG = """\
examples:
  emdloss demo                      CE, EMD and relaxed EMD on real data, about
                                    a minute; writes ./emdloss-demo/
  emdloss experiment ordinal --quick --out runs/ordinal
  emdloss bench --quick --out bench-out
  emdloss COMMAND --help            a command's options, with their defaults

data:
  The experiments and the benchmark read real data files (PROVENANCE.md and
  the hierarchies/, ordinal/ and spectra/ folders it describes) from a shared
  data folder: set EMDLOSS_DATA to that folder, or run from a checkout that
  has shared/data beside it. The demo needs none of it.
"""

#: subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("emdloss_lab.experiments.demo", "train CE, EMD and relaxed EMD on a real chain and a real tree task"),
    "bench": ("emdloss_lab.bench.speed", "time the losses against cross-entropy and OT solvers"),
    "train-imagenet": ("emdloss_lab.experiments.imagenet", "train on ImageNet (small-data regime) with any loss"),
    "report": ("emdloss_lab.experiments.runner", "record experiment results; generate docs/results.md's tables"),
}

#: experiment name -> (module, one-line help)
EXPERIMENTS: dict[str, tuple[str, str]] = {
    "convergence": ("emdloss_lab.experiments.convergence", "relaxed vs exact EMD: steps to fit target histograms"),
    "ordinal": ("emdloss_lab.experiments.ordinal", "ordinal classification on real tables (chains)"),
    "hierarchy": ("emdloss_lab.experiments.hierarchy", "hierarchical classification, small-data regime (trees)"),
    "proxy": ("emdloss_lab.experiments.proxy", "small-data proxy: generated images on the ImageNet tree, CNN"),
    "histograms": ("emdloss_lab.experiments.histograms", "relaxed vs exact EMD: learning histograms, test split"),
    "sinkhorn": (
        "emdloss_lab.experiments.sinkhorn_study",
        "Sinkhorn's bias, stability, gradients and cost vs exact EMD",
    ),
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written, and every option's default appended to its help (as
    ``argparse.ArgumentDefaultsHelpFormatter``), except where the help already states it or there is nothing to
    show (flags, ``None`` defaults whose meaning the help explains)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            not action.option_strings
            or default is None
            or isinstance(default, bool)
            or default is argparse.SUPPRESS
            or "%(default)" in text
            or "default" in text.lower()
        ):
            return text
        return f"{text} (default: %(default)s)"


def _add_debug(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument(
        "--debug",
        action="store_true",
        default=default,
        help="show the full Python traceback of an error instead of a one-line message",
    )


def _add(sub: argparse._SubParsersAction, name: str, module: str, help_text: str) -> None:
    """Subcommand ``name`` from ``module`` (its ``add_arguments``, and its ``DESCRIPTION`` for ``--help`` if any)."""
    try:
        mod, missing = importlib.import_module(module), None
    except ModuleNotFoundError as exc:
        mod = None
        if exc.name and exc.name.startswith("emdloss"):
            missing = f"'{name}' is not available in this version of emdloss"
        else:
            missing = f"'{name}' needs the optional dependency {exc.name!r}: pip install 'emdloss[cli]'"
    description = getattr(mod, "DESCRIPTION", None)
    description = textwrap.fill(description, 79) if description else help_text
    parser = sub.add_parser(name, help=help_text, description=description, formatter_class=HelpFormatter)
    parser.set_defaults(_module=module)
    _add_debug(parser, argparse.SUPPRESS)  # `emdloss demo --debug` works too, without overriding `emdloss --debug`
    if mod is None:
        parser.set_defaults(_missing=missing)
        return
    mod.add_arguments(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emdloss", description=DESCRIPTION, epilog=EPILOG, formatter_class=HelpFormatter
    )
    _add_debug(parser, False)
    parser.set_defaults(_parser=parser)
    sub = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        _add(sub, name, module, help_text)
    exp_help = "run a reproducible experiment (results.json, report.md and plots in --out; resumable)"
    exp = sub.add_parser(
        "experiment",
        help=exp_help,
        description=exp_help,
        formatter_class=HelpFormatter,
        epilog="Every experiment takes --out DIR, --quick, --smoke, --seeds K, --resume and\n"
        "--no-progress: see `emdloss experiment NAME --help`.",
    )
    exp.set_defaults(_parser=exp)
    _add_debug(exp, argparse.SUPPRESS)
    exp_sub = exp.add_subparsers(dest="experiment", title="experiments", metavar="NAME")
    for name, (module, help_text) in EXPERIMENTS.items():
        _add(exp_sub, name, module, help_text)
    return parser


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or exc.__class__.__name__


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_missing", None):
        print(f"emdloss: error: {args._missing}", file=sys.stderr)
        return 2
    if not getattr(args, "_module", None):  # `emdloss` or `emdloss experiment` alone
        args._parser.print_help(sys.stderr)
        return 2
    try:
        module = importlib.import_module(args._module)
        return int(module.run(args) or 0)
    except UsageError as exc:
        if args.debug:
            raise
        _end_progress_bars()
        print(f"emdloss: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        _end_progress_bars()
        again = "; run the same command with --resume to continue" if hasattr(args, "resume") else ""
        print(f"emdloss: interrupted{again}", file=sys.stderr)
        return 130


def _end_progress_bars() -> None:
    """A bar an error interrupted would otherwise leave the message on its line."""
    try:
        from .experiments.runner import end_progress_bars
    except ImportError:  # pragma: no cover - torch/numpy missing: no bars either
        return
    end_progress_bars()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
