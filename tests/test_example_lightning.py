"""examples/lightning_hierarchy.py runs as a user would run it (a fresh interpreter): it trains with EMDLoss in
Lightning, logs the emdloss.metrics torchmetrics objects with self.log / self.log_dict, and ends above chance."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "lightning_hierarchy.py"
HAVE_LIGHTNING = any(importlib.util.find_spec(m) is not None for m in ("lightning", "pytorch_lightning"))
HAVE_TORCHMETRICS = importlib.util.find_spec("torchmetrics") is not None

pytestmark = [
    pytest.mark.skipif(not SCRIPT.exists(), reason="examples/ is not beside the tests"),
    pytest.mark.skipif(not HAVE_LIGHTNING, reason="Lightning is not installed: pip install pytorch-lightning"),
    pytest.mark.skipif(not HAVE_TORCHMETRICS, reason="torchmetrics is not installed: pip install 'emdloss[metrics]'"),
]


@pytest.mark.slow  # a fresh interpreter importing torch and Lightning: ~10 s on 2 cores, most of it imports
def test_lightning_example_logs_the_metrics_and_learns() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--epochs", "2", "--samples", "1000", "--seed", "0"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    logged = {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\S+/\S+)\s+([\d.]+)$", done.stdout, flags=re.M)}
    expected = {"top1", "top5", "severity_lca", "severity_path", "hdist_lca@5", "hdist_path@5", "emd", "count"}
    assert {f"val/{k}" for k in expected} | {"train/loss", "train/severity_lca"} <= set(logged), done.stdout
    assert logged["val/count"] == 1000.0  # every validation example, once per epoch (compute + reset)
    chance = re.search(r"chance: top1 ([\d.]+), severity_lca ([\d.]+)", done.stdout)
    assert chance, done.stdout
    # 2 epochs on 1,000 examples: far above guessing (1/27) and milder mistakes than a random wrong guess
    assert logged["val/top1"] > 3 * float(chance.group(1))
    assert logged["val/severity_lca"] < float(chance.group(2))
    # unit edges: a path is up and down again, so path length = 2 x LCA height for leaves at one level
    assert logged["val/severity_path"] == pytest.approx(2 * logged["val/severity_lca"], rel=1e-3)
    assert "metric states in the checkpoint: 0" in done.stdout
