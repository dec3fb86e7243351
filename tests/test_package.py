"""Packaging promises: importing emdloss pulls in no optional dependency, none of the lab (emdloss_lab), no
numba before a fused call, and touches no GPU."""

from __future__ import annotations

import subprocess
import sys


def test_import_pulls_no_optional_dependency() -> None:
    code = (
        "import sys, emdloss, emdloss.functional, emdloss.losses, emdloss.metrics, emdloss.hierarchies,"
        " emdloss.backends;"
        "bad = [m for m in ('numba', 'scipy', 'matplotlib', 'networkx', 'ot', 'sklearn', 'nltk', 'triton',"
        " 'emdloss_lab') if m in sys.modules];"
        "import torch; assert not torch.cuda.is_initialized(); print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"imported at package import: {out.stdout.strip()}"


def test_submodules_are_attributes_without_a_heavier_import():
    """emdloss.metrics / .hierarchies / .plot resolve on first use (PEP 562); `import emdloss` alone loads none of
    them, nor numba, matplotlib, scipy, networkx or the lab."""
    code = (
        "import sys, emdloss\n"
        "heavy = ('numba', 'matplotlib', 'scipy', 'networkx', 'emdloss_lab')\n"
        "lazy = ('emdloss.metrics', 'emdloss.hierarchies', 'emdloss.plot')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy or m in lazy))\n"
        "listed = lambda names: sorted(set(lazy) - {'emdloss.' + n for n in names})\n"
        "print(listed(dir(emdloss)), listed(emdloss.__all__))\n"
        "print([getattr(emdloss, m.split('.')[1]) is sys.modules[m] for m in lazy])\n"
        "try:\n    emdloss.no_such_thing\nexcept AttributeError as exc:\n    print(exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert done.stdout.splitlines() == [
        "[]",
        "[] []",
        "[True, True, True]",
        "module 'emdloss' has no attribute 'no_such_thing'",
    ], done.stdout + done.stderr
