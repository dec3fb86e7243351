"""Test-session setup. Without a CUDA GPU, Triton's kernels run in its interpreter (tests/test_triton.py):
``TRITON_INTERPRET=1`` must be set before anything imports triton (``triton.language`` reads it when it is
imported), so it is set here, before any test module is collected. On a GPU machine it is left unset (the
kernels are compiled; run ``pytest -m cuda``).

Each test process computes on one thread (``torch.set_num_threads(1)``, which the fused kernels follow): the
suite runs as one pytest-xdist worker per core, and with more threads every big batch would also compile the
kernel's parallel twin in the background (about 5 s of a core each). The tests of the parallel path set the
thread count themselves (``tests/test_first_use.py``)."""

from __future__ import annotations

import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

torch.set_num_threads(1)
