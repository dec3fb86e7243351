"""Test-session setup. Without a CUDA GPU, Triton's kernels run in its interpreter (tests/test_triton.py):
``TRITON_INTERPRET=1`` must be set before anything imports triton (``triton.language`` reads it when it is
imported), so it is set here, before any test module is collected. On a GPU machine it is left unset (the
kernels are compiled; run ``pytest -m cuda``)."""

from __future__ import annotations

import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
