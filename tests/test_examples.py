"""The scripts in examples/ run as a user would run them: `python examples/NAME.py`, in a fresh interpreter."""

from __future__ import annotations

import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
ORDINAL = EXAMPLES / "ordinal_plain.py"


def _smoke_env() -> dict[str, str]:
    # One thread each for torch and numba: batches of 64 x 7 gain nothing from more, and on a loaded 2-core CI
    # machine the parallel regions' barriers wait on preempted threads (seconds become minutes). The reference
    # backend spares the fresh interpreter the ~3 s of loading the fused kernels; those have their own tests.
    return {**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1", "EMDLOSS_BACKEND": "torch"}


def test_ordinal_plain_trains_every_loss_above_chance() -> None:
    classes = 7
    done = subprocess.run(
        [sys.executable, str(ORDINAL), "--epochs", "3", "--samples", "800", "--classes", str(classes), "--seed", "0"],
        capture_output=True,
        text=True,
        timeout=300,
        env=_smoke_env(),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {
        m.group(1).strip(): (float(m.group(2)), float(m.group(3)), float(m.group(4)))
        for m in re.finditer(r"^(.+?)\s{2,}([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+[\d.]+$", done.stdout, flags=re.M)
    }
    assert set(rows) == {"cross-entropy", "EMD (rho=1)", "relaxed EMD (rho=2)"}, done.stdout
    chance_acc, chance_mae = 1 / classes, (classes**2 - 1) / (3 * classes)
    for name, (acc, mae, off2) in rows.items():
        # 3 epochs on 800 examples already put every loss well clear of guessing (seed 0: accuracy 0.26-0.36,
        # MAE 1.04-1.11 against chance 0.143 and 2.286); a loss that did not train would sit at chance.
        assert acc > chance_acc + 0.05 and mae < 0.75 * chance_mae, (name, acc, mae, done.stdout)
        assert 0.0 <= off2 <= 1.0
    assert f"chance: accuracy {chance_acc:.3f}, MAE {chance_mae:.3f}" in done.stdout


def test_ordinal_plain_refuses_bad_arguments(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", [str(ORDINAL), "--epochs", "0"])
    with pytest.raises(SystemExit) as info:
        runpy.run_path(str(ORDINAL), run_name="__main__")
    assert info.value.code == 2
    assert "--epochs >= 1" in capsys.readouterr().err
