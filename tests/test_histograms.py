"""``emdloss experiment histograms``: the smoke run through the command line, the tuning rule read back from its
checkpoint, the targets against their definitions, and the splits."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")

from _helpers import shared_data_or_skip

from emdloss import Tree
from emdloss_lab.cli import main
from emdloss_lab.experiments import convergence, histograms


def test_histograms_smoke_and_the_learning_rate_is_chosen_on_validation(tmp_path, capsys) -> None:
    shared_data_or_skip()
    out = tmp_path / "histograms"
    assert main(["experiment", "histograms", "--out", str(out), "--smoke", "--seeds", "2", "--no-progress"]) == 0
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith("wrote report.md, results.json")
    for name in ("report.md", "results.json", "provenance.json", "histograms.png"):
        assert (out / name).exists(), name
    data = json.loads((out / "results.json").read_text())
    cfg = data["config"]
    assert set(data["results"]) == {
        f"{t}/{o}/{loss}" for t in histograms.TASKS for o in cfg["optimizers"] for loss in cfg["losses"]
    }
    done = json.loads((out / "checkpoint.json").read_text())["done"]
    points = cfg["steps"] // cfg["eval_every"] + 1
    for key, entry in data["results"].items():
        t, o, loss = key.split("/")
        for s in range(2):
            trials = {lr: done[f"{t}/{o}/{loss}/{s}/{lr:.6g}"] for lr in cfg["lr_grids"][o]}
            areas = {lr: histograms.log_area(r["val"]) for lr, r in trials.items()}
            best = min(areas.values())
            assert entry["lr"][s] in [lr for lr, a in areas.items() if a == best]
            run = trials[entry["lr"][s]]
            assert entry["test_curve"][s] == run["test"] and len(run["test"]) == len(run["val"]) == points
            stop = int(np.nanargmin(run["val"]))
            assert entry["stop_step"][s] == stop * cfg["eval_every"] and entry["test_emd"][s] == run["test"][stop]
            assert entry["reference"][s] <= np.nanmin(run["test"])
    report = (out / "report.md").read_text()
    assert "Claim 1 verdicts on a learning task" in report and all(f"## {t}, adam" in report for t in histograms.TASKS)
    assert "settings" in histograms.claim_summary(data)
    assert not histograms.is_full(cfg) and histograms.is_full(histograms.configuration(False, False, 5))


def test_chain_label_distributions_are_discretised_gaussians() -> None:
    q = histograms.chain_label_distributions(np.array([0, 3, 9]), 10, sigma=2.0)
    assert q.shape == (3, 10) and np.allclose(q.sum(1), 1.0)
    assert list(q.argmax(1)) == [0, 3, 9]
    assert q[1, 4] / q[1, 3] == pytest.approx(math.exp(-1 / 8)) and q[1, 5] / q[1, 3] == pytest.approx(math.exp(-4 / 8))


def test_tree_histograms_follow_hop_distances() -> None:
    tree = Tree.from_parents([-1, 0, 0, 1, 1, 2, 2], classes=[3, 4, 5, 6])  # unit edges: lengths are hops
    q = convergence.tree_histograms(tree, np.array([0, 2]), tau=0.5)
    d = tree.distance_matrix()
    expected = np.exp(-d[[0, 2]] / 0.5)
    assert np.allclose(q, expected / expected.sum(1, keepdims=True))


def test_gap_and_area_rules() -> None:
    curve = [10.0, 6.0, 3.0, 2.2, 2.05]
    assert convergence.steps_to(curve, 0.4, 2.0) == 2  # 6.0 leaves 4 of the gap of 8, 3.0 leaves 1
    assert convergence.steps_to(curve, 0.05, 2.0) == 3 and convergence.steps_to(curve, 0.001, 2.0) is None
    assert histograms.log_area([10.0, 1.0, 0.1]) == pytest.approx(-0.5)
    assert histograms.log_area([1.0, 0.5, float("nan")]) == math.inf and histograms.log_area([1.0, 11.0]) == math.inf


def test_splits_are_disjoint_and_fixed_by_the_seed() -> None:
    shared_data_or_skip()
    cfg = histograms.configuration(False, True, 2)
    for t in histograms.TASKS:
        a = histograms._make_task.__wrapped__(t, 0, json.dumps(cfg["tasks"][t], sort_keys=True), cfg["val_fraction"])
        b = histograms.make_task(t, 0, cfg)
        assert all(torch.equal(a[k], b[k]) for k in a if k != "tree")
        rows = {s: {tuple(r) for r in a[f"x_{s}"].tolist()} for s in ("train", "val", "test")}
        assert not rows["train"] & rows["test"] and not rows["train"] & rows["val"] and not rows["val"] & rows["test"]
        assert all(
            torch.allclose(a[f"q_{s}"].sum(1), torch.ones(1, dtype=torch.float64)) for s in ("train", "val", "test")
        )
        other = histograms.make_task(t, 1, cfg)
        assert not torch.equal(other["x_test"], a["x_test"])
