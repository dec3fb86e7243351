"""EMDLoss state_dict: a different tree is refused with what differs, and a bad rho is refused at load time."""

from __future__ import annotations

import io
import math

import pytest
import torch

from emdloss import EMDLoss, Tree

EDGES = [("root", "animal"), ("animal", "dog"), ("animal", "cat"), ("root", "car")]
CLASSES = ["dog", "cat", "car"]


def _saved(**changes) -> dict:
    edges = changes.get("edges", EDGES)
    tree = Tree.from_edges(edges, changes.get("classes", CLASSES), weights=changes.get("weights"))
    buffer = io.BytesIO()
    torch.save(EMDLoss(tree, rho=changes.get("rho", 1.0)).state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            dict(edges=[*EDGES[:2], ("animal", "cow"), EDGES[3]], classes=["dog", "cow", "car"]),
            r"names: node 3 is 'cat' here and 'cow' in the state_dict; build the loss",
        ),
        (dict(weights=[1.0, 1.0, 2.5, 1.0]), r"weights: the edge above node 3 is 1.0 here and 2.5 in the state_dict"),
        (dict(classes=["cat", "dog", "car"]), r"classes: class 0 is node 2 \('dog'\) here and node 3 \('cat'\) in the"),
        (dict(edges=[*EDGES[:2], ("root", "cat"), EDGES[3]]), r"structure: the parent of node 3 is 1 here and 0"),
        (dict(edges=[*EDGES, ("car", "bus")]), r"structure: 5 nodes here and 6 in the state_dict"),
    ],
)
def test_a_different_tree_is_refused_with_what_differs(changes, message) -> None:
    """The message used to show two identical reprs: "(Tree(tree, num_nodes=5, num_classes=3) vs Tree(tree, ...))"."""
    loss = EMDLoss(Tree.from_edges(EDGES, CLASSES))
    prefix = "state_dict holds a different tree than this EMDLoss: the trees differ in "
    with pytest.raises(ValueError, match=prefix + message):
        loss.load_state_dict(_saved(**changes))


def test_several_differences_are_all_named() -> None:
    loss = EMDLoss(Tree.from_edges(EDGES, CLASSES))
    state = _saved(weights=[1.0, 1.0, 2.5, 1.0], classes=["dog", "car", "cat"])
    with pytest.raises(ValueError, match=r"differ in classes: .*; and in weights: the edge above node 3"):
        loss.load_state_dict(state)


@pytest.mark.parametrize(
    "rho, error",
    [(0.5, ValueError), (math.nan, ValueError), (math.inf, ValueError), ("x", TypeError), (None, TypeError)],
)
def test_a_bad_rho_is_refused_at_load_time_with_the_constructors_message(rho, error) -> None:
    """It loaded silently (or as a bare float() error) and failed only at the next forward."""
    tree = Tree.from_edges(EDGES, CLASSES)
    with pytest.raises(error) as built:
        EMDLoss(tree, rho=rho)
    state = _saved()
    state["_extra_state"]["rho"] = rho
    loss = EMDLoss(tree, rho=2.0)
    with pytest.raises(error) as loaded:
        loss.load_state_dict(state)
    assert str(loaded.value) == str(built.value)
    assert loss.rho == 2.0  # unchanged


def test_a_good_state_round_trips() -> None:
    tree = Tree.from_edges(EDGES, CLASSES)
    loss = EMDLoss(tree)
    loss.load_state_dict(_saved(rho=3.0))
    assert loss.rho == 3.0 and isinstance(loss.rho, float)
