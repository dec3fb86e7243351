"""Regression tests for defects a review of 0.1.0 found in ordinary training set-ups: fork after use, all-ignored
batches, half-precision tolerances, heavy edges above every class, extreme weights and ignore_index values,
and caches filled inside torch.func transforms."""

from __future__ import annotations

import multiprocessing as mp
from fractions import Fraction

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from emdloss import EMDLoss, Tree, backends
from emdloss.functional import emd

# the backends that run CPU tensors; triton runs them only in its interpreter (tests/test_triton.py covers it)
BACKENDS = tuple(name for name in backends.names() if name != "triton")


def _fused_loss_value(seed: int) -> float:
    """Runs the fused CPU backend (in a child process) on a batch large enough for its lane kernel."""
    gen = torch.Generator().manual_seed(seed)
    tree = Tree.chain(40)
    x = torch.randn(256, 40, generator=gen)
    return float(EMDLoss(tree, rho=2.0, backend="numba")(x, torch.randint(0, 40, (256,), generator=gen)))


class _LossDataset(Dataset):
    """Each item computes the fused loss in the DataLoader worker."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor(_fused_loss_value(i))


def _use_fused_backend_in_this_process() -> float:
    return _fused_loss_value(0)


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_process_pools_work_after_the_fused_backend_ran(context: str) -> None:
    """numba's OpenMP layer is not fork-safe in general; the kernels' thread pool must survive a fork after
    use, and the children must be able to run the kernels themselves."""
    if context not in mp.get_all_start_methods():
        pytest.skip(f"no {context} start method here")
    expected = [_fused_loss_value(i) for i in range(4)]
    with mp.get_context(context).Pool(2) as pool:
        got = pool.map(_fused_loss_value, range(4), chunksize=1)
    assert got == pytest.approx(expected, rel=1e-6)


def test_dataloader_fork_workers_survive_two_epochs_after_the_loss_ran() -> None:
    if "fork" not in mp.get_all_start_methods():
        pytest.skip("no fork start method here")
    _use_fused_backend_in_this_process()
    loader = DataLoader(_LossDataset(), batch_size=4, num_workers=2, multiprocessing_context="fork")
    expected = torch.tensor([_fused_loss_value(i) for i in range(8)])
    for _ in range(2):
        got = torch.cat(list(loader))
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spatial", [False, True])
def test_every_target_ignored_gives_nan_mean_and_zero_gradients(backend: str, spatial: bool) -> None:
    shape = (3, 5, 2) if spatial else (3, 5)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    target = torch.full((3, 2) if spatial else (3,), -100)
    loss = emd(x, target, Tree.chain(5), rho=2.0, backend=backend)
    assert torch.isnan(loss)
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    total = emd(x, target, Tree.chain(5), reduction="sum", backend=backend)
    assert total.item() == 0.0


def test_half_precision_sum_tolerance_does_not_grow_with_the_classes() -> None:
    """The tolerance is 1e-4 + eps(dtype) at any C: a bfloat16 target summing to 3 is rejected at 1,000 classes
    (0.1.0 accepted it, its tolerance being about 2.5 there), and correctly rounded softmax rows pass at 10^5."""
    c = 1000
    x = torch.randn(4, c, dtype=torch.bfloat16)
    q = (3 * torch.softmax(torch.randn(4, c), 1)).to(torch.bfloat16)
    with pytest.raises(ValueError, match="rows must sum to 1"):
        emd(x, q, Tree.chain(c))
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        c = 10**5
        q = torch.softmax(torch.randn(2, c, dtype=torch.float64), 1).to(dtype)
        emd(torch.randn(2, c, dtype=dtype), q, Tree.chain(c))  # no error


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_heavy_edge_above_every_class_adds_nothing(backend: str, dtype: torch.dtype) -> None:
    """A 1e9 edge above all classes carries sum(p) - sum(q) = 0: the loss equals the one without it exactly,
    in float32 too (0.1.0 added float32 rounding error times 1e9)."""
    heavy = Tree.from_parents([-1, 0, 1, 1, 2, 2], weights=[0, 1e9, 1, 2, 0.5, 0.25], classes=[3, 4, 5])
    light = Tree.from_parents([-1, 0, 1, 1, 2, 2], weights=[0, 0, 1, 2, 0.5, 0.25], classes=[3, 4, 5])
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=gen, dtype=dtype)
    for target in (
        torch.randint(0, 3, (64,), generator=gen),
        torch.softmax(torch.randn(64, 3, generator=gen, dtype=dtype), 1),
    ):
        for rho in (1.0, 2.0):
            got = emd(x, target, heavy, rho=rho, backend=backend, reduction="none")
            want = emd(x, target, light, rho=rho, backend=backend, reduction="none")
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_long_chain_edges_lose_no_precision_against_exact_rationals() -> None:
    """spacings [1e17, 1]: the EMD between a point mass on class 1 and one on class 2 is exactly 1."""
    tree = Tree.chain(3, spacing=[1e17, 1.0])
    p = torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64)
    for backend in BACKENDS:
        value = emd(p, torch.tensor([2]), tree, from_logits=False, backend=backend)
        assert Fraction(value.item()) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_edge_lengths_that_overflow_the_compute_dtype_are_a_clear_error(dtype: torch.dtype) -> None:
    tree = Tree.from_parents([-1, 0, 0], weights=[0, 3e38, 3e38])
    with pytest.raises(ValueError, match=r"edge lengths sum to 6e\+38.*rescale the edge lengths"):
        emd(torch.zeros(2, 2, dtype=dtype), torch.tensor([0, 1]), tree)
    loss = emd(torch.zeros(2, 2, dtype=torch.float64, requires_grad=True), torch.tensor([0, 1]), tree)
    assert torch.isfinite(loss)


def test_ignore_index_beyond_int64_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="ignore_index must fit in int64"):
        emd(torch.zeros(2, 3), torch.tensor([0, 1]), Tree.chain(3), ignore_index=2**70)


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision_mean_accumulates_in_float32(backend: str) -> None:
    """Per-row losses near float16's limit: their sum overflows float16, their float32-accumulated mean does not."""
    tree = Tree.chain(2, spacing=[40000.0])
    x = torch.tensor([[-20.0, 20.0]] * 8, dtype=torch.float16)
    loss = emd(x, torch.zeros(8, dtype=torch.int64), tree, backend=backend)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(40000.0, rel=1e-3)


def test_a_tree_first_used_inside_torch_func_works_eagerly_afterwards() -> None:
    """Tensors cached on a tree are never the wrapped ones a torch.func transform creates."""
    tree = Tree.chain(6)
    x = torch.randn(4, 6, dtype=torch.float64)
    y = torch.randint(0, 6, (4,))
    grad = torch.func.grad(lambda x: emd(x, y, tree, rho=2.0))(x)
    xr = x.clone().requires_grad_()
    emd(xr, y, tree, rho=2.0, backend="torch").backward()
    torch.testing.assert_close(grad, xr.grad)
    torch.func.hessian(lambda x: emd(x, y, tree, rho=2.0))(x)  # a second transform on the same tree


def test_saved_trees_follow_the_umask(tmp_path) -> None:
    """Atomic writes start from a private temporary file; the saved file gets what open() would give it."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        Tree.chain(3).save(tmp_path / "tree.json")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "tree.json").st_mode) == 0o644
