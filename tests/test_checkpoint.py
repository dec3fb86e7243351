"""Checkpoints: a Tree pickles as plain builtins, so ``torch.load(weights_only=True)`` reads it once ``Tree`` is an
allowed global; a criterion's state_dict needs nothing allowed; and a LightningModule holding a tree round-trips
through ``save_hyperparameters`` / ``load_from_checkpoint``."""

from __future__ import annotations

import copy
import functools
import inspect
import io
import pickle
import pickletools

import pytest
import torch
from torch import nn

import emdloss
from emdloss import EMDLoss, Tree

EDGES = [("root", "animal"), ("animal", "dog"), ("animal", "cat"), ("root", "car")]


def _tree(**changes) -> Tree:
    return Tree.from_edges(EDGES, changes.get("classes", ["dog", "cat", "car"]), weights=[0.1, 0.7, 1 / 3, 2.5])


def _globals_in(payload: bytes) -> set[str]:
    """The module.name of every global a pickle refers to (what a weights_only unpickler must allow)."""
    found, strings = set(), []
    for op, arg, _ in pickletools.genops(payload):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(arg)
        elif op.name == "STACK_GLOBAL":
            found.add(f"{strings[-2]}.{strings[-1]}")
        elif op.name in ("GLOBAL", "INST"):
            found.add(arg.replace(" ", "."))
    return found


def _saved(obj) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


def test_a_tree_pickles_as_plain_lists_with_no_global_but_tree() -> None:
    """It used to pickle numpy arrays (numpy.core.multiarray._reconstruct, numpy.dtype, ...)."""
    tree = _tree()
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        payload = pickle.dumps(tree, protocol=protocol)
        assert _globals_in(payload) == {"emdloss.tree.Tree"}
        back = pickle.loads(payload)
        assert back == tree and back.weights.tolist() == tree.weights.tolist()  # weights exactly (1/3 included)
    assert copy.deepcopy(tree) == tree and copy.copy(tree) == tree
    chain = Tree.chain(4, spacing=[0.5, 1.0, 2.0])
    assert pickle.loads(pickle.dumps(chain)) == chain and pickle.loads(pickle.dumps(chain)).names is None


def test_torch_load_weights_only_reads_a_tree_once_tree_is_an_allowed_global() -> None:
    tree = _tree()
    checkpoint = {"tree": tree, "weight": torch.ones(3)}
    if emdloss.Tree not in torch.serialization.get_safe_globals():  # another test in this process may allow it
        with pytest.raises(pickle.UnpicklingError, match=r"emdloss\.tree\.Tree"):
            torch.load(_saved(checkpoint), weights_only=True)
    with torch.serialization.safe_globals([emdloss.Tree]):
        loaded = torch.load(_saved(checkpoint), weights_only=True)
    assert loaded["tree"] == tree and isinstance(loaded["tree"], Tree)


def test_a_criterion_state_dict_loads_with_weights_only_and_nothing_allowed() -> None:
    """The tree travels in the state_dict as its JSON dict (plain lists), the class weights as a tensor."""
    loss = EMDLoss(_tree(), rho=2.0, weight=torch.tensor([1.0, 2.0, 0.5]))
    state = torch.load(_saved(loss.state_dict()), weights_only=True)
    fresh = EMDLoss(_tree(), weight=torch.ones(3))
    fresh.load_state_dict(state)
    assert fresh.rho == 2.0 and torch.equal(fresh.weight, loss.weight)


def test_a_tree_tampered_with_in_a_checkpoint_is_refused_by_the_constructor() -> None:
    """Unpickling calls Tree(...) on the saved lists, which validates them as for any new tree."""
    payload = pickle.dumps(_tree(), protocol=2)
    bad = payload.replace(pickle.dumps(-1, protocol=2)[2:-1], pickle.dumps(5, protocol=2)[2:-1], 1)
    assert bad != payload
    with pytest.raises(emdloss.TreeError):
        pickle.loads(bad)


# ---------------------------------------------------------------------- pytorch-lightning

# Imported by the test, not at collection: pytorch_lightning takes 3-4 s to import, which every pytest-xdist
# worker would pay when it collects this module.


@functools.cache
def lightning():
    """(pytorch_lightning, a tiny classifier class whose hyperparameters include the class tree)."""
    pl = pytest.importorskip("pytorch_lightning", reason="pip install emdloss[test] (pytorch-lightning)")

    class HierarchyClassifier(pl.LightningModule):
        """A tiny classifier whose hyperparameters include the class tree."""

        def __init__(self, tree: Tree, rho: float = 1.0, lr: float = 0.1) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = nn.Linear(4, tree.num_classes)
            self.criterion = EMDLoss(tree, rho=rho, weight=torch.linspace(0.5, 2.0, tree.num_classes))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return self.criterion(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    return pl, HierarchyClassifier


def _weights_only(pl) -> dict:
    """``weights_only=True`` where Lightning takes it (2.4+); older ones pass torch.load's default (True in 2.6+)."""
    return (
        {"weights_only": True}
        if "weights_only" in inspect.signature(pl.LightningModule.load_from_checkpoint).parameters
        else {}
    )


def _trained_checkpoint(tmp_path, tree: Tree):
    pl, HierarchyClassifier = lightning()
    torch.manual_seed(0)
    model = HierarchyClassifier(tree, rho=2.0)
    before = model.net.weight.detach().clone()
    data = torch.utils.data.TensorDataset(torch.randn(8, 4), torch.randint(0, tree.num_classes, (8,)))
    trainer = pl.Trainer(
        max_steps=1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
        enable_model_summary=False, accelerator="cpu", devices=1,
    )  # fmt: skip
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=8))
    assert not torch.equal(model.net.weight, before)  # one real step ran
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    return model, path


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning")
def test_lightning_save_hyperparameters_and_load_from_checkpoint_round_trip(tmp_path) -> None:
    tree = _tree()
    model, path = _trained_checkpoint(tmp_path, tree)
    pl, HierarchyClassifier = lightning()
    with torch.serialization.safe_globals([emdloss.Tree]):  # what the docs tell users to do
        loaded = HierarchyClassifier.load_from_checkpoint(path, **_weights_only(pl))
    assert loaded.hparams.tree == tree and loaded.hparams.rho == 2.0
    assert loaded.criterion.tree == tree and loaded.criterion.rho == 2.0
    assert torch.equal(loaded.criterion.weight, model.criterion.weight)
    assert torch.equal(loaded.net.weight, model.net.weight)
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 1, 0])
    torch.testing.assert_close(loaded.criterion(loaded.net(x), y), model.criterion(model.net(x), y))

    # a different tree passed at load time: the state_dict's tree is refused, naming what differs
    other = _tree(classes=["cat", "dog", "car"])
    with (
        torch.serialization.safe_globals([emdloss.Tree]),
        pytest.raises(ValueError, match=r"differ in classes: class 0 is node 3 \('cat'\) here and node 2 \('dog'\)"),
    ):
        HierarchyClassifier.load_from_checkpoint(path, tree=other, **_weights_only(pl))
