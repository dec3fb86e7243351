"""Hierarchical classification in PyTorch Lightning: train with ``emdloss.EMDLoss`` on a class tree and log
hierarchy-aware metrics (torchmetrics ``Metric`` objects from ``emdloss.metrics``) with ``self.log``.

The classes are the 27 leaves of a three-level tree (3 x 3 x 3, unit edges). Each input is the sum of one
random vector per level on its class's path plus noise, so classes under one parent look alike and a confusion
between siblings is the likely mistake, a confusion across the root the costly one. The model is a small MLP
trained with the relaxed EMD (``rho = 2``, a proper scoring rule for top-1, unlike ``rho = 1``; see
docs/metrics.md). Logged each epoch on the validation split:

- ``val/top1``, ``val/top5``: accuracy;
- ``val/severity_lca``: mistake severity of Bertinetto et al. (2020), the mean height of the lowest common
  ancestor of the predicted and true class over the mistakes (1 = a sibling, 3 = across the root);
- ``val/hdist_lca@5``: their average hierarchical distance of the top 5; ``*_path``: the same with path lengths;
- ``val/emd``: the mean exact EMD of the predicted distribution to the true class;
- ``train/severity_lca``: a single ``MistakeSeverity`` metric logged with ``self.log`` during training.

Needs ``pip install 'emdloss[metrics]' pytorch-lightning`` (or ``lightning``). Nothing is downloaded; a few
seconds on a CPU:

    python examples/lightning_hierarchy.py
    python examples/lightning_hierarchy.py --epochs 2 --seed 1
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import emdloss
from emdloss.metrics import HierarchicalMetrics, MistakeSeverity

try:  # the unified package first, then the standalone one: the API used here is the same
    import lightning.pytorch as pl
except ImportError:
    import pytorch_lightning as pl


def balanced_tree(branching: int, levels: int) -> emdloss.Tree:
    """A complete tree with ``branching ** levels`` leaf classes and unit edges; node 0 is the root."""
    parents = [-1]
    frontier = [0]
    for _ in range(levels):
        nxt = []
        for p in frontier:
            for _ in range(branching):
                parents.append(p)
                nxt.append(len(parents) - 1)
        frontier = nxt
    return emdloss.Tree.from_parents(parents)  # classes: the leaves


def make_data(tree: emdloss.Tree, n: int, dim: int, seed: int) -> tuple[Tensor, Tensor]:
    """(n, dim) features and (n,) classes: the sum of a N(0, I) vector per node on the class's root path, with
    N(0, noise^2 I) added, noise chosen so that siblings overlap (the task is not trivial)."""
    g = torch.Generator().manual_seed(seed)
    node_vec = torch.randn(tree.num_nodes, dim, generator=g)
    node_vec[0] = 0.0
    parents = tree.parents.tolist()
    means = []
    for c in tree.classes.tolist():
        v, total = c, torch.zeros(dim)
        while v != -1:
            total += node_vec[v]
            v = parents[v]
        means.append(total)
    y = torch.randint(0, tree.num_classes, (n,), generator=g)
    x = torch.stack(means)[y] + 2.0 * torch.randn(n, dim, generator=g)
    return x, y


class HierarchyClassifier(pl.LightningModule):
    def __init__(self, tree: emdloss.Tree, dim: int, lr: float = 3e-3) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, 64), nn.ReLU(), nn.Linear(64, tree.num_classes))
        self.loss = emdloss.EMDLoss(tree, rho=2.0)
        self.lr = lr
        # Metrics as module attributes: Lightning moves them with the model; their states are not persistent,
        # so they add nothing to checkpoints.
        self.val_metrics = HierarchicalMetrics(tree, k=5, prefix="val/")
        self.train_severity = MistakeSeverity(tree)  # distance="lca": Bertinetto et al.'s mistake severity

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = self.loss(logits, y)
        self.train_severity.update(logits.detach(), y)
        self.log("train/loss", loss, on_step=False, on_epoch=True)
        # a Metric object: Lightning calls compute() at the epoch's end (synced across processes) and reset()
        self.log("train/severity_lca", self.train_severity, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.val_metrics.update(self(x), y)
        self.log_dict(self.val_metrics, on_step=False, on_epoch=True)  # a MetricCollection: each metric logged

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3, help="training epochs (default: %(default)s)")
    parser.add_argument("--samples", type=int, default=2000, help="training examples (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, initialisation and batches")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.samples < 64:
        parser.error("need --epochs >= 1 and --samples >= 64")

    pl.seed_everything(args.seed, verbose=False)
    tree, dim = balanced_tree(3, 3), 16
    x, y = make_data(tree, args.samples + 1000, dim, args.seed)
    train = DataLoader(TensorDataset(x[: args.samples], y[: args.samples]), batch_size=64, shuffle=True)
    val = DataLoader(TensorDataset(x[args.samples :], y[args.samples :]), batch_size=250)
    model = HierarchyClassifier(tree, dim)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(model, train, val)
    took = time.perf_counter() - start
    print(f"{tree.num_classes} classes in a 3-level tree, {args.samples} training examples, {args.epochs} epochs")
    for name, value in sorted(trainer.callback_metrics.items()):
        print(f"{name:<20}{float(value):.4f}")
    # Guessing uniformly: top-1 1/27; a wrong guess is a sibling 2/26 of the time (height 1), a cousin 6/26
    # (height 2), across the root 18/26 (height 3).
    chance_severity = (2 * 1 + 6 * 2 + 18 * 3) / 26
    print(f"chance: top1 {1 / tree.num_classes:.4f}, severity_lca {chance_severity:.4f}")
    saved = [k for k in model.state_dict() if k.startswith(("val_metrics.", "train_severity."))]
    print(f"trained in {took:.1f} s; metric states in the checkpoint: {len(saved)} (they are not persistent)")
    return 0 if all(math.isfinite(float(v)) for v in trainer.callback_metrics.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
