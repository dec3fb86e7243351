"""The experiments end to end in their ``--smoke`` configuration (with the provenance every results.json
records), plus the pieces checked against independent references (generated data vs its model, the
convergence curves' start vs the exact LP)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from emdloss import Tree
from emdloss_lab.cli import main
from emdloss_lab.data import DataUnavailable, shared_data_dir
from emdloss_lab.experiments import convergence, hierarchy, ordinal


def _needs_shared_data() -> None:
    try:
        shared_data_dir()
    except DataUnavailable as exc:
        pytest.skip(f"shared data folder not available: {exc}")


# The baselines against their definitions: tests/test_baselines.py; the protocol: tests/test_protocol.py.


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
        assert last.startswith("wrote report.md, results.json") and f" to {out}{os.sep} in " in last
        assert all(
            (out / name).exists() for name in last.split(" to ")[0][len("wrote ") :].replace(" and ", ", ").split(", ")
        )
    report = (out / "report.md").read_text()
    assert report.startswith("#") and "Command:" in report and "±" in report
    assert any(p.suffix == ".png" and p.read_bytes()[:4] == b"\x89PNG" for p in out.iterdir())
    data = json.loads((out / "results.json").read_text())
    prov = json.loads((out / "provenance.json").read_text())  # traceability: what produced these numbers
    assert prov["config"] == data["config"] and prov["versions"]["torch"] == torch.__version__
    assert set(prov["git"]) == {"commit", "dirty"} and prov["command"] and prov["utc"]
    assert '"commit"' in report and "Code:" in report
    return data


def test_ordinal_smoke(tmp_path, capsys) -> None:
    _needs_shared_data()
    data = _run_smoke("ordinal", tmp_path, capsys=capsys)
    assert set(data["results"]["lev"]) == set(data["config"]["losses"]) >= {"ce", "emd", "relaxed", "ce+relaxed"}
    for runs in data["results"]["lev"].values():
        assert len(runs) == 2 and all(0 <= r["accuracy"] <= 1 and r["mae"] >= 0 for r in runs)
        assert all(r["chosen"]["epochs"] <= data["config"]["protocol"]["max_epochs"] for r in runs)
    assert not ordinal.is_full(data["config"])
    report = (tmp_path / "ordinal" / "report.md").read_text()
    assert "| relaxed - ce |" in report  # paired differences to cross-entropy


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
    cfg = data["config"]
    combos = {
        f"{t}/{p}/{o}/{loss}"
        for t in cfg["tasks"]
        for p in cfg["params"]
        for o in cfg["optimizers"]
        for loss in convergence.LOSSES
    }
    assert set(data["curves"]) == combos == set(data["results"]) == set(data["chosen_lr"])
    assert cfg["optimizers"] == ["gd", "momentum", "adam"] and cfg["losses"] == ["rho1", "rho1.25", "rho1.5", "rho2"]
    for key, cs in data["curves"].items():
        o = key.split("/")[2]
        assert data["chosen_lr"][key] in cfg["lr_grids"][o]  # tuned per loss on held-out targets
        assert len(cs) == 2 and len(cs[0]) == cfg["steps"] + 1
        if o == "adam":  # (a rate tuned on other targets over 8 steps may not transfer under plain GD)
            assert cs[0][-1] < cs[0][0], f"{key} did not reduce the EMD"
    assert set(data["results"]["tree/logits/gd/rho2"]["steps_to"]) == {"0.5", "0.1", "0.05", "0.01"}


def test_convergence_tuning_targets_are_held_out() -> None:
    _needs_shared_data()
    _, tune = convergence.make_task("chain", 4, 0, tune=True)
    _, evaluated = convergence.make_task("chain", 50, 0)
    assert not any(torch.equal(a, b) for a in tune for b in evaluated)
    assert convergence.log_auc([1.0, 0.1, 0.01]) == pytest.approx(-1.5)
    assert convergence.log_auc([1.0, 0.5, float("nan")]) == float("inf")


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
        for loss, runs in data["results"][g].items():
            assert len(runs) == 2 and all(0 <= r["top1"] <= r["top5"] <= 1 for r in runs)
            assert all(r["distinct_pred"] >= 1 and r["pred_depth"] > 0 for r in runs)
            hps = [r["chosen"]["hp"] for r in runs]
            assert all(h is None for h in hps) if loss in ("ce", "emd", "relaxed") else all(h is not None for h in hps)
    assert not hierarchy.is_full(data["config"]) and hierarchy.is_full(hierarchy.configuration(False, 5))


def test_experiment_refuses_existing_checkpoint_without_resume(tmp_path, capsys) -> None:
    _needs_shared_data()
    _run_smoke("ordinal", tmp_path)
    capsys.readouterr()
    argv = ["experiment", "ordinal", "--out", str(tmp_path / "ordinal"), "--smoke", "--seeds", "2", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("emdloss: error: ") and err.count("\n") == 1 and "--resume" in err
    assert main([*argv, "--resume"]) == 0  # a finished run, reported again
