"""The layout docs/architecture.md describes holds: the library's source never imports the lab (importing it
loads none: tests/test_package.py), its modules stay readable, and every registered backend fulfils the one
contract."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import emdloss
from emdloss import Tree, backends
from emdloss._inputs import normalise

LIBRARY = Path(emdloss.__file__).parent


def _library_modules() -> list[Path]:
    return sorted(p for p in LIBRARY.rglob("*.py"))


def test_library_source_never_imports_the_lab() -> None:
    """Only ``python -m emdloss`` (``__main__``, which runs the CLI) reaches into the lab."""
    offenders = []
    for path in _library_modules():
        if path.name == "__main__.py" and path.parent == LIBRARY:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{path.relative_to(LIBRARY)}: {n}" for n in names if n.split(".")[0] == "emdloss_lab"]
    assert not offenders


def test_no_library_module_is_too_long_to_read() -> None:
    lengths = {str(p.relative_to(LIBRARY)): len(p.read_text().splitlines()) for p in _library_modules()}
    assert max(lengths.values()) <= 600, sorted(lengths.items(), key=lambda kv: -kv[1])[:3]


@pytest.mark.parametrize("name", backends.names())
@pytest.mark.parametrize("target_kind", ["hard", "soft"])
def test_every_backend_returns_per_row_losses_with_ignored_rows_zero(name: str, target_kind: str) -> None:
    """The contract: (M,) losses in the input's dtype, 0 with gradient 0 for ignored rows, and a backward that
    scales the gradient by the incoming one (checked with a non-uniform incoming gradient)."""
    tree = Tree.chain(6)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(9, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    if target_kind == "hard":
        target = torch.randint(0, 6, (9,), generator=gen)
        target[[1, 4]] = -100
    else:
        target = torch.softmax(torch.randn(9, 6, generator=gen, dtype=torch.float64), 1)
    batch = normalise(x, target, 6, from_logits=True, ignore_index=-100, validate=True, reduction="sum")
    backend = backends.get(name)
    if name == "triton" and (backend.unavailable() or backend.cannot_run(batch)):
        pytest.skip("triton runs CPU tensors only in its interpreter (tests/test_triton.py runs this test there)")
    assert backend.unavailable() is None and backend.cannot_run(batch) is None
    rows = backend.row_losses(batch, tree, 2.0)
    assert rows.shape == (9,) and rows.dtype == x.dtype
    weights = torch.arange(1.0, 10.0, dtype=torch.float64)
    (rows * weights).sum().backward()
    reference = torch.stack([emd(x.detach()[i : i + 1].requires_grad_(), target[i : i + 1], tree) for i in range(9)])
    if target_kind == "hard":
        assert rows[[1, 4]].eq(0).all() and x.grad[[1, 4]].eq(0).all()
    kept = [i for i in range(9) if target_kind == "soft" or i not in (1, 4)]
    torch.testing.assert_close(rows.detach()[kept], reference[kept].detach())
    for i in kept:
        xi = x.detach()[i : i + 1].clone().requires_grad_()
        emd(xi, target[i : i + 1], tree, rho=2.0, backend="torch").backward()
        torch.testing.assert_close(x.grad[i], weights[i] * xi.grad[0])


def emd(x: torch.Tensor, target: torch.Tensor, tree: Tree, rho: float = 2.0, backend: str = "torch") -> torch.Tensor:
    return emdloss.functional.emd(x, target, tree, rho=rho, backend=backend, ignore_index=-100)
