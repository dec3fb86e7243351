"""`emdloss demo` end to end (small settings) and its data: real sklearn data, no shared/ folder, no network."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from emdloss_lab.cli import main
from emdloss_lab.experiments import demo


def test_chain_task_is_ordered_quantile_classes() -> None:
    task = demo.chain_task(0, 5)
    y = np.concatenate([task["y_train"].numpy(), task["y_test"].numpy()])
    assert y.min() == 0 and y.max() == 4
    counts = np.bincount(task["y_train"].numpy(), minlength=5)
    assert counts.min() >= 0.8 * counts.mean()  # quantile bins of the training split are balanced
    assert task["tree"].is_chain and task["tree"].num_classes == 5


def test_tree_task_small_data_and_clustered_tree() -> None:
    task = demo.tree_task(1, 7)
    assert np.bincount(task["y_train"].numpy()).tolist() == [7] * 10
    assert task["x_train"].shape[0] + task["x_test"].shape[0] == 1797
    tree = task["tree"]
    assert tree.num_classes == 10 and tree.num_nodes > 11  # a real hierarchy, not a star
    d = tree.distance_matrix()
    assert np.allclose(d, d.T) and len(np.unique(np.round(d[np.triu_indices(10, 1)], 9))) > 1


def test_demo_cli_writes_report_plot_and_json(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("EMDLOSS_DATA", str(tmp_path / "no-shared-data"))  # the demo must not need shared/
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--seeds", "2", "--steps", "30", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    for label in demo.LABELS.values():
        assert label in printed
    assert printed.startswith(f"emdloss demo: writing to {out.resolve()}")  # says where, before it starts
    assert "\nConclusion\n" in printed and "In short (2 seeds, 30 steps a run)" in printed
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "results.json").read_text())
    for task in ("chain", "tree"):
        for loss in demo.DEMO_LOSSES:
            runs = data["results"][task][loss]
            assert len(runs) == 2
            assert all(np.isfinite(r["emd"]) and r["emd"] > 0 for r in runs)
    # trained models beat chance on the tree task
    assert np.mean([r["top1"] for r in data["results"]["tree"]["ce"]]) > 0.3
    assert "Command:" in (out / "report.md").read_text()
    assert data["conclusion"] in (out / "report.md").read_text() and data["conclusion"] in printed
    assert data["conclusion"] == demo.conclusion(data["results"], 2, 30)  # drawn from the numbers reported


def _fake_results(chain_mae: dict[str, list[float]], severity: dict[str, list[float]]) -> dict:
    def runs(task: str, loss: str) -> list[dict[str, float]]:
        if task == "chain":
            return [{"mae": m, "qwk": 0.5, "accuracy": 0.3, "emd": 1.0} for m in chain_mae[loss]]
        return [{"mistake_severity": v, "top1": 0.8, "hdist@5": 1.0, "emd": 1.0} for v in severity[loss]]

    return {t: {loss: runs(t, loss) for loss in demo.DEMO_LOSSES} for t in ("chain", "tree")}


def test_conclusion_follows_the_numbers() -> None:
    clear = _fake_results(
        {"ce": [2.0, 2.1, 2.2], "emd": [1.0, 1.1, 1.2], "relaxed": [1.9, 2.0, 2.1]},
        {"ce": [3.0, 3.5, 4.0], "emd": [3.2, 3.6, 4.0], "relaxed": [3.0, 3.3, 3.6]},
    )
    text = demo.conclusion(clear, 3, 200)
    assert "EMD (rho=1) had the smallest mean absolute error, 1.100 ± 0.100 classes against 2.100 ± 0.100" in text
    assert "beyond the spread over seeds on MAE (chain)" in text
    assert (
        "relaxed EMD (rho=2) had the mildest mistakes (mean LCA height of a wrong guess), 3.300 ± 0.300 "
        "against 3.500 ± 0.500 for cross-entropy (a gap within the spread over seeds)" in text
    )
    assert "cross-entropy and EMD (rho=1) tied on top-1 at 0.800" in text

    swapped = _fake_results(
        {"ce": [1.0, 1.1, 1.2], "emd": [2.0, 2.1, 2.2], "relaxed": [1.9, 2.0, 2.1]},
        {"ce": [3.0, 3.1, 3.2], "emd": [3.0, 3.1, 3.2], "relaxed": [3.0, 3.1, 3.2]},
    )
    text = demo.conclusion(swapped, 3, 200)
    assert (
        "cross-entropy had the smallest mean absolute error, 1.100 ± 0.100 classes against 2.000 ± 0.100 for "
        "relaxed EMD (rho=2)" in text
    )
    assert "Cross-entropy led the EMD losses beyond that spread on MAE (chain)" in text

    one_seed = _fake_results({loss: [1.0] for loss in demo.DEMO_LOSSES}, {loss: [2.0] for loss in demo.DEMO_LOSSES})
    assert "With one seed there is no spread" in demo.conclusion(one_seed, 1, 5)


def test_demo_is_reproducible() -> None:
    task = demo.chain_task(0, 4)
    a = demo.run_one(task, "relaxed", 0, 20, 8, 1e-2, 64)
    b = demo.run_one(task, "relaxed", 0, 20, 8, 1e-2, 64)
    assert a == b
