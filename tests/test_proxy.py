"""``emdloss experiment proxy``: the smoke run through the command line, and the renderer's two promises (frozen
for a seed; classes close in the tree give close images)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")

from _helpers import shared_data_or_skip

from emdloss import Tree
from emdloss_lab.cli import main
from emdloss_lab.experiments import proxy


def test_proxy_smoke(tmp_path, capsys) -> None:
    shared_data_or_skip()
    out = tmp_path / "proxy"
    argv = ["experiment", "proxy", "--out", str(out), "--smoke", "--seeds", "2", "--no-progress"]
    assert main(argv) == 0
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith("wrote report.md, results.json")
    names = ("report.md", "results.json", "provenance.json", "proxy_sweep.png", "proxy_pareto.png", "proxy_samples.png")
    for name in names:
        assert (out / name).exists(), name
    data = json.loads((out / "results.json").read_text())
    k = data["config"]["control_per_class"]
    assert {f"shuffled/{k}", f"mismatched/{k}", f"linear/{k}"} <= set(data["results"])
    for group in ("imagenet", "shuffled", "mismatched"):
        by_loss = data["results"][f"{group}/{k}"]
        assert set(by_loss) == set(proxy.LOSSES)
        assert all(len(runs) == 2 and all(0 <= r["top1"] <= r["top5"] <= 1 for r in runs) for runs in by_loss.values())
    report = (out / "report.md").read_text()
    assert report.startswith("#") and "Command:" in report and "Claim 2 verdicts" in report
    assert "labels shuffled" in report and "generator on a random tree" in report and "linear on pixels" in report
    assert all(f"| {loss} " in report for loss in proxy.LOSSES)
    assert "imagenet better in" in proxy.claim_summary(data) and "mismatched" in proxy.claim_summary(data)
    assert not proxy.is_full(data["config"]) and proxy.is_full(proxy.configuration(False, 5))


def test_restrict_tree_keeps_distances() -> None:
    tree = Tree.from_parents([-1, 0, 0, 1, 1, 2, 2, 6, 6], classes=[3, 4, 5, 7, 8])
    sub = proxy.restrict_tree(tree, np.array([4, 0, 2]))
    full = tree.distance_matrix()[np.ix_([4, 0, 2], [4, 0, 2])]
    assert sub.num_classes == 3 and sub.num_nodes == 7
    assert np.allclose(sub.distance_matrix(), full)


def test_renderer_is_frozen_and_follows_the_tree() -> None:
    shared_data_or_skip()
    cfg = proxy.configuration(False, 5, smoke=True)
    cfg["classes"] = 40
    torch.manual_seed(123)  # the generator must not depend on the global torch state
    a = proxy.make_task("imagenet", 10, 3, cfg)
    torch.manual_seed(7)
    b = proxy.make_task("imagenet", 10, 3, cfg)
    assert torch.equal(a["x_train"], b["x_train"]) and torch.equal(a["x_test"], b["x_test"])
    assert all(not p.requires_grad for p in proxy.Generator(24, seed=0).parameters())
    other = proxy.make_task("imagenet", 10, 4, cfg)
    assert not torch.equal(a["x_train"], other["x_train"])

    def tree_pixel_correlation(group: str, seed: int) -> float:
        """Correlation over class pairs of the tree distance and the distance of the class-mean images."""
        task = proxy.make_task(group, 40, seed, cfg)
        c = task["tree"].num_classes
        means = task["x_train"].view(c, 40, -1).mean(1).double()
        iu = np.triu_indices(c, 1)
        return float(np.corrcoef(task["tree"].distance_matrix()[iu], torch.cdist(means, means).numpy()[iu])[0, 1])

    # classes closer in the tree give closer images on average (seeds 0-2: 0.24, 0.29, 0.05 at 40 classes), and
    # not once the labels are shuffled over the leaves (-0.07, 0.10, -0.08)
    matched = np.mean([tree_pixel_correlation("imagenet", s) for s in range(3)])
    shuffled = np.mean([tree_pixel_correlation("shuffled", s) for s in range(3)])
    assert matched > 0.1 and matched > shuffled + 0.1
