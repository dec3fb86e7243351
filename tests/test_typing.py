"""The library is typed: ``mypy --strict`` passes on ``src/emdloss`` (config: ``[tool.mypy]`` in pyproject.toml), and
``Tree``'s attributes are declared for a user's type checker (``py.typed`` itself: tests/test_package.py).

The mypy run takes about 10 s with a warm ``.mypy_cache`` and a minute or more cold on two cores, so it is marked
slow; CI runs ``python -m mypy`` as a step of its own (``.ci/run``)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import typing
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "src" / "emdloss"


def test_every_tree_slot_is_declared_for_type_checkers() -> None:
    """A user's mypy knows ``Tree``'s attributes only from class-level annotations (slots alone declare nothing):
    every slot has one, and each names the runtime type of the value."""
    import numpy as np

    from emdloss import Tree

    hints = typing.get_type_hints(Tree)
    assert set(Tree.__slots__) <= set(hints), (
        f"slots without a class-level annotation: {set(Tree.__slots__) - set(hints)}"
    )
    tree = Tree.from_edges([("r", "a"), ("r", "b"), ("a", "c")], classes=["b", "c"])
    for name in ("parents", "classes", "preorder", "position", "subtree_end", "edge_nodes"):
        assert typing.get_args(hints[name])[1] == np.dtype[np.int64] and getattr(tree, name).dtype == np.int64, name
    for name in ("weights", "_depth"):
        assert typing.get_args(hints[name])[1] == np.dtype[np.float64] and getattr(tree, name).dtype == np.float64, name
    assert hints["names"] == tuple[str, ...] | None and tree.names == ("r", "a", "b", "c")
    assert hints["root"] is int and type(tree.root) is int


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy is not installed (pip install mypy)")
@pytest.mark.skipif(not LIBRARY.is_dir(), reason="no src/emdloss here (the suite runs against an installed package)")
def test_mypy_strict_is_clean_on_the_library() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, f"mypy --strict (pyproject's [tool.mypy]) failed:\n{done.stdout}{done.stderr}"
    assert "Success: no issues found" in done.stdout, done.stdout
