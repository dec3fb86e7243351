"""Tracing and the device: torch.export, torch.compile(fullgraph=True), make_fx/FakeTensorMode and TorchScript with
the default ``validate=None``; caches on a Tree that never keep traced tensors; and no host read (hence no device
synchronisation) on the path a GPU tensor takes. docs/workflows.md ("Tracing: torch.export, torch.compile,
TorchScript") describes what these tests check.

Reference values are the chain's closed form ``sum_k |CDF_p(k) - CDF_q(k)|^rho`` (unit spacing), computed here in
numpy, independently of the library's tree code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch import nn

import emdloss
from emdloss import EMDLoss, Tree
from emdloss._inputs import holds_traced_tensor
from emdloss.functional import emd

C = 6


def chain_emd(logits: torch.Tensor, labels: torch.Tensor, rho: float = 1.0) -> float:
    """Mean over rows of ``sum_k |CDF_p - CDF_q|^rho`` on a unit chain: an independent closed form."""
    p = torch.softmax(logits.detach().double(), 1).numpy()
    q = np.eye(p.shape[1])[labels.numpy()]
    return float((np.abs(np.cumsum(p - q, 1)[:, :-1]) ** rho).sum(1).mean())


def data(seed: int = 0, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, C, generator=g), torch.randint(0, C, (n,), generator=g)


class Model(nn.Module):
    """A linear layer and the loss: what a user exports or compiles."""

    def __init__(self, tree: Tree, **loss_args) -> None:
        super().__init__()
        self.loss = EMDLoss(tree, **loss_args)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss(x * 1.0, y)


def assert_no_traced_cache(tree: Tree) -> None:
    derived = tree._derived
    assert not any(holds_traced_tensor(v) for v in derived.values()), {k: type(v) for k, v in derived.items()}


# ---------------------------------------------------------------------- torch.export, then eager and compiled


@pytest.mark.parametrize("backend", [pytest.param("torch", marks=pytest.mark.slow), "auto"])
def test_export_by_default_then_eager_and_compiled_on_the_same_tree(backend: str) -> None:
    """0.1.0: export failed in the value checks (GuardOnDataDependentSymNode, no hint), and with validate=False it
    left fake tensors in the tree's cache, after which eager and compiled calls on that tree failed."""
    tree = Tree.chain(C)
    x, y = data()
    expected = chain_emd(x, y)
    program = torch.export.export(Model(tree, backend=backend), (x, y))  # default validate=None
    assert_no_traced_cache(tree)
    x2, y2 = data(seed=1)
    assert program.module()(x2, y2).item() == pytest.approx(chain_emd(x2, y2), rel=1e-6)
    assert emd(x, y, tree, backend="torch").item() == pytest.approx(expected, rel=1e-6)
    assert_no_traced_cache(tree)
    torch._dynamo.reset()
    compiled = torch.compile(Model(tree, backend="torch"), fullgraph=True, backend="aot_eager")
    assert compiled(x, y).item() == pytest.approx(expected, rel=1e-6)
    # and an export after the eager call, which found the cached tensors, still gives the right program
    program = torch.export.export(Model(tree, validate=False), (x, y))
    assert program.module()(x2, y2).item() == pytest.approx(chain_emd(x2, y2), rel=1e-6)
    assert_no_traced_cache(tree)


def test_exported_program_checks_values_in_the_graph() -> None:
    """validate=None on CPU tensors exports the value checks as graph asserts (no data-dependent control flow):
    the exported program checks every call; validate=False exports none."""
    tree = Tree.chain(C)
    x, y = data()
    checked = torch.export.export(Model(tree), (x, y)).module()
    bad = y.clone()
    bad[3] = C
    with pytest.raises(RuntimeError, match=rf"target contains a class index outside \[0, {C}\)"):
        checked(x, bad)
    nan = x.clone()
    nan[1, 2] = float("nan")
    with pytest.raises(RuntimeError, match="input contains NaN or infinite logits"):
        checked(nan, y)
    ignored = y.clone()
    ignored[0] = -100  # ignore_index is not out of range
    checked(x, ignored)
    unchecked = torch.export.export(Model(tree, validate=False), (x, y))
    assert "_assert_async" not in str(unchecked.graph)
    assert torch.isnan(unchecked.module()(nan, y))


@pytest.mark.slow
def test_exported_soft_targets_and_probabilities_are_checked() -> None:
    tree = Tree.chain(C)
    x, _ = data()
    soft = torch.softmax(torch.randn(8, C, generator=torch.Generator().manual_seed(3)), 1)
    program = torch.export.export(Model(tree), (x, soft)).module()
    assert program(x, soft).item() == pytest.approx(emd(x, soft, tree).item(), rel=1e-6)
    with pytest.raises(RuntimeError, match=r"target rows must sum to 1 \(tolerance 0.0001\)"):
        program(x, soft * 1.1)
    negative = soft.clone()
    negative[0, 1] += negative[0, 0] + 0.25  # the row still sums to 1
    negative[0, 0] = -0.25
    with pytest.raises(RuntimeError, match="target has negative entries"):
        program(x, negative)
    probs = torch.export.export(Model(tree, from_logits=False), (soft.clone(), soft)).module()
    with pytest.raises(RuntimeError, match=r"input \(probabilities, from_logits=False\) contains NaN"):
        probs(soft.masked_fill(soft > 0.3, float("nan")), soft)


