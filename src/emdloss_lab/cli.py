"""The ``emdloss`` command. Each subcommand lives in its own module with ``add_arguments`` and ``run``.

    emdloss demo                          the main job: train on a real chain task and a real tree task
    emdloss bench [--quick] --out DIR     speed against cross-entropy and exact/entropic OT solvers
    emdloss experiment NAME --out DIR     a reproducible experiment (see `emdloss experiment --help`)
    emdloss train-imagenet --root DIR     ImageNet in the paper's small-data regime (needs the images)
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

#: subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("emdloss_lab.experiments.demo", "train CE, EMD and relaxed EMD on a real chain and a real tree task"),
    "bench": ("emdloss_lab.bench.speed", "time the losses against cross-entropy and OT solvers"),
    "train-imagenet": ("emdloss_lab.experiments.imagenet", "train on ImageNet (small-data regime) with any loss"),
}

#: experiment name -> (module, one-line help)
EXPERIMENTS: dict[str, tuple[str, str]] = {
    "convergence": ("emdloss_lab.experiments.convergence", "relaxed vs exact EMD: steps to fit target histograms"),
    "ordinal": ("emdloss_lab.experiments.ordinal", "ordinal classification on real tables (chains)"),
    "hierarchy": ("emdloss_lab.experiments.hierarchy", "hierarchical classification, small-data regime (trees)"),
    "sinkhorn": ("emdloss_lab.experiments.sinkhorn_study", "Sinkhorn's bias, stability, gradients and cost vs exact EMD"),
}


def _add(sub: argparse._SubParsersAction, name: str, module: str, help_text: str) -> None:
    parser = sub.add_parser(name, help=help_text, description=help_text)
    parser.set_defaults(_module=module)
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("emdloss"):
            parser.set_defaults(_missing=f"'{name}' is not available in this version of emdloss")
            return
        parser.set_defaults(_missing=f"'{name}' needs the optional dependency {exc.name!r}: pip install 'emdloss[cli]'")
        return
    mod.add_arguments(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emdloss", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        _add(sub, name, module, help_text)
    exp = sub.add_parser("experiment", help="run a reproducible experiment", description="run a reproducible experiment")
    exp_sub = exp.add_subparsers(dest="experiment", metavar="NAME")
    for name, (module, help_text) in EXPERIMENTS.items():
        _add(exp_sub, name, module, help_text)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_missing", None):
        print(f"emdloss: {args._missing}", file=sys.stderr)
        return 2
    if not getattr(args, "_module", None):
        parser.print_help()
        return 2
    module = importlib.import_module(args._module)
    return int(module.run(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
