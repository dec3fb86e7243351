"""The loss inside ordinary PyTorch workflows: autocast, torch.compile, DDP (2 gloo processes), moving,
saving and pickling the module, and torch.func transforms. References are float64 eager computations."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import torch
from _helpers import random_tree

import emdloss
from emdloss import EMDLoss, Tree
from emdloss.functional import emd


def _tree(seed: int = 0, nodes: int = 40) -> Tree:
    return random_tree(np.random.default_rng(seed), nodes, internal_classes=True)


# ---------------------------------------------------------------------- autocast and half precision


@pytest.mark.parametrize("backend", ["torch", "numba"])
@pytest.mark.parametrize("rho", [1.0, 2.0])
def test_autocast_bfloat16_cpu(backend, rho):
    torch.manual_seed(0)
    tree = _tree()
    model = torch.nn.Linear(16, tree.num_classes)
    x = torch.randn(64, 16)
    y = torch.randint(0, tree.num_classes, (64,))
    crit = EMDLoss(tree, rho=rho, backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
        loss = crit(logits, y)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.bfloat16
    loss.backward()
    # reference: the same bf16 logits, everything else in float64
    ref_logits = logits.detach().double().requires_grad_()
    ref = emd(ref_logits, y, tree, rho=rho)
    ref.backward()
    # one bf16 rounding of the result (2^-8 relative) on top of float32 accumulation inside
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=8e-3)
    assert torch.isfinite(model.weight.grad).all()
    # the logits gradient is rounded to bf16 once: compare through the linear layer's input gradient
    g_ref = torch.autograd.grad(emd(ref_logits, y, tree, rho=rho), ref_logits)[0]
    logits_leaf = logits.detach().requires_grad_()
    g = torch.autograd.grad(crit(logits_leaf, y), logits_leaf)[0]
    assert g.dtype == torch.bfloat16
    assert float((g.double() - g_ref).norm() / g_ref.norm()) < 1e-2


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_float16_inputs_accumulate_in_float32(backend):
    torch.manual_seed(1)
    tree = Tree.chain(2000)  # a long chain: cancellation in the CDF would show in half precision sums
    logits = (torch.randn(16, 2000) * 3).half().requires_grad_()
    y = torch.randint(0, 2000, (16,))
    loss = emd(logits, y, tree, reduction="none", backend=backend)
    assert loss.dtype == torch.float16
    ref = emd(logits.detach().double(), y, tree, reduction="none")
    np.testing.assert_allclose(loss.detach().double().numpy(), ref.numpy(), rtol=2e-3)  # float16 output rounding
    loss.sum().backward()
    ref_in = logits.detach().double().requires_grad_()
    emd(ref_in, y, tree, reduction="sum").backward()
    assert logits.grad.dtype == torch.float16 and torch.isfinite(logits.grad).all()
    assert float((logits.grad.double() - ref_in.grad).norm() / ref_in.grad.norm()) < 5e-3


# ---------------------------------------------------------------------- torch.compile


def _step_fn(model, crit):
    def step(x, y):
        loss = crit(model(x), y)
        loss.backward()
        return loss

    return step


def test_compile_model_step_matches_eager():
    torch.manual_seed(2)
    tree = _tree(2)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, tree.num_classes))
    crit = EMDLoss(tree, rho=2.0)
    x = torch.randn(32, 8)
    y = torch.randint(0, tree.num_classes, (32,))

    eager = _step_fn(model, crit)(x, y)
    g_eager = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch._dynamo.reset()
    # aot_eager traces forward and backward graphs exactly as inductor does, without the C++ build time
    compiled = torch.compile(_step_fn(model, crit), backend="aot_eager")
    loss = compiled(x, y)
    assert float(loss.detach()) == pytest.approx(float(eager.detach()), rel=1e-6)
    for p, g in zip(model.parameters(), g_eager):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)


def test_compile_single_graph_without_value_checks():
    """With ``validate=False`` the loss compiles into one graph (fullgraph=True); the default value checks
    read tensors on the CPU and each costs a graph break (documented in docs/workflows.md)."""
    tree = _tree(3)
    x = torch.randn(16, tree.num_classes, requires_grad=True)
    y = torch.randint(0, tree.num_classes, (16,))
    torch._dynamo.reset()
    explain = torch._dynamo.explain(lambda a, b: emd(a, b, tree, validate=False))(x, y)
    assert explain.graph_break_count == 0
    torch._dynamo.reset()
    fn = torch.compile(lambda a, b: emd(a, b, tree, validate=False), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(fn(x, y), emd(x, y, tree), rtol=1e-6, atol=0)


@pytest.mark.slow
def test_compile_inductor():
    tree = _tree(4)
    model = torch.nn.Linear(8, tree.num_classes)
    crit = EMDLoss(tree, validate=False)
    x, y = torch.randn(32, 8), torch.randint(0, tree.num_classes, (32,))
    torch._dynamo.reset()
    loss = torch.compile(_step_fn(model, crit))(x, y)
    assert float(loss) == pytest.approx(float(crit(model(x), y)), rel=1e-5)


# ---------------------------------------------------------------------- DDP


def _ddp_worker(rank: int, world: int, init: str, out: str, state: dict, x, y, tree_dict) -> None:
    import torch.distributed as dist

    from emdloss.metrics import HierarchicalMetrics

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        tree = Tree.from_dict(tree_dict)
        model = torch.nn.Linear(x.shape[1], tree.num_classes).double()
        model.load_state_dict(state)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        n = x.shape[0] // world
        xs, ys = x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]
        loss = EMDLoss(tree, rho=1.0)(ddp(xs), ys)
        loss.backward()
        # the global mean loss: average of the equal-sized local means
        total = loss.detach().clone()
        dist.all_reduce(total)
        metrics = HierarchicalMetrics(tree, k=3)
        metrics.update(ddp(xs).detach(), ys)
        result = metrics.compute()  # a collective: every process must call it
        if rank == 0:
            torch.save({"loss": total / world, "grads": [p.grad for p in model.parameters()], "metrics": result}, out)
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_match_one(tmp_path):
    import torch.multiprocessing as mp

    from emdloss.metrics import HierarchicalMetrics

    torch.manual_seed(5)
    tree = _tree(5)
    x = torch.randn(24, 6, dtype=torch.float64)
    y = torch.randint(0, tree.num_classes, (24,))
    model = torch.nn.Linear(6, tree.num_classes).double()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out = tmp_path / "rank0.pt"
    mp.spawn(
        _ddp_worker,
        args=(2, f"file://{tmp_path / 'rendezvous'}", str(out), state, x, y, tree.to_dict()),
        nprocs=2,
        join=True,
    )
    got = torch.load(out)

    loss = EMDLoss(tree, rho=1.0)(model(x), y)
    loss.backward()
    assert float(got["loss"]) == pytest.approx(float(loss.detach()), rel=1e-12)
    for g, p in zip(got["grads"], model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-10, atol=1e-12)
    single = HierarchicalMetrics(tree, k=3)
    single.update(model(x).detach(), y)
    ref = single.compute()
    assert got["metrics"].keys() == ref.keys()
    for k in ref:
        # 0-d tensors: compare their values (pytest 9's approx no longer takes a tensor as a scalar)
        assert got["metrics"][k].item() == pytest.approx(ref[k].item(), rel=1e-12, nan_ok=True)


# ---------------------------------------------------------------------- module state


def test_module_to_state_dict_and_pickle():
    tree = _tree(6)
    crit = EMDLoss(tree, rho=2.0)
    x = torch.randn(8, tree.num_classes)
    y = torch.randint(0, tree.num_classes, (8,))
    ref = crit(x, y)
    assert crit.to("cpu") is crit and crit.to(torch.float64) is crit  # no float buffers to convert
    torch.testing.assert_close(crit(x, y), ref)

    sd = crit.state_dict()
    assert "_extra_state" in sd and Tree.from_dict(sd["_extra_state"]["tree"]) == tree
    other = EMDLoss(tree)  # rho comes back from the state
    other.load_state_dict(sd)
    assert other.rho == 2.0
    torch.testing.assert_close(other(x, y), ref)
    with pytest.raises(ValueError, match="different tree"):
        EMDLoss(Tree.chain(tree.num_classes)).load_state_dict(sd)

    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    sd2 = torch.load(buf, weights_only=True)  # the state is plain lists and numbers
    assert Tree.from_dict(sd2["_extra_state"]["tree"]) == tree

    clone = pickle.loads(pickle.dumps(crit))
    assert clone.tree == tree
    torch.testing.assert_close(clone(x, y), ref)
    # a model holding the loss saves and loads whole
    holder = torch.nn.Sequential(torch.nn.Identity())
    holder.crit = crit
    back = pickle.loads(pickle.dumps(holder))
    torch.testing.assert_close(back.crit(x, y), ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_module_on_cuda():
    tree = _tree(7)
    crit = EMDLoss(tree).to("cuda")
    x = torch.randn(8, tree.num_classes, device="cuda", requires_grad=True)
    y = torch.randint(0, tree.num_classes, (8,), device="cuda")
    loss = crit(x, y)
    loss.backward()
    ref = emd(x.detach().cpu().double(), y.cpu(), tree)
    assert float(loss) == pytest.approx(float(ref), rel=1e-5)


# ---------------------------------------------------------------------- torch.func


def test_func_grad_vmap_and_per_sample_gradients():
    from torch.func import grad, vmap

    tree = _tree(8)
    x = torch.randn(10, tree.num_classes, dtype=torch.float64)
    y = torch.randint(0, tree.num_classes, (10,))

    xr = x.clone().requires_grad_()
    emd(xr, y, tree, rho=2.0).backward()
    torch.testing.assert_close(grad(lambda z: emd(z, y, tree, rho=2.0))(x), xr.grad)

    def one(z, t):
        return emd(z[None], t[None], tree, rho=1.0)

    per = vmap(one)(x, y)
    torch.testing.assert_close(per, emd(x, y, tree, reduction="none"))
    per_grad = vmap(grad(one))(x, y)
    for i in range(10):
        zi = x[i : i + 1].clone().requires_grad_()
        emd(zi, y[i : i + 1], tree).backward()
        torch.testing.assert_close(per_grad[i], zi.grad[0])


def test_func_with_fused_backend_is_a_clear_error():
    from torch.func import grad

    tree = _tree(9)
    x = torch.randn(4, tree.num_classes)
    y = torch.randint(0, tree.num_classes, (4,))
    with pytest.raises(ValueError, match=r"torch\.func"):
        grad(lambda z: emd(z, y, tree, backend="numba"))(x)
    assert emdloss.functional.emd is emd
