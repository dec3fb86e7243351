"""The training protocol (validation split, equal tuning budgets, early stopping), the paired bootstrap against
scipy, the collapse diagnostics, `emdloss report` (records, pending notes, the generated block) and units run in
worker processes."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from emdloss import EMDLoss, Tree
from emdloss_lab.cli import main
from emdloss_lab.experiments import runner, training

# ---------------------------------------------------------------------- paired bootstrap


def test_paired_bootstrap_matches_scipy_percentile() -> None:
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    a = rng.normal(1.0, 1.0, 12)
    b = a - rng.normal(0.3, 0.5, 12)
    mean, lo, hi = runner.paired_bootstrap(a, b, n_resamples=10_000, seed=1)
    ref = stats.bootstrap(
        (a - b,), np.mean, method="percentile", n_resamples=10_000, confidence_level=0.95, random_state=2
    ).confidence_interval
    assert mean == pytest.approx(float(np.mean(a - b)), rel=1e-12)
    width = ref.high - ref.low
    assert lo == pytest.approx(ref.low, abs=0.06 * width) and hi == pytest.approx(ref.high, abs=0.06 * width)


def test_paired_bootstrap_known_cases() -> None:
    # identical differences: every resample has the same mean, the interval is a point
    assert runner.paired_bootstrap([3.0, 4.0, 5.0], [1.0, 2.0, 3.0]) == (2.0, 2.0, 2.0)
    # two pairs, differences 0 and 1: resampled means are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4
    mean, lo, hi = runner.paired_bootstrap([0.0, 1.0], [0.0, 0.0], n_resamples=20_000)
    assert (mean, lo, hi) == (0.5, 0.0, 1.0)
    # NaN pairs are dropped; nothing left gives NaNs
    assert runner.paired_bootstrap([1.0, math.nan], [0.0, 0.0])[:1] == (1.0,)
    assert all(math.isnan(v) for v in runner.paired_bootstrap([math.nan], [0.0]))


def test_verdicts() -> None:
    assert runner.verdict((-2.0, -3.0, -1.0), "lower") == "supported"
    assert runner.verdict((2.0, 1.0, 3.0), "lower") == "refuted"
    assert runner.verdict((0.1, -1.0, 1.0), "higher") == "inconclusive"
    assert runner.verdict((0.1, 0.05, 0.2), "higher") == "supported"


# ---------------------------------------------------------------------- protocol pieces


def test_validation_split_is_stratified_and_disjoint() -> None:
    y = np.repeat(np.arange(6), [1, 2, 5, 10, 20, 3])
    tr, va = training.validation_split(y, 0.2, seed=0)
    assert np.intersect1d(tr, va).size == 0 and np.union1d(tr, va).size == y.size
    for c, n in enumerate([1, 2, 5, 10, 20, 3]):
        nv = int((y[va] == c).sum())
        assert nv == (0 if n == 1 else min(n - 1, max(1, round(0.2 * n))))
        assert (y[tr] == c).sum() >= 1  # never absent from training
    assert np.array_equal(training.validation_split(y, 0.2, seed=0)[1], va)  # seeded
    with pytest.raises(ValueError, match="fraction"):
        training.validation_split(y, 1.0, seed=0)


def test_tuning_budget_is_equal_and_spans_the_ranges() -> None:
    budget, lr_range = 8, (1e-3, 1e-1)
    for loss in training.LOSSES:
        trials = training.tuning_trials(loss, budget, lr_range, seed=3)
        assert len(trials) == budget
        lrs = np.sort(np.log10([t["lr"] for t in trials]))
        # one learning rate in each of the 8 equal strata of [-3, -1]
        assert np.array_equal(np.floor((lrs + 3) / 0.25).astype(int), np.arange(8))
        if loss in training.HYPER:
            grid = training.HYPER[loss][1]
            hps = [t["hp"] for t in trials]
            assert set(hps) <= set(grid) and len(set(hps)) == min(budget, len(grid))
        else:
            assert all(t["hp"] is None for t in trials)


def test_early_stopping_keeps_the_best_epoch_and_stops_after_patience() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 3)
    x, y = torch.randn(32, 2), torch.randint(3, (32,))
    scores = iter([0.1, 0.5, 0.4, 0.3, 0.2, 0.9, 0.95])  # epoch 0 (untrained), 1, 2, ...
    snapshots = []

    def score(z: torch.Tensor, t: torch.Tensor) -> float:
        snapshots.append(model.weight.detach().clone())
        return next(scores)

    info = training.train_epochs(
        model,
        torch.nn.functional.cross_entropy,
        x,
        y,
        x,
        y,
        lr=0.1,
        batch_size=8,
        max_epochs=20,
        patience=3,
        seed=0,
        score=score,
    )
    assert info == {"best_epoch": 1, "epochs": 4, "val_score": 0.5}  # 0.9 at epoch 5 is never reached
    assert torch.equal(model.weight, snapshots[1]) and not torch.equal(snapshots[1], snapshots[4])


def test_fit_tuned_returns_the_best_validation_trial() -> None:
    torch.manual_seed(0)
    x = torch.randn(120, 4)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    protocol = {"val_fraction": 0.25, "budget": 3, "lr_range": [1e-4, 1e-1], "batch": 32, "max_epochs": 4}
    model, info = training.fit_tuned(
        lambda: torch.nn.Linear(4, 3),
        lambda hp: training.make_loss("ce", Tree.chain(3), hp),
        "ce",
        x,
        y,
        protocol={**protocol, "patience": 2},
        seed=0,
        score=lambda z, t: float((z.argmax(1) == t).double().mean()),
    )
    assert len(info["trials"]) == 3
    assert info["val_score"] == max(t["val_score"] for t in info["trials"])
    _, va = training.validation_split(y, 0.25, 0)
    with torch.no_grad():
        assert float((model(x[va]).argmax(1) == y[va]).double().mean()) == pytest.approx(info["val_score"])


def test_collapse_diagnostics() -> None:
    tree = Tree.from_parents([-1, 0, 0, 2, 2], classes=[1, 3, 4])  # class 0 at depth 1, classes 1, 2 at depth 2
    d = training.collapse_diagnostics(torch.tensor([0, 0, 2, 0]), tree)
    assert d == {"distinct_pred": 2.0, "pred_depth": pytest.approx((1 + 1 + 2 + 1) / 4)}


def test_tree_metrics_lca_and_path_by_hand() -> None:
    tree = Tree.from_parents([-1, 0, 0, 1, 1, 2, 2], classes=[3, 4, 5, 6])
    logits = torch.tensor([[5.0, 4, 3, 2], [0, 5, 4, 3], [1, 2, 5, 3]])  # predicts 0, 1, 2
    y = torch.tensor([1, 1, 3])  # mistakes: 0 vs 1 (siblings), 2 vs 3 (siblings)
    m = training.tree_metrics(logits, y, tree)
    assert m["top1"] == pytest.approx(1 / 3)
    assert m["lca_height"] == 1.0 and m["mistake_path"] == 2.0  # sibling: LCA one level up, path 2 edges
    # top-5 here is all 4 classes: LCA heights to the truth average (0+1+2+2)/4 for every row
    assert m["hdist@5"] == pytest.approx(1.25) and m["hdist_path@5"] == pytest.approx(2.5)
    assert m["distinct_pred"] == 3.0


# ---------------------------------------------------------------------- emdloss report


def _fake_convergence_run(folder, seeds: int) -> None:
    from emdloss_lab.experiments import convergence

    cfg = runner.to_jsonable(convergence.configuration(False, False, seeds))
    summary = {}
    for t in cfg["tasks"]:
        for p in cfg["params"]:
            for o in cfg["optimizers"]:
                for loss in convergence.LOSSES:
                    fast = loss == "rho2"
                    summary[f"{t}/{p}/{o}/{loss}"] = {
                        "lr": 0.1,
                        "steps_to": {
                            str(th): [10 if fast else 20 + s for s in range(seeds)] for th in (0.5, 0.1, 0.05, 0.01)
                        },
                        "log_auc": [-1.0 if fast else -0.5] * seeds,
                        "final_relative_emd": [0.01] * seeds,
                        "seconds": [1.0] * seeds,
                    }
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"config": cfg, "results": summary}))
    (folder / "provenance.json").write_text(json.dumps(runner.provenance(cfg)))


def test_report_pending_then_generated_from_a_record(tmp_path, capsys) -> None:
    results, md = tmp_path / "results", tmp_path / "results.md"
    md.write_text("# Results\n\nhand-written text\n")
    assert main(["report", "--results", str(results), "--write", str(md)]) == 0
    text = md.read_text()
    assert text.startswith("# Results\n\nhand-written text\n") and runner.BEGIN_MARK in text
    assert text.count("**Pending") == len(runner.RECORDED) and "supported" not in text

    _fake_convergence_run(tmp_path / "small", seeds=2)  # too few seeds: recorded, but not as a full run
    assert main(["report", "--add", str(tmp_path / "small"), "--results", str(results)]) == 0
    assert (results / "convergence-partial.json").exists()
    _fake_convergence_run(tmp_path / "full", seeds=5)
    assert main(["report", "--add", str(tmp_path / "full"), "--results", str(results), "--write", str(md)]) == 0
    record = json.loads((results / "convergence.json").read_text())
    assert record["full"] and "commit" in record["provenance"]["git"] and record["provenance"]["versions"]["torch"]
    if (Path(__file__).resolve().parents[1] / ".git").exists():  # an unpacked sdist has no commit to record
        assert record["provenance"]["git"]["commit"]
    text = md.read_text()
    assert (
        text.count(runner.BEGIN_MARK) == 1 and text.count("**Pending") == len(runner.RECORDED) - 1
    )  # regenerated in place
    d = runner.paired_bootstrap([10] * 5, [20, 21, 22, 23, 24])  # rho=2 - rho=1 steps, paired by seed
    assert d[0] == -12.0 and d[2] < 0
    assert f"| chain, logits, gd | -12.0 [{d[1]:+.1f}, {d[2]:+.1f}] | -0.500 [-0.500, -0.500] | supported |" in text
    assert "hand-written text" in text
    capsys.readouterr()
    assert main(["report", "--add", str(tmp_path / "nothing-here"), "--results", str(results)]) == 2
    assert "no readable results.json" in capsys.readouterr().err


def test_provenance_names_the_code_the_units_were_computed_with(tmp_path, monkeypatch) -> None:
    """A checkout that moves on while a run computes (or between its sessions) must not be what the record names."""
    start, later = {"commit": "a" * 40, "dirty": False}, {"commit": "b" * 40, "dirty": True}
    monkeypatch.setattr(runner, "git_state", lambda: start)
    config = {"experiment": "convergence", "seeds": 1}
    ckpt = runner.Checkpoint(tmp_path, config)
    ckpt["unit/0"] = {"x": 1}
    monkeypatch.setattr(runner, "git_state", lambda: later)
    runner.publish(tmp_path, {"config": config, "results": {}}, ["# header", "body"])
    prov = json.loads((tmp_path / "provenance.json").read_text())
    assert prov["computed_with"] == [start] and prov["git"] == later

    resumed = runner.Checkpoint(tmp_path, config)  # a second session under the new code
    resumed["unit/1"] = {"x": 2}
    runner.publish(tmp_path, {"config": config, "results": {}}, ["# header", "body"])
    prov = json.loads((tmp_path / "provenance.json").read_text())
    assert prov["computed_with"] == [start, later]
    assert runner._commit_text(prov["computed_with"][1]) == "b" * 12 + " (working tree modified)"


def test_ordinal_verdicts_compare_each_emd_loss_to_cross_entropy_in_pairs() -> None:
    from emdloss_lab.experiments import ordinal

    def runs(acc: list[float], mae: list[float]) -> list[dict[str, float]]:
        return [{"accuracy": a, "mae": m} for a, m in zip(acc, mae)]

    ce = runs([0.5] * 5, [1.0] * 5)
    results = {
        "lev": {
            "ce": ce,
            "emd": runs([0.6, 0.61, 0.62, 0.63, 0.64], [1.2, 1.3, 1.2, 1.3, 1.25]),  # better accuracy, worse MAE
            "relaxed": runs([0.4, 0.6, 0.45, 0.55, 0.5], [1.0, 1.0, 1.0, 1.0, 1.0]),  # both within noise
        }
    }
    text = ordinal.verdicts({"config": {"datasets": ["lev"], "seeds": 5}, "results": results})
    emd_row = next(line for line in text.splitlines() if line.startswith("| lev, emd "))
    relaxed_row = next(line for line in text.splitlines() if line.startswith("| lev, relaxed "))
    assert (
        emd_row.count("better") == 1
        and emd_row.count("worse") == 1
        and emd_row.index("better") < emd_row.index("worse")
    )
    assert relaxed_row.count("inconclusive") == 2
    assert "ce+relaxed" not in text  # not run: no row


def test_report_writes_the_readme_claims_summary_from_the_records(tmp_path) -> None:
    results, readme = tmp_path / "results", tmp_path / "README.md"
    readme.write_text(f"# Project\n\n{runner.SUMMARY_BEGIN_MARK}\nold text\n{runner.SUMMARY_END_MARK}\n\n## Tests\n")
    _fake_convergence_run(tmp_path / "full", seeds=5)
    args = ["report", "--add", str(tmp_path / "full"), "--results", str(results), "--readme", str(readme)]
    assert main(args) == 0
    text = readme.read_text()
    assert "old text" not in text and text.endswith("## Tests\n") and text.count(runner.SUMMARY_BEGIN_MARK) == 1
    line = next(x for x in text.splitlines() if x.startswith("- **convergence**"))
    assert "5 seeds" in line and "supported in 12, refuted in 0, inconclusive in 0 of 12 settings" in line
    assert all(f"- **{name}: pending.**" in text for name in runner.RECORDED if name != "convergence")


def _seeded_unit(group: str, k: int, loss: str, seed: int) -> dict[str, Any]:
    """A unit as the experiments compute one: seeded from the unit, then a few fused-kernel training steps."""
    runner.seed_everything(seed * 1000 + k)
    tree = Tree.chain(20)
    x = torch.randn(16, 20, requires_grad=True)
    y = torch.randint(0, 20, (16,))
    value = EMDLoss(tree, rho=2.0 if loss == "relaxed" else 1.0)(x, y)
    value.backward()
    return {"loss": value.item(), "grad": x.grad.abs().sum().item(), "group": group}


def _units() -> list[tuple[str, int, str, int]]:
    return [(g, k, loss, s) for s in range(2) for g in ("a", "b") for k in (5, 7) for loss in ("emd", "relaxed")]


def test_run_units_in_workers_gives_the_results_and_checkpoint_of_one_process(tmp_path) -> None:
    config = {"experiment": "workers", "seeds": 2}
    one = runner.run_units(runner.Checkpoint(tmp_path / "one", config), _units(), _seeded_unit, "t", False)
    many = runner.run_units(runner.Checkpoint(tmp_path / "many", config), _units(), _seeded_unit, "t", False, 3)
    assert many == one
    assert list(many) == ["a/5", "a/7", "b/5", "b/7"] and len(many["a/5"]["emd"]) == 2  # units' order, not finish order
    assert runner.Checkpoint(tmp_path / "many", config).done == runner.Checkpoint(tmp_path / "one", config).done


def test_run_units_in_workers_computes_only_what_the_checkpoint_lacks_in_other_processes(tmp_path) -> None:
    ckpt = runner.Checkpoint(tmp_path, {"experiment": "workers"})
    ckpt["a/5/emd/0"] = "from an earlier session"
    units = [("a", 5, "emd", 0), ("a", 5, "emd", 1), ("a", 5, "emd", 2)]
    results = runner.run_units(ckpt, units, lambda *unit: os.getpid(), "t", False, 2)
    first, *computed = results["a/5"]["emd"]
    assert first == "from an earlier session"
    assert all(isinstance(pid, int) and pid != os.getpid() for pid in computed)


def test_run_units_in_workers_stops_with_a_units_error(tmp_path) -> None:
    def compute(group: str, k: int, loss: str, seed: int) -> int:
        if seed == 1:
            raise ValueError(f"unit {seed} failed")
        return seed

    units = [("a", 5, "emd", s) for s in range(3)]
    with pytest.raises(ValueError, match="unit 1 failed"):
        runner.run_units(runner.Checkpoint(tmp_path, {"experiment": "workers"}), units, compute, "t", False, 2)


_SLOW_UNITS_SCRIPT = """
import os, sys, time
from emdloss_lab.experiments import runner

def compute(*unit):
    os.write(1, f"{os.getpid()}\\n".encode())  # one write: two workers' lines never interleave
    time.sleep(60)

try:
    units = [("a", 1, "x", s) for s in range(4)]
    runner.run_units(runner.Checkpoint(sys.argv[1], {"experiment": "t"}), units, compute, "t", False, 2)
except KeyboardInterrupt:
    print("interrupted", flush=True)
"""


def test_sigterm_stops_the_workers_with_the_run_quietly(tmp_path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_UNITS_SCRIPT, str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    workers = {int(proc.stdout.readline()) for _ in range(2)}  # both workers are inside a unit
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert "interrupted" in out and "Traceback" not in err, err
    for pid in workers:  # terminated with the pool, not left to finish their units
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
