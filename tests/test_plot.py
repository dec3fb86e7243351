"""Pictures render to PNG (Agg), show the right numbers and keep large trees to a legible size."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from _helpers import random_simplex, random_tree, shared_data_or_skip

from emdloss import Tree
from emdloss.functional import emd

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.image  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402

from emdloss import plot  # noqa: E402


def _title_emd(fig) -> float:
    return float(re.search(r"EMD = ([0-9.]+)", fig.axes[0].get_title()).group(1))


def test_tree_flows_png(tmp_path):
    rng = np.random.default_rng(0)
    tree = random_tree(rng, 25, internal_classes=True)
    p = random_simplex(rng, 1, tree.num_classes)[0]
    fig = plot.plot_tree_flows(torch.as_tensor(p), 3, tree)
    out = tmp_path / "flows.png"
    fig.savefig(out, dpi=60)
    img = matplotlib.image.imread(out)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    ref = float(emd(torch.as_tensor(p)[None], torch.tensor([3]), tree, from_logits=False))
    assert _title_emd(fig) == pytest.approx(ref, abs=1e-3)
    # every node is drawn for a small tree: one scatter per node plus the star of the true class
    assert len(fig.axes[0].collections) == tree.num_nodes + 1
    plt.close(fig)


def test_tidy_layout_is_tidy():
    rng = np.random.default_rng(1)
    tree = random_tree(rng, 60)
    pos = plot.tidy_layout(tree)
    assert len(pos) == 60
    xs = [pos[int(c)][0] for c in tree.classes]
    assert len(set(xs)) == len(xs)  # leaves never overlap
    for v, p in enumerate(tree.parents.tolist()):
        if p >= 0:
            assert pos[v][1] == pos[p][1] - 1  # one level per edge
    kids = {}
    for v, p in enumerate(tree.parents.tolist()):
        kids.setdefault(p, []).append(pos[v][0])
    for p, xs_ in kids.items():
        if p >= 0:
            assert min(xs_) <= pos[p][0] <= max(xs_)


def test_large_tree_is_cut_to_the_flows(tmp_path):
    shared_data_or_skip()
    from emdloss_lab.data import imagenet_tree, imagenet_words

    tree = imagenet_tree()
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    logits[[207, 208, 151]] += 5
    probs = logits.softmax(0)
    fig = plot.plot_tree_flows(probs, 207, tree, labels=imagenet_words(), max_nodes=30)
    drawn = len(fig.axes[0].collections) - 1
    assert 20 <= drawn <= 45
    texts = {t.get_text() for t in fig.axes[0].texts}
    assert "golden retriever" in texts and "dog" in texts  # the path of the true class, with WordNet labels
    w, h = fig.get_size_inches()
    assert w <= 24 and h <= 11
    fig.savefig(tmp_path / "imagenet.png", dpi=50)
    plt.close(fig)


def test_select_nodes_is_ancestor_closed():
    rng = np.random.default_rng(2)
    tree = random_tree(rng, 200)
    flow = rng.normal(size=200)
    flow[tree.root] = 0
    mask = plot.select_nodes(tree, flow, keep=[int(tree.classes[0])], max_nodes=25)
    assert mask[tree.classes[0]] and mask[tree.root]
    for v in np.flatnonzero(mask):
        p = tree.parents[v]
        assert p < 0 or mask[p]
    assert mask.sum() < 25 + 20  # one ancestor path may overshoot the budget


def test_chain_cdfs(tmp_path):
    p = torch.tensor([0.05, 0.1, 0.3, 0.35, 0.15, 0.05])
    fig = plot.plot_chain_cdfs(p, 4, class_labels=list("abcdef"), spacing=[1, 1, 2, 1, 1])
    label = next(t.get_text() for t in fig.axes[0].get_legend().get_texts())
    ref = float(emd(p[None], torch.tensor([4]), Tree.chain(6, spacing=[1, 1, 2, 1, 1]), from_logits=False))
    assert float(label.split("=")[-1]) == pytest.approx(ref, abs=1e-3)
    fig.savefig(tmp_path / "chain.png", dpi=60)
    plt.close(fig)


def test_bad_plot_inputs():
    tree = Tree.chain(4)
    with pytest.raises(ValueError, match="probs"):
        plot.plot_tree_flows(torch.tensor([0.5, 0.5]), 0, tree)
    with pytest.raises(ValueError, match="target class 7"):
        plot.plot_tree_flows(torch.full((4,), 0.25), 7, tree)
    with pytest.raises(ValueError, match="spacing"):
        plot.plot_chain_cdfs(torch.full((4,), 0.25), 1, spacing=[1, 1])
