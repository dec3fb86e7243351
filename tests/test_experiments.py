"""The experiments end to end in their ``--smoke`` configuration, plus the pieces checked against
independent references (baselines vs their definitions, generated data vs its model)."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from emdloss import Tree
from emdloss_lab.cli import main
from emdloss_lab.data import DataUnavailable, shared_data_dir
from emdloss_lab.experiments import baselines, convergence, hierarchy, ordinal


def _needs_shared_data() -> None:
    try:
        shared_data_dir()
    except DataUnavailable as exc:
        pytest.skip(f"shared data folder not available: {exc}")


def small_tree() -> Tree:
    #        0
    #      /   \
    #     1     2
    #    / \   / \
    #   3   4 5   6      classes 3..6 at the leaves; 4 -> 7 adds a deeper class
    return Tree.from_parents([-1, 0, 0, 1, 1, 2, 2, 4], classes=[3, 5, 6, 7])


# ---------------------------------------------------------------------- baselines


def test_hxe_alpha_zero_is_cross_entropy() -> None:
    tree = small_tree()
    z = torch.randn(7, 4, dtype=torch.float32)
    y = torch.randint(4, (7,))
    got = baselines.HXELoss(tree, alpha=0.0)(z, y)
    assert torch.allclose(got, torch.nn.functional.cross_entropy(z, y), atol=1e-5)


def test_hxe_matches_path_definition() -> None:
    tree = small_tree()
    alpha = 0.7
    z = torch.randn(5, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 3])
    p = torch.softmax(z, 1).numpy()
    anc = baselines.ancestor_matrix(tree)
    parents = np.asarray(tree.parents)
    depth = {0: 0}
    for v in range(1, tree.num_nodes):
        depth[v] = depth[int(parents[v])] + 1
    expected = []
    for i, c in enumerate(y.tolist()):
        v, total = int(tree.classes[c]), 0.0
        while parents[v] >= 0:  # walk the path up: -lambda(v) log P(v | parent v)
            pv, pp = anc[v] @ p[i], anc[int(parents[v])] @ p[i]
            total -= math.exp(-alpha * depth[v]) * math.log(pv / pp)
            v = int(parents[v])
        expected.append(total)
    got = baselines.HXELoss(tree, alpha=alpha)(z, y)
    assert got.item() == pytest.approx(np.mean(expected), rel=1e-5)


def test_soft_labels_definition_and_limits() -> None:
    tree = small_tree()
    d = tree.distance_matrix()
    loss = baselines.SoftLabelLoss(tree, beta=2.0)
    q = np.exp(-2.0 * d) / np.exp(-2.0 * d).sum(1, keepdims=True)
    assert np.allclose(loss.soft.numpy(), q, atol=1e-6)
    z = torch.randn(6, 4)
    y = torch.randint(4, (6,))
    hard = baselines.SoftLabelLoss(tree, beta=200.0)(z, y)
    assert torch.allclose(hard, torch.nn.functional.cross_entropy(z, y), atol=1e-4)


@pytest.mark.parametrize(
    "cls,kw", [(baselines.HXELoss, {"alpha": -1.0}), (baselines.SoftLabelLoss, {"beta": float("nan")})]
)
def test_baselines_reject_bad_arguments(cls, kw) -> None:
    with pytest.raises(ValueError, match=r"alpha|beta"):
        cls(small_tree(), **kw)
    with pytest.raises(TypeError, match="tree"):
        cls("not a tree")


# ---------------------------------------------------------------------- generated hierarchy data


def test_generative_model_distances_follow_the_tree() -> None:
    tree = Tree.from_parents([-1, 0, 0, 1, 1, 2, 2], classes=[3, 4, 5, 6])
    rng = np.random.default_rng(0)
    sq = np.zeros((4, 4))
    reps = 400
    for _ in range(reps):
        mu = hierarchy.class_means(tree, 8, 1.0, rng)
        sq += ((mu[:, None] - mu[None]) ** 2).sum(-1) / reps
    # E|mu_a - mu_b|^2 = sigma^2 * dim * D_tree(a, b)
    assert np.allclose(sq / 8, tree.distance_matrix(), atol=0.25)


# ---------------------------------------------------------------------- experiments end to end


def _run_smoke(name: str, tmp_path, *extra: str, capsys=None) -> dict:
    out = tmp_path / name
    assert main(["experiment", name, "--out", str(out), "--smoke", "--seeds", "2", "--no-progress", *extra]) == 0
    if capsys is not None:  # the command says where it wrote, naming every file
        last = capsys.readouterr().out.rstrip().splitlines()[-1]
        assert last.startswith("wrote report.md, results.json and ") and f" to {out}{os.sep} in " in last
        assert all(
            (out / name).exists() for name in last.split(" to ")[0][len("wrote ") :].replace(" and ", ", ").split(", ")
        )
    report = (out / "report.md").read_text()
    assert report.startswith("#") and "Command:" in report and "±" in report
    assert any(p.suffix == ".png" and p.read_bytes()[:4] == b"\x89PNG" for p in out.iterdir())
    return json.loads((out / "results.json").read_text())


def test_ordinal_smoke(tmp_path, capsys) -> None:
    _needs_shared_data()
    data = _run_smoke("ordinal", tmp_path, capsys=capsys)
    runs = data["results"]["lev"]["emd"]
    assert len(runs) == 2 and all(0 <= r["accuracy"] <= 1 and r["mae"] >= 0 for r in runs)


def test_ordinal_loaders_levels() -> None:
    _needs_shared_data()
    for name, levels in {"wine-red": 6, "wine-white": 7, "era": 9, "lev": 5}.items():
        x, y = ordinal.load(name)
        assert y.min() == 0 and y.max() + 1 == levels and len(x) == len(y)
    x, y = ordinal.load("abalone")
    assert x.shape == (4177, 10) and y.max() == 28


def test_convergence_smoke(tmp_path, capsys) -> None:
    _needs_shared_data()
    data = _run_smoke("convergence", tmp_path, capsys=capsys)
    curves = data["curves"]
    assert "sinkhorn" in curves["tree"]["logits"] and "sinkhorn" not in curves["chain"]["logits"]
    for t in curves:
        for p in curves[t]:
            for loss, cs in curves[t][p].items():
                assert len(cs) == 2 and len(cs[0]) == data["config"]["steps"] + 1
                assert cs[0][-1] < cs[0][0], f"{t}/{p}/{loss} did not reduce the EMD"


def test_convergence_curve_starts_at_exact_emd() -> None:
    ot = pytest.importorskip("ot")
    _needs_shared_data()
    q = convergence.spectra_targets()[:1, ::40]  # 47 bins: small enough for the exact LP
    q = q / q.sum()
    tree = Tree.chain(q.shape[1])
    from emdloss.functional import emd

    u = np.full(q.shape[1], 1.0 / q.shape[1])
    ref = ot.emd2(u, q[0], np.abs(np.arange(q.shape[1])[:, None] - np.arange(q.shape[1])[None]).astype(float))
    got = emd(torch.zeros(1, q.shape[1], dtype=torch.float64), torch.from_numpy(q), tree).item()
    assert got == pytest.approx(ref, rel=1e-9)
    assert convergence.steps_to([1.0, 0.5, 0.04, 0.01], 0.05) == 2
    assert convergence.steps_to([1.0, 0.5], 0.05) is None


def test_hierarchy_smoke(tmp_path, capsys) -> None:
    _needs_shared_data()
    data = _run_smoke("hierarchy", tmp_path, capsys=capsys)
    groups = set(data["results"])
    assert groups == {"imagenet/2", "digits/5"}
    for g in groups:
        assert set(data["results"][g]) == set(hierarchy.LOSSES)
        for runs in data["results"][g].values():
            assert len(runs) == 2 and all(0 <= r["top1"] <= r["top5"] <= 1 for r in runs)


def test_experiment_refuses_existing_checkpoint_without_resume(tmp_path, capsys) -> None:
    _needs_shared_data()
    _run_smoke("ordinal", tmp_path)
    capsys.readouterr()
    argv = ["experiment", "ordinal", "--out", str(tmp_path / "ordinal"), "--smoke", "--seeds", "2", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("emdloss: error: ") and err.count("\n") == 1 and "--resume" in err
    assert main([*argv, "--resume"]) == 0  # a finished run, reported again