# ---------------------------------------------------------------------- torch.compile


@pytest.mark.slow
@pytest.mark.parametrize("soft", [False, True])
def test_compile_fullgraph_with_default_validation(soft: bool) -> None:
    """validate=None compiles into one graph (the checks are in it) and still catches bad values."""
    tree = Tree.chain(C)
    x, y = data()
    target = torch.softmax(torch.randn(8, C, generator=torch.Generator().manual_seed(4)), 1) if soft else y
    fn = torch.compile(lambda a, b: emd(a, b, tree, rho=2.0), fullgraph=True, backend="aot_eager")
    torch._dynamo.reset()
    assert fn(x, target).item() == pytest.approx(emd(x, target, tree, rho=2.0).item(), rel=1e-6)
    explain = torch._dynamo.explain(lambda a, b: emd(a, b, tree))(x, target)
    assert explain.graph_break_count == 0
    if not soft:
        bad = y.clone()
        bad[0] = -3
        with pytest.raises(RuntimeError, match="class index outside"):
            fn(x, bad)
    assert_no_traced_cache(tree)


def test_compiled_graph_holds_the_tree_as_constants() -> None:
    """With the default validate=None the loss is one graph (fullgraph=True; the value checks are asserts in it),
    and the tree's index tensors are its constants, built once, not rebuilt (nor copied to the device) per call:
    the graph's only inputs are the call's tensors."""
    tree = Tree.chain(C)
    x, y = data()
    graphs = []

    def capture(gm: torch.fx.GraphModule, example_inputs):  # a dynamo backend that records the graph
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    fn = torch.compile(lambda a, b: emd(a, b, tree), fullgraph=True, backend=capture)
    assert fn(x, y).item() == pytest.approx(chain_emd(x, y), rel=1e-6)
    (gm,) = graphs
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert len(placeholders) == 2, [n.name for n in placeholders]  # x and y: no tree arrays as inputs
    assert not any("searchsorted" in str(n.target) or "as_tensor" in str(n.target) for n in gm.graph.nodes)
    assert any("_assert_async" in str(n.target) for n in gm.graph.nodes)
    # built for real while dynamo traced, so cached and shared with eager calls
    assert not holds_traced_tensor(tree._derived[("reference", "cpu")])


# ---------------------------------------------------------------------- other tracers and the cache


def test_fake_tensor_mode_and_make_fx_leave_no_fakes_in_the_cache() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    tree = Tree.chain(C)
    x, y = data()
    with FakeTensorMode() as mode:
        out = emd(mode.from_tensor(x), mode.from_tensor(y), tree, backend="torch")
    assert out.shape == ()
    assert_no_traced_cache(tree)
    gm = make_fx(lambda a, b: emd(a, b, tree, validate=False), tracing_mode="symbolic")(x, y)
    assert gm(x, y).item() == pytest.approx(chain_emd(x, y), rel=1e-6)
    assert_no_traced_cache(tree)
    assert emd(x, y, tree, backend="torch").item() == pytest.approx(chain_emd(x, y), rel=1e-6)


def test_tree_cached_refuses_traced_tensors() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    tree = Tree.chain(3)
    with FakeTensorMode():
        fake = torch.zeros(3)
    assert tree.cached("fake", lambda: {"a": (fake,)}) is not None
    assert "fake" not in tree._derived
    wrapped = []
    torch.func.vmap(lambda t: wrapped.append(tree.cached("vmapped", lambda: t)) or t)(torch.zeros(2, 3))
    assert "vmapped" not in tree._derived
    plain = tree.cached("plain", lambda: torch.ones(2))
    assert tree.cached("plain", lambda: torch.zeros(2)) is plain


@pytest.mark.slow
def test_vmap_and_grad_then_compile_on_the_same_tree() -> None:
    tree = Tree.chain(C)
    x, y = data()
    per_row = torch.func.vmap(lambda a, b: emd(a[None], b[None], tree))(x, y)
    assert per_row.mean().item() == pytest.approx(chain_emd(x, y), rel=1e-6)
    torch.func.grad(lambda a: emd(a, y, tree))(x)
    assert_no_traced_cache(tree)
    torch._dynamo.reset()
    fn = torch.compile(lambda a, b: emd(a, b, tree), fullgraph=True, backend="aot_eager")
    assert fn(x, y).item() == pytest.approx(chain_emd(x, y), rel=1e-6)


# ---------------------------------------------------------------------- TorchScript


