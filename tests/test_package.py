"""Packaging promises: importing emdloss pulls in no optional dependency, none of the lab (emdloss_lab), no
numba before a fused call, and touches no GPU."""

from __future__ import annotations

import subprocess
import sys


def test_import_pulls_no_optional_dependency() -> None:
    code = (
        "import sys, emdloss, emdloss.functional, emdloss.losses, emdloss.metrics, emdloss.hierarchies, emdloss.backends;"
        "bad = [m for m in ('numba', 'scipy', 'matplotlib', 'networkx', 'ot', 'sklearn', 'nltk', 'triton', 'emdloss_lab')"
        " if m in sys.modules];"
        "import torch; assert not torch.cuda.is_initialized(); print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"imported at package import: {out.stdout.strip()}"
