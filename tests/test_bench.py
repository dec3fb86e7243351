"""`emdloss bench` runs end to end on a tiny configuration and writes outputs that parse (no timing asserts)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from emdloss import functional
from emdloss_lab.bench.harness import make_inputs
from emdloss_lab.bench.methods import DenseClosedForm, random_tree
from emdloss_lab.bench.probes import slope
from emdloss_lab.cli import main

TINY = [
    "--quick", "--trees", "chain50", "--batch", "8", "--threads", "1", "--sizes", "64,256", "--rounds", "2",
    "--min-time", "0.001", "--scaling-elements", "1024", "--memory-sizes", "256", "--memory-elements", "65536",
    "--slow-rows", "1",
    "--sinkhorn-iters", "5", "--no-progress",
]  # fmt: skip


@pytest.fixture(scope="module")
def bench_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert main(["bench", "--out", str(out), *TINY]) == 0
    return out


def test_outputs_exist_and_parse(bench_out):
    data = json.loads((bench_out / "bench.json").read_text())
    assert {"config", "machine", "ratios", "scaling", "scaling_summary", "memory"} <= set(data)
    assert data["config"]["quick"] is True
    assert (bench_out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (bench_out / "bench.md").read_text()
    assert "| tree | C | B | target | method | ms fwd+bwd | x CE |" in md
    assert "## Scaling" in md and "## Peak extra memory" in md


def test_ratio_rows_time_the_right_losses(bench_out):
    rows = json.loads((bench_out / "bench.json").read_text())["ratios"]
    assert {(r["tree"], r["target"]) for r in rows} == {("chain50", "hard"), ("chain50", "soft")}
    methods = {r["method"] for r in rows}
    for name in ("cross_entropy", "emd fused rho=1", "emd fused rho=2", "emd torch rho=1", "dense closed form rho=2"):
        assert name in methods
    for r in rows:
        assert "skipped" not in r or not r["skipped"].startswith("failed"), r
        if r["method"] == "cross_entropy":
            assert r["ratio_to_ce"] == 1.0
        if "seconds" in r:
            assert r["seconds"] > 0 and math.isfinite(r["ratio_to_ce"])
        # every exact method computes the EMD the reference backend computes (Sinkhorn is biased: not checked)
        if r["family"] in ("fused", "torch", "dense", "pot_emd2"):
            assert r["rel_diff_vs_reference"] < 1e-5, r
    pot = [r for r in rows if r["family"] == "pot_emd2" and "seconds" in r]
    if pot:  # POT installed: the LP anchor ran on 1 row and was extrapolated to the batch of 8
        assert all(r["extrapolated_from_rows"] == 1 and "extrapolated" in r["note"] for r in pot)


def test_scaling_and_memory_sections(bench_out):
    data = json.loads((bench_out / "bench.json").read_text())
    series = {(r["kind"], r["series"], r["classes"]) for r in data["scaling"]}
    assert series == {
        (k, s, c) for k in ("chain", "random") for s in ("fixed batch", "fixed elements") for c in (64, 256)
    }
    assert all(math.isfinite(s["slope_fixed_batch"]) for s in data["scaling_summary"])
    for probe in data["memory"]:
        if "skipped" in probe:
            pytest.skip(probe["skipped"])
        assert probe["input_bytes"] == probe["batch"] * 256 * 4
        assert set(probe["methods"]) >= {"cross_entropy", "emd fused rho=1", "emd torch rho=1"}


def test_slope_recovers_a_power_law():
    c = [1e3, 1e4, 1e5]
    assert slope(c, [2e-3 * (x / 1e3) ** 1.5 for x in c]) == pytest.approx(1.5)


def test_random_tree_has_the_asked_number_of_leaf_classes():
    tree = random_tree(500, seed=3)
    assert tree.num_classes == 500
    is_leaf = np.ones(tree.num_nodes, dtype=bool)
    is_leaf[tree.parents[tree.parents >= 0]] = False
    assert is_leaf[tree.classes].all()


@pytest.mark.parametrize("rho", [1.0, 2.0, 1.5])
def test_dense_closed_form_matches_reference(rho):
    tree = random_tree(60, seed=1)
    gen = torch.Generator().manual_seed(0)
    for kind in ("hard", "soft"):
        x, t = make_inputs(5, tree.num_classes, kind, gen)
        dense = DenseClosedForm(tree, rho)(x.double().detach(), t.double() if kind == "soft" else t)
        dense = dense.float()
        ref = functional.emd(x.detach(), t, tree, rho=rho, backend="torch")
        assert float(dense) == pytest.approx(float(ref), rel=1e-5)


def test_bad_arguments_are_refused(tmp_path, capsys):
    assert main(["bench", "--out", str(tmp_path), "--trees", "oak12", "--no-progress"]) == 2
    assert "unknown tree 'oak12'" in capsys.readouterr().err
    assert main(["bench", "--out", str(tmp_path), "--sizes", "ten", "--no-progress"]) == 2


def test_device_option_is_checked(tmp_path, capsys):
    """--device takes cpu or a CUDA device, and says so when none is there (no silent CPU run)."""
    assert main(["bench", "--out", str(tmp_path), "--device", "tpu", "--no-progress"]) == 2
    assert "--device must be 'cpu' or a CUDA device" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["bench", "--out", str(tmp_path), "--device", "cuda", "--no-progress"]) == 2
        assert "no CUDA device is available" in capsys.readouterr().err


def test_inputs_are_the_same_numbers_on_any_device():
    a = make_inputs(4, 9, "soft", torch.Generator().manual_seed(3))
    b = make_inputs(4, 9, "soft", torch.Generator().manual_seed(3), device="cpu")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[0].requires_grad and a[0].is_leaf


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_ratios(tmp_path):
    """On a GPU: the ratio workloads run there (CUDA-event times), without the CPU-only fused kernel."""
    tiny = [a for a in TINY if a != "--quick"]
    assert main(["bench", "--out", str(tmp_path), "--device", "cuda", "--no-compile", *tiny]) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    timed = {r["method"]: r for r in result["ratios"] if r["target"] == "hard"}
    assert {"cross_entropy", "emd torch rho=1", "emd torch rho=2"} <= {m for m, r in timed.items() if r.get("seconds")}
    assert not any(m.startswith("emd fused") for m in timed)
    assert result["machine"]["device"] == "cuda" and not result["scaling"] and not result["memory"]
    assert timed["emd torch rho=2"]["rel_diff_vs_reference"] < 1e-5


def test_cold_start_child_reports_the_distance_table_where_the_call_builds_one(capsys):
    """The cold-start probe's child (run here in-process on small trees): first and second call times, plus the
    table time for hard rho = 1 calls, which build the (C, C) distance table; the table shows both kinds of row."""
    from emdloss_lab.bench.first_use import cold_start_child, cold_table

    rows = []
    for kind, target, rho in (("tree", "hard", 1.0), ("chain", "hard", 2.0)):
        cold_start_child(kind, 20, target, rho, 8)
        times = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert all(times[k] >= 0 for k in ("first_s", "first_cpu_s", "second_s"))
        assert ("table_s" in times) == (rho == 1.0)
        rows.append({"tree": kind, "classes": 20, "target": target, "rho": rho, "cold": times, "cached": times})
    lines = cold_table(rows).splitlines()
    assert all(line.count("|") == 9 for line in lines)
    assert lines[2].rstrip("|").split("|")[-1].strip() == f"{rows[0]['cold']['table_s']:.2f}"
    assert lines[3].rstrip("|").split("|")[-1].strip() == ""