def test_torchscript_is_refused_with_the_alternatives() -> None:
    tree = Tree.chain(C)
    x, y = data()
    for build in (lambda: torch.jit.script(EMDLoss(tree)), lambda: torch.jit.script(Model(tree))):
        with pytest.raises(RuntimeError, match=r"torch\.compile\(model\) or torch\.export\.export"):
            build()
    with pytest.raises(RuntimeError, match=r"TorchScript .*torch\.compile"):
        torch.jit.trace(Model(tree), (x, y))
    with pytest.raises(RuntimeError, match="TorchScript"):
        torch.jit.script(emdloss.SinkhornLoss(tree.distance_matrix(), reg=0.1))


# ---------------------------------------------------------------------- the device path reads nothing


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("case", ["hard", "ignore", "soft", "spatial"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_device_path_reads_no_value(backend: str, case: str, reduction: str) -> None:
    """Tensors on any non-CPU device take the same path as CUDA tensors. On the "meta" device tensors hold no data,
    so every host read (``.item()``, ``bool(t)``, ``.tolist()``, ``.numpy()``, a device-to-host copy) raises: the
    forward and backward running there prove that a GPU call with the default ``validate=None`` never waits for
    the device. With ``validate=True`` the same call reads values, and fails here (it synchronises on a GPU)."""
    tree = Tree.chain(C)
    shape = (4, C, 3) if case == "spatial" else (4, C)
    x = torch.randn(shape, device="meta", requires_grad=True)
    if case == "soft":
        target = torch.randn(shape, device="meta")
    else:
        target = torch.zeros((shape[0], *shape[2:]), dtype=torch.long, device="meta")
    ignore = {"ignore_index": 0} if case == "ignore" else {}
    for rho in (1.0, 1.5):
        loss = emd(x, target, tree, rho=rho, reduction=reduction, backend=backend, **ignore)
        assert loss.device.type == "meta"
        assert loss.shape == ((shape[0], *shape[2:]) if reduction == "none" else ())
        loss.sum().backward()
        assert x.grad is not None and x.grad.shape == x.shape
        x.grad = None
    with pytest.raises((RuntimeError, NotImplementedError)):
        emd(x, target, tree, reduction=reduction, backend=backend, validate=True, **ignore)


# ---------------------------------------------------------------------- on a CUDA GPU


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@contextlib.contextmanager
def sync_is_an_error() -> Iterator[None]:
    """Every synchronising CUDA call in the block raises (torch.cuda.set_sync_debug_mode("error"))."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_cuda_default_call_never_synchronises(backend: str) -> None:
    tree = Tree.chain(50)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 50, generator=g).cuda().requires_grad_()
    y = torch.randint(0, 50, (64,), generator=g).cuda()
    y[::7] = -100
    soft = torch.softmax(torch.randn(64, 50, generator=g), 1).cuda()
    calls = [
        lambda: emd(x, y, tree, backend=backend),
        lambda: emd(x, y, tree, rho=2.0, reduction="sum", backend=backend),
        lambda: emd(x, y, tree, reduction="none", backend=backend).sum(),
        lambda: emd(x, soft, tree, backend=backend),
    ]
    expected = [call().detach() for call in calls]  # warm-up: the tree's tensors are copied to the device here
    losses = []
    with sync_is_an_error():
        for call in calls:
            loss = call()
            loss.backward()
            losses.append(loss.detach())
    for loss, value in zip(losses, expected, strict=True):  # compared after: reading them synchronises
        torch.testing.assert_close(loss, value)
    cpu = emd(x.detach().cpu(), y.cpu(), tree, backend="torch")
    torch.testing.assert_close(expected[0].cpu(), cpu)


@pytest.mark.cuda
@cuda
def test_cuda_compiled_fullgraph_never_synchronises() -> None:
    tree = Tree.chain(50)
    x = torch.randn(64, 50, device="cuda", requires_grad=True)
    y = torch.randint(0, 50, (64,), device="cuda")
    torch._dynamo.reset()
    fn = torch.compile(lambda a, b: emd(a, b, tree, rho=2.0), fullgraph=True)
    fn(x, y).backward()  # compiles
    with sync_is_an_error():
        fn(x, y).backward()
    expected = emd(x.detach().cpu(), y.cpu(), tree, rho=2.0)
    torch.testing.assert_close(fn(x, y).detach().cpu(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_cuda_validate_true_raises_the_cpu_messages(backend: str) -> None:
    tree = Tree.chain(C)
    x, y = data()
    bad = y.clone()
    bad[2] = C + 1
    soft = torch.softmax(torch.randn(8, C), 1) * 1.2
    nan = x.clone()
    nan[0, 0] = float("inf")
    for inputs in ((x, bad), (x, soft), (nan, y)):
        with pytest.raises(ValueError) as on_cpu:
            emd(*inputs, tree, validate=True)
        with pytest.raises(ValueError) as on_gpu:
            emd(*(t.cuda() for t in inputs), tree, validate=True, backend=backend)
        assert str(on_gpu.value) == str(on_cpu.value)
