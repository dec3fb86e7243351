"""No lost work: an experiment killed mid-run (SIGKILL) and started again with ``--resume`` ends with exactly the
results of an uninterrupted run; a corrupt or mismatched checkpoint stops with a clear one-line error (exit status
2; the CheckpointError itself under --debug)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from emdloss_lab.cli import main
from emdloss_lab.data import DataUnavailable, shared_data_dir
from emdloss_lab.experiments.runner import CHECKPOINT_NAME, CheckpointError

SEEDS = "4"  # ordinal --smoke: 1 dataset x 4 losses x 4 seeds = 16 units


@pytest.fixture(autouse=True)
def _shared_data() -> None:
    try:
        shared_data_dir()
    except DataUnavailable as exc:
        pytest.skip(f"shared data folder not available: {exc}")


def _cmd(out) -> list[str]:
    return [
        sys.executable,
        "-m",
        "emdloss",
        "experiment",
        "ordinal",
        "--out",
        str(out),
        "--smoke",
        "--seeds",
        SEEDS,
        "--no-progress",
    ]


def _done(out) -> int:
    try:
        return len(json.loads((out / CHECKPOINT_NAME).read_text())["done"])
    except (OSError, ValueError, KeyError):
        return 0


@pytest.mark.slow  # 16 s: a real run killed with SIGKILL and resumed; the default suite keeps the quicker checks
def test_sigkill_then_resume_equals_uninterrupted(tmp_path) -> None:
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(_cmd(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while _done(killed) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed; make the configuration longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_before = _done(killed)
    assert 3 <= n_before < 16 and not (killed / "results.json").exists()

    resumed = subprocess.run([*_cmd(killed), "--resume"], env=env, capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr
    ok = subprocess.run(_cmd(clean), env=env, capture_output=True, text=True, timeout=180)
    assert ok.returncode == 0, ok.stderr
    a = json.loads((killed / "results.json").read_text())
    b = json.loads((clean / "results.json").read_text())
    assert a == b


def test_corrupt_checkpoint_is_a_clear_error(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / CHECKPOINT_NAME).write_text("{ not json")
    argv = ["experiment", "ordinal", "--out", str(out), "--smoke", "--seeds", "1", "--resume", "--no-progress"]
    assert main(argv) == 2
    assert "corrupt" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="corrupt"):
        main(["--debug", *argv])


def test_mismatched_checkpoint_is_a_clear_error(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["experiment", "ordinal", "--out", str(out), "--smoke", "--seeds", "1", "--no-progress"]) == 0
    capsys.readouterr()
    argv = ["experiment", "ordinal", "--out", str(out), "--smoke", "--seeds", "2", "--resume", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("emdloss: error: ") and "different configuration (seeds 1 -> 2)" in err
    with pytest.raises(CheckpointError, match="different configuration"):
        main(["--debug", *argv])
