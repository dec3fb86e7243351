"""The Triton backend (backend="triton") equals the reference closed form (backend="torch", float64): values and
gradients on random trees (classes on internal nodes, zero-length edges), chains, the ImageNet tree, class and
node counts around the kernel's block size, hard and soft targets, rho 1 / 1.5 / 2, logits and probabilities,
ignore_index (all rows ignored too), spatial inputs, float16 / bfloat16, and through torch.compile.

Without a GPU the kernel runs in Triton's interpreter (numpy on CPU tensors): tests/conftest.py sets
``TRITON_INTERPRET=1`` before anything imports triton, unless CUDA is present (then the kernel is compiled for
the GPU and the interpreted tests skip). Interpreted rows cost ~30 ms each, so the
cases are a few rows on small trees; the multi-chunk scans are exercised by lowering the block size.

Tests marked ``cuda`` need a real GPU (``pytest -m cuda`` with TRITON_INTERPRET unset; benchmarks/gpu_check.sh)
and compare the compiled kernel with the reference there; they time nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from _helpers import random_simplex, random_tree, shared_data_or_skip

from emdloss import EMDLoss, Tree, backends
from emdloss.backends.triton_gpu import TritonBackend, tree_arrays
from emdloss.functional import emd

pytest.importorskip("triton", reason="triton is not installed (pip install emdloss[gpu], or the test extra)")

interpreted = pytest.mark.skipif(
    not backends.get("triton").interpreted(),
    reason="the Triton kernel is compiled, not interpreted, in this process (TRITON_INTERPRET unset, or set after "
    "triton was imported; tests/conftest.py sets it on machines without CUDA)",
)
cuda = pytest.mark.cuda
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def small_block(monkeypatch):
    """A 16-wide block, so that trees of a few dozen nodes take the multi-chunk path of every scan."""
    from emdloss.backends import triton_kernels

    monkeypatch.setattr(triton_kernels, "MAX_BLOCK", 16)
    return 16


def some_tree(seed: int, num_nodes: int = 30) -> Tree:
    """A random tree with classes on internal nodes and one zero-length edge."""
    return random_tree(np.random.default_rng(seed), num_nodes, internal_classes=True)


def make_inputs(tree: Tree, target: str, rows: int, seed: int, from_logits: bool = True, shape_tail=()):
    gen = torch.Generator().manual_seed(seed)
    c = tree.num_classes
    if from_logits:
        x = 2.0 * torch.randn(rows, c, *shape_tail, generator=gen, dtype=torch.float64)
    else:
        x = torch.from_numpy(random_simplex(np.random.default_rng(seed), rows, c, sparsity=0.3))
    if target == "hard":
        t = torch.randint(0, c, (rows, *shape_tail), generator=gen)
    else:
        t = torch.from_numpy(random_simplex(np.random.default_rng(seed + 1), rows, c, sparsity=0.3))
        if shape_tail:
            t = torch.softmax(torch.randn(rows, c, *shape_tail, generator=gen, dtype=torch.float64), 1)
    return x, t


def compare(tree: Tree, x: torch.Tensor, t: torch.Tensor, rho: float, dtype=torch.float32, *, from_logits=True,
            ignore_index=-100, reduction="none", rtol=None, upstream=True, device="cpu"):  # fmt: skip
    """Triton on ``x`` cast to ``dtype`` against the float64 reference on the same (rounded) values."""
    xd = x.to(dtype).to(device).requires_grad_()
    td = t.to(dtype).to(device) if t.dtype.is_floating_point else t.to(device)
    kw = {"rho": rho, "from_logits": from_logits, "ignore_index": ignore_index, "reduction": reduction}
    got = emd(xd, td, tree, backend="triton", **kw)
    assert got.dtype == dtype
    xr = xd.detach().cpu().double().requires_grad_()
    want = emd(xr, t.double() if t.dtype.is_floating_point else t, tree, backend="torch", **kw)
    if upstream and reduction == "none":  # a non-uniform incoming gradient: backward must scale by it
        w = torch.linspace(0.5, 2.0, got.numel(), dtype=torch.float64).reshape(got.shape)
        (got * w.to(dtype).to(device)).sum().backward()
        (want * w).sum().backward()
    else:
        got.sum().backward()
        want.sum().backward()
    eps = torch.finfo(dtype).eps if dtype != torch.float64 else 1e-12
    tol = rtol if rtol is not None else 8 * eps
    scale = float(want.detach().abs().max()) or 1.0
    torch.testing.assert_close(got.detach().cpu().double(), want.detach(), rtol=tol, atol=tol * scale)
    gscale = float(xr.grad.abs().max()) or 1.0
    torch.testing.assert_close(xd.grad.cpu().double(), xr.grad, rtol=0, atol=8 * eps * gscale)
    return got, xd.grad


# ---------------------------------------------------------------------- interpreter: exactness


@interpreted
@pytest.mark.parametrize("rho", [1.0, 1.5, 2.0])
@pytest.mark.parametrize("target", ["hard", "soft"])
def test_random_trees_internal_classes_zero_edges(target, rho, small_block):
    tree = some_tree(seed=int(rho * 10) + (target == "soft"))
    assert (tree.weights == 0).any() and (np.isin(tree.classes, tree.parents)).any()  # the corner cases are in
    x, t = make_inputs(tree, target, rows=3, seed=1)
    compare(tree, x, t, rho)


@interpreted
@pytest.mark.parametrize("target", ["hard", "soft"])
def test_probabilities_in_float64(target, small_block):
    """from_logits=False, float64 throughout: the gradient is dL/dp itself; float64 agrees to ~1e-12."""
    tree = some_tree(seed=5)
    x, t = make_inputs(tree, target, rows=3, seed=2, from_logits=False)
    compare(tree, x, t, 2.0, torch.float64, from_logits=False, rtol=1e-10)


@interpreted
@pytest.mark.parametrize("n", [15, 16, 17, 31, 32, 33])
def test_chains_around_the_block_size(n, small_block):
    """Nodes n (+1 for the prefix sum's total) on both sides of one and two 16-wide chunks."""
    tree = Tree.chain(n, spacing=np.random.default_rng(n).uniform(0.2, 2.0, n - 1))
    x, t = make_inputs(tree, "hard" if n % 2 else "soft", rows=2, seed=n)
    compare(tree, x, t, 1.0 if n % 3 else 2.0)


@interpreted
@pytest.mark.parametrize("n", [1023, 1025])
def test_chains_around_the_default_block(n):
    """The default 1024-wide block: one chunk and two (1,025 nodes + the total)."""
    tree = Tree.chain(n)
    x, t = make_inputs(tree, "hard", rows=1, seed=n)
    compare(tree, x, t, 2.0)


@interpreted
@pytest.mark.parametrize("target", ["hard", "soft"])
def test_imagenet_tree(target):
    shared_data_or_skip()
    from emdloss_lab.data import imagenet_tree

    tree = imagenet_tree()
    x, t = make_inputs(tree, target, rows=2, seed=7)
    compare(tree, x, t, 1.0 if target == "hard" else 2.0)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_accumulate_in_float32(dtype, small_block):
    """Half inputs are read as they are and computed in float32: the loss is the float64 reference of the same
    rounded logits up to the loss's own rounding to ``dtype``."""
    tree = some_tree(seed=11)
    for target in ("hard", "soft"):
        x, t = make_inputs(tree, target, rows=2, seed=3)
        compare(tree, x, t, 1.5, dtype)


@interpreted
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ignore_index_and_reductions(reduction, small_block):
    tree = some_tree(seed=13)
    x, t = make_inputs(tree, "hard", rows=4, seed=4)
    t[[0, 2]] = -1  # ignore_index = -1 is also the kernel's "no class here" marker: it must not collide
    _, grad = compare(tree, x, t, 2.0, ignore_index=-1, reduction=reduction)
    assert grad[[0, 2]].eq(0).all() and grad[[1, 3]].ne(0).any()


@interpreted
def test_all_rows_ignored(small_block):
    tree = some_tree(seed=17)
    x, _ = make_inputs(tree, "hard", rows=3, seed=5)
    x.requires_grad_()
    t = torch.full((3,), -100)
    rows = emd(x.float(), t, tree, backend="triton", reduction="none")
    assert rows.eq(0).all()
    xf = x.detach().float().requires_grad_()
    mean = emd(xf, t, tree, backend="triton", reduction="mean")
    mean.backward()
    assert torch.isnan(mean) and xf.grad.eq(0).all()  # as the reference: mean over no rows is NaN, gradient 0


@interpreted
def test_spatial_inputs(small_block):
    """(N, C, d1) logits with (N, d1) labels, ignored pixels included, and (N, C, d1) soft targets."""
    tree = some_tree(seed=19)
    x, t = make_inputs(tree, "hard", rows=2, seed=6, shape_tail=(2,))
    t[0, 1] = -100
    got, _ = compare(tree, x, t, 2.0)
    assert got.shape == (2, 2) and got[0, 1] == 0
    x, t = make_inputs(tree, "soft", rows=1, seed=6, shape_tail=(3,))
    compare(tree, x, t, 1.0, reduction="sum")


@interpreted
def test_non_contiguous_inputs(small_block):
    """Transposed logits and soft targets, every other label of a longer tensor: read through their strides."""
    tree = some_tree(seed=21)
    x, t = make_inputs(tree, "soft", rows=2, seed=8)
    x, t = x.T.contiguous().T, t.T.contiguous().T
    assert not x.is_contiguous() and not t.is_contiguous()
    compare(tree, x, t, 2.0, torch.float64, rtol=1e-10)  # float64: no cast, so no contiguous copy on the way
    x, t = make_inputs(tree, "hard", rows=4, seed=9)
    compare(tree, x.T.contiguous().T[::2], t[::2], 1.0, torch.float64, rtol=1e-10)


@interpreted
def test_out_of_range_label_without_validation_is_an_error_not_a_read(small_block):
    """validate=False skips the label check; the kernel reads no class outside [0, C) and gives the row a NaN
    loss, which the finite-loss check turns into the same message as on the other backends."""
    tree = some_tree(seed=23)
    x, _ = make_inputs(tree, "hard", rows=2, seed=7)
    t = torch.tensor([0, tree.num_classes + 5])
    with pytest.raises(ValueError, match="outside"):
        emd(x.float(), t, tree, backend="triton", validate=False)


@interpreted
def test_empty_batch():
    tree = Tree.chain(5)
    x = torch.zeros(0, 5, requires_grad=True)
    out = emd(x, torch.zeros(0, dtype=torch.long), tree, backend="triton", reduction="sum")
    out.backward()
    assert out == 0 and x.grad.shape == (0, 5)


# ---------------------------------------------------------------------- interpreter: the PyTorch stack


@pytest.mark.slow
@interpreted
def test_torch_compile_traces_through_the_custom_op():
    """fullgraph=True: no graph break at the kernel (a custom operator with a fake implementation), and
    AOTAutograd uses its registered backward. aot_eager, so that no C++ compiler is needed (inductor's CPU
    codegen takes a minute here; it runs in the cuda test). Slow: ~5 s of tracing on 2 cores."""
    tree = Tree.chain(9)
    x, t = make_inputs(tree, "hard", rows=3, seed=8)
    xf = x.float().requires_grad_()
    fn = torch.compile(EMDLoss(tree, rho=2.0, backend="triton", validate=False), fullgraph=True, backend="aot_eager")
    got = fn(xf, t)
    got.backward()
    xr = x.clone().requires_grad_()
    want = emd(xr, t, tree, rho=2.0, backend="torch")
    want.backward()
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(xf.grad.double(), xr.grad, rtol=0, atol=1e-6)


def _op_args(tree: Tree, x: torch.Tensor, labels: torch.Tensor, need_grad: bool) -> tuple:
    from emdloss.backends.triton_gpu import TritonTreeTensors

    tt = TritonTreeTensors.cached(tree, x.device)
    arrays = (tt.node_class, tt.node_end, tt.node_w, tt.class_pos, tt.end_order, tt.ended)
    return (x, labels, None, *arrays, 2.0, True, -100, need_grad)


@interpreted
def test_the_custom_operator_equals_the_eager_path(small_block):
    """Graph tracing takes the operator ``emdloss::triton_tree_rows``, eager calls a plain autograd Function
    around the same launch: same losses, and the operator's registered backward gives the same gradient."""
    tree = some_tree(seed=43)
    x, t = make_inputs(tree, "hard", rows=3, seed=12)
    t[1] = -100
    xf = x.float().requires_grad_()
    eager = emd(xf, t, tree, rho=2.0, backend="triton", reduction="none")
    (eager * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    xo = x.float().requires_grad_()
    loss, grad = torch.ops.emdloss.triton_tree_rows(*_op_args(tree, xo, t, True))
    assert grad.shape == xo.shape and not grad.requires_grad
    (loss * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    torch.testing.assert_close(loss.detach(), eager.detach(), rtol=0, atol=0)
    torch.testing.assert_close(xo.grad, xf.grad, rtol=0, atol=0)
    no_grad = torch.ops.emdloss.triton_tree_rows(*_op_args(tree, x.float(), t, False))
    assert no_grad[1].shape == (0, tree.num_classes)


@pytest.mark.slow
@interpreted
def test_opcheck_of_the_custom_operator():
    """torch.library.opcheck: schema, fake implementation (shapes and dtypes), autograd registration and AOT
    dispatch agree with the real kernel. Slow: ~4 s of tracing."""
    tree = Tree.chain(7)
    x = torch.randn(3, 7, requires_grad=True)
    torch.library.opcheck(
        torch.ops.emdloss.triton_tree_rows.default, _op_args(tree, x, torch.tensor([0, 6, -100]), True)
    )


@interpreted
def test_autocast_leaves_the_dtype_of_the_logits(small_block):
    """Under autocast the model's bfloat16 logits go in as they are; the loss comes back in their dtype, equal
    to the reference's on the same logits."""
    tree = some_tree(seed=29)
    gen = torch.Generator().manual_seed(9)
    layer = torch.nn.Linear(4, tree.num_classes)
    feats = torch.randn(3, 4, generator=gen)
    t = torch.randint(0, tree.num_classes, (3,), generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer(feats)
        got = emd(logits, t, tree, backend="triton")
        want = emd(logits, t, tree, backend="torch")
    assert logits.dtype == got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=0)


@interpreted
def test_no_second_derivatives(small_block):
    tree = some_tree(seed=31)
    x, t = make_inputs(tree, "hard", rows=2, seed=10)
    xf = x.float().requires_grad_()
    loss = emd(xf, t, tree, backend="triton")
    with pytest.raises(RuntimeError, match="backend='torch'"):
        torch.autograd.grad(loss, xf, create_graph=True)


@interpreted
def test_contract_of_the_registry():
    """The registry's contract test, on this backend (tests/test_architecture.py skips it without the
    interpreter)."""
    import test_architecture

    for target_kind in ("hard", "soft"):
        test_architecture.test_every_backend_returns_per_row_losses_with_ignored_rows_zero("triton", target_kind)


# ---------------------------------------------------------------------- choice and errors (no kernel runs)


def test_auto_never_picks_it_for_cpu_tensors_and_soft_targets_with_grad_go_elsewhere():
    from emdloss._inputs import normalise

    x = torch.randn(2, 4)
    batch = normalise(x, torch.tensor([0, 1]), 4, from_logits=True, ignore_index=-100, validate=True,
                      reduction="mean")  # fmt: skip
    backend = backends.get("triton")
    assert backend.auto_skips(batch) is not None
    with torch.no_grad():  # outside numba's reach too (compile would be slow): numba or torch, never triton
        assert backends.select("auto", batch).name in ("numba", "torch")
    soft = torch.softmax(torch.randn(2, 4), 1).requires_grad_()
    batch = normalise(x, soft, 4, from_logits=True, ignore_index=-100, validate=True, reduction="mean")
    assert "target that requires grad" in (backend.cannot_run(batch) or "")


def test_missing_triton_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton now raises ImportError
    reason = TritonBackend().unavailable()
    assert reason is not None and "pip install 'emdloss[gpu]'" in reason


def test_cpu_tensors_without_the_interpreter_are_a_clear_error(monkeypatch):
    monkeypatch.setattr(TritonBackend, "interpreted", lambda self: False)
    with pytest.raises(
        ValueError, match=r"backend='triton' cannot run this call: .*backend='numba' or backend='torch'"
    ):
        emd(torch.randn(2, 4), torch.tensor([0, 3]), Tree.chain(4), backend="triton")


@pytest.mark.slow
def test_import_leaves_triton_alone_and_cpu_without_interpreter_is_a_clear_error():
    """In a fresh process without TRITON_INTERPRET: ``import emdloss`` and a CPU loss with backend='auto' never
    import triton; backend='triton' on a CPU tensor is a ValueError naming the CPU backends. Slow: a fresh
    interpreter importing torch takes a few seconds."""
    code = (
        "import sys, torch, emdloss\n"
        "assert 'triton' not in sys.modules, 'import emdloss imported triton'\n"
        "tree = emdloss.Tree.chain(4)\n"
        "x = torch.randn(2, 4, requires_grad=True)\n"
        "emdloss.functional.emd(x, torch.tensor([0, 3]), tree).backward()\n"
        "assert 'triton' not in sys.modules, 'a CPU loss imported triton'\n"
        "try:\n"
        "    emdloss.functional.emd(x, torch.tensor([0, 3]), tree, backend='triton')\n"
        "except ValueError as exc:\n"
        "    print(exc)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "backend='triton' cannot run this call" in out.stdout and "backend='numba'" in out.stdout


def test_tree_arrays_describe_the_dfs_intervals():
    """The kernel's arrays against a direct reading of the tree: ended[j] counts edges whose interval closed at
    or before position j, and end_order lists them by closing position."""
    tree = some_tree(seed=37, num_nodes=25)
    a = tree_arrays(tree)
    n = tree.num_nodes
    assert a["node_class"][a["class_pos"]].tolist() == list(range(tree.num_classes))
    assert (a["node_end"] > np.arange(n)).all() and a["node_end"][0] == n and a["node_w"][0] == 0
    ends = a["node_end"][a["end_order"]]
    assert (np.diff(ends) >= 0).all() and (ends < n).all()
    for j in range(n):
        assert a["ended"][j] == np.count_nonzero(a["node_end"] <= j)


# ---------------------------------------------------------------------- a real GPU


@cuda
@needs_cuda
@pytest.mark.parametrize("rho", [1.0, 1.5, 2.0])
@pytest.mark.parametrize("target", ["hard", "soft"])
def test_cuda_agrees_with_the_reference(target, rho):
    trees = [Tree.chain(1000), some_tree(seed=41, num_nodes=3000), Tree.chain(5000)]
    try:
        shared_data_or_skip()
        from emdloss_lab.data import imagenet_tree

        trees.append(imagenet_tree())
    except pytest.skip.Exception:
        pass
    for i, tree in enumerate(trees):
        x, t = make_inputs(tree, target, rows=64, seed=i)
        if target == "hard":
            t[::7] = -100
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            compare(tree, x, t, rho, dtype, device="cuda")


@cuda
@needs_cuda
def test_cuda_auto_picks_triton_and_large_trees_run():
    tree = Tree.chain(10**6)
    x, t = make_inputs(tree, "hard", rows=4, seed=0)
    from emdloss._inputs import normalise

    batch = normalise(x.cuda(), t.cuda(), tree.num_classes, from_logits=True, ignore_index=-100, validate=False,
                      reduction="mean")  # fmt: skip
    assert backends.select("auto", batch).name == "triton"
    compare(tree, x, t, 1.0, device="cuda", rtol=1e-5)
    big = random_tree(np.random.default_rng(0), 10**5, internal_classes=True)
    x, t = make_inputs(big, "soft", rows=8, seed=1)
    compare(big, x, t, 2.0, device="cuda", rtol=1e-5)


@cuda
@needs_cuda
def test_cuda_spatial_and_torch_compile_inductor():
    tree = Tree.chain(300)
    x, t = make_inputs(tree, "hard", rows=4, seed=2, shape_tail=(5,))
    compare(tree, x, t, 2.0, device="cuda")
    xc = x.float().cuda().requires_grad_()
    fn = torch.compile(EMDLoss(tree, rho=2.0, backend="triton", validate=False), fullgraph=True)
    got = fn(xc, t.cuda())
    got.backward()
    xr = x.clone().requires_grad_()
    want = emd(xr, t, tree, rho=2.0, backend="torch")
    want.backward()
    torch.testing.assert_close(got.double().cpu(), want.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(xc.grad.double().cpu(), xr.grad, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------- the bench's triton rows


@interpreted
def test_bench_triton_rows_run_under_the_interpreter():
    """``emdloss bench --triton`` on the CPU (interpreted: a smoke run of the code path a GPU run takes, no
    timing claim): the triton rows are timed and equal the reference."""
    import argparse

    from emdloss_lab.bench.harness import Config
    from emdloss_lab.bench.probes import run_workload
    from emdloss_lab.bench.speed import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--out", "unused", "--triton", "--trees", "chain8", "--batch", "2", "--rounds", "1",
                              "--min-time", "0", "--no-compile", "--no-slow"])  # fmt: skip
    cfg = Config.from_args(args)
    assert cfg.triton
    rows = run_workload("chain8", Tree.chain(8), "soft", 2, cfg, compile_ok=False, dense_ok=False, anchors=False,
                        gen=torch.Generator().manual_seed(0), progress=lambda _: None)  # fmt: skip
    triton_rows = [r for r in rows if r["family"] == "triton"]
    assert [r["method"] for r in triton_rows] == ["emd triton rho=1", "emd triton rho=2"]
    for r in triton_rows:
        assert r["seconds"] > 0 and r["rel_diff_vs_reference"] < 1e-6 and "interpreter" in r["note"], r


@interpreted
def test_heavy_edge_above_every_class_adds_nothing():
    """As tests/test_reliability.py checks for the CPU backends: a 1e9 edge above all classes weighs 0, so the
    loss equals the one without it exactly, in float32 too."""
    heavy = Tree.from_parents([-1, 0, 1, 1, 2, 2], weights=[0, 1e9, 1, 2, 0.5, 0.25], classes=[3, 4, 5])
    light = Tree.from_parents([-1, 0, 1, 1, 2, 2], weights=[0, 0, 1, 2, 0.5, 0.25], classes=[3, 4, 5])
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, generator=gen)
    for target in (torch.tensor([0, 2, 1]), torch.softmax(torch.randn(3, 3, generator=gen), 1)):
        a = emd(x, target, heavy, backend="triton", reduction="none")
        b = emd(x, target, light, backend="triton", reduction="none")
        assert torch.equal(a, b)


_AOT_COMPILE = """
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from emdloss.backends import triton_kernels as K

CONST = ("FROM_LOGITS", "SOFT", "RHO_KIND", "NEED_GRAD", "PT", "BLOCK")
def signature(x):
    kinds = {"x_ptr": x, "soft_ptr": x, "labels_ptr": "*i64", "loss_ptr": "*fp32", "grad_ptr": "*fp32",
             "scratch_ptr": "*fp64", "node_w_ptr": "*fp64", "rho": "fp32", "ignore_index": "i64"}
    return {n: "constexpr" if n in CONST else kinds.get(n, "*i32" if n.endswith("_ptr") else "i32")
            for n in K.tree_rows_kernel.arg_names}
for x, soft, rho in (("*fp32", False, 1), ("*fp16", True, 3), ("*bf16", False, 2)):
    consts = dict(FROM_LOGITS=True, SOFT=soft, RHO_KIND=rho, NEED_GRAD=True, PT=tl.float32, BLOCK=1024)
    k = triton.compile(ASTSource(K.tree_rows_kernel, signature(x), consts), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": 4})
    assert len(k.asm["cubin"]) > 0 and "bar.sync" in k.asm["ptx"] and "ld.global.cg" in k.asm["ptx"]
print("compiled")
"""


@pytest.mark.slow
def test_kernel_compiles_for_an_h200_without_one():
    """The compiled path, which the interpreter never takes: the kernel is lowered to PTX and assembled to a
    cubin for sm_90 (H100/H200) by triton's bundled ptxas, in a process without TRITON_INTERPRET. This catches
    what only the compiler checks (loop-carried types, float64 scans, cache modifiers); it runs nothing."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _AOT_COMPILE], capture_output=True, text=True, env=env, timeout=300)
    no_tool = "ptxas" in out.stderr and ("not found" in out.stderr or "No such file" in out.stderr)
    if out.returncode and ("ImportError" in out.stderr or no_tool):  # an older triton API, or no bundled ptxas
        pytest.skip(f"this triton cannot compile ahead of time here: {out.stderr.strip().splitlines()[-1]}")
    assert out.returncode == 0 and "compiled" in out.stdout, out.stderr
