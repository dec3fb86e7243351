"""``emdloss experiment proxy``: a proxy for the small-data ImageNet claim with a representation to learn.

:mod:`.hierarchy` (a) gives a linear model features that are already the class code. Here the class code is
hidden behind a frozen random deep generator, with nuisance factors, so a network trained from scratch has to
learn a representation, as on images (issue 16, item 4).

Classes and tree. ``classes`` ImageNet-1k classes drawn at random per seed (without replacement) from the real
WordNet tree (``imagenet_tree()``), and the tree restricted to them (:func:`restrict_tree`: the classes and their
ancestors; tree distances between the kept classes are those of the full tree). Why a subset and not all 1,000:
see "Cost" below.

Latent code of an image of class c (hierarchical Gaussian model of :func:`.hierarchy.class_means` on the
*generator's* tree)::

    mu = class_means(T_gen, d_z, 1, rng),  centred and scaled so that mean_c |mu_c|^2 = d_z
    z  = mu_c + sigma_within * eps,   eps ~ N(0, I_{d_z})            (class code, close classes close)
    n  ~ N(0, I_{d_n})                                               (nuisance code, no class information)

Renderer (:class:`Generator`, weights fixed and drawn from a seeded generator, never trained): ``[z, n]`` ->
Linear -> 64 x 4 x 4 -> LeakyReLU -> ConvTranspose (8 x 8) -> LeakyReLU -> ConvTranspose (16 x 16) -> LeakyReLU
-> Conv 3 x 3 -> tanh, one channel, 16 x 16. Then per-image nuisances: a circular shift by up to ``max_shift``
pixels in each direction, contrast ``exp(N(0, s_c^2))``, brightness ``N(0, s_b^2)`` and pixel noise
``N(0, s_p^2)``. Images are standardised by the training split's pixel mean and std (one scalar each).

Model: the same small CNN for every loss (:func:`cnn`: conv 3x3 16 -> pool -> conv 3x3 32 -> pool -> linear),
trained from scratch under :func:`.training.fit_tuned` (validation split 20 %, equal tuning budget per loss,
epochs with early stopping on validation top-1, the best trial scored once on the test split).

Losses: those of :mod:`.hierarchy` (cross-entropy, EMD rho = 1, relaxed rho = 2, CE + lam * relaxed, HXE, soft
labels) via :func:`.training.make_loss`, always on the ImageNet tree restricted to the seed's classes; metrics
(:func:`.training.tree_metrics`) on that tree too.

Groups (per seed the classes, generator, data and split are shared by the losses of a group, so differences to
cross-entropy are paired over seeds):

- ``imagenet/K``: the generator's tree is the loss's tree; ``K`` training images a class, swept.
- ``shuffled/K`` (control 1): the generator's tree is the same, but the labels are permuted over the leaves
  (class ``j`` of the loss is rendered from the code of generator class ``perm[j]``), so the loss's tree says
  nothing about which classes look alike.
- ``mismatched/K`` (control 2): the generator is built on a different tree, a uniform random recursive tree
  (:func:`emdloss_lab.synthetic.random_tree`, ``3 * classes`` nodes, ``classes`` of its leaves drawn at random),
  while the loss still uses the ImageNet tree. Its class means are scaled to the same overall spread as the
  ImageNet ones, so the task is about as hard and only its similarity structure differs.
- ``linear/K``: a linear classifier on the pixels with cross-entropy (same protocol, same data as
  ``imagenet/K``), the check that the class is recoverable only through a nonlinear representation.

Calibration (seed 0, 100 classes, 50 images a class; measured, and why the constants are what they are):
``sigma_within = 0.6`` leaves the latent task easy (nearest class mean on ``z``: top-1 0.95) and puts the
difficulty in the rendering and nuisances, as with images: under the full protocol the CNN with cross-entropy
reaches test top-1 0.40, a linear model on the pixels 0.15 (the ``linear`` group reports this check per seed).
In a 12-epoch probe at ``sigma_within = 1.0`` both fell to 0.19 / 0.09 (latent nearest-mean 0.68), too hard to
tell losses apart. At 50 classes and 40 images a class, the correlation over class pairs between tree distance
and the distance of the class-mean images is 0.05-0.33 over seeds 0-5 (0.24 at seed 0) with the matched tree and
about 0 (-0.08..0.10) with shuffled labels: the generator keeps some, not all, of the tree's geometry. The images
look like textures, not objects (``proxy_samples.png``). Without batch norm the CNN stayed at chance for whole
trials at the upper learning rates, hence BN and ``lr_range`` [5e-4, 5e-3].

Cost and sizes. Units of the full configuration (3 trials, up to 40 epochs, patience 4), measured on this 2-core
machine with one torch thread and the other core busy (load 2.5-3): imagenet/50 ce 52 s (24 epochs at the
chosen rate), and with the earlier 30-epoch cap (none of these reached it) relaxed 57 s, ce+relaxed 60 s, hxe 62
s, soft 52 s, emd 14 s (its validation top-1 never improves, so it stops early: see the collapse diagnostics),
shuffled/50 ce 51 s; imagenet/20 ce 21 s, imagenet/5 ce 2.4 s, the linear check 5 s. A seed is ~3 x 300 s (the
three groups at 50 a class) + ~110 s (20 a class) + ~15 s (5 a class) + 5 s ~ 1,030 s; 5 seeds ~ 1.4 h, say
1.4-1.8 h with load. All 1,000 classes would cost ~10x per unit (and 100 a class 2x more), hence 100 classes a
seed, per-class sizes 5, 20 and 50, and the controls at 50 (the paper's regime). ``--quick`` (50 classes, 20 a
class, 1 trial, up to 8 epochs, 2 seeds): 58-63 s wall; ``--smoke``: ~6 s.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from emdloss.tree import Tree

from .. import data
from ..synthetic import random_tree
from . import hierarchy, runner
from .hierarchy import LOSSES, VERDICT_LOSSES, VERDICT_METRICS, class_means
from .training import (
    add_experiment_arguments,
    add_workers_argument,
    fit_tuned,
    make_loss,
    mlp,
    num_seeds,
    on_small_model_cpu,
    summarize,
    tree_metrics,
    verdict_counts,
    verdict_table,
    versus_baseline,
)

GROUPS = ("imagenet", "shuffled", "mismatched")

DESCRIPTION = (
    "A proxy for the small-data ImageNet claim: hierarchical latent classes on the real ImageNet WordNet tree "
    "rendered into 16x16 images by a frozen random deep generator with nuisances; a CNN trained from scratch with "
    "each loss; controls with the labels shuffled over the leaves and with a generator built on another tree."
)


def _top1(logits: Tensor, y: Tensor) -> float:
    """The validation criterion: top-1 accuracy."""
    return float((logits.argmax(1) == y).double().mean())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_experiment_arguments(parser, default_seeds=5)
    add_workers_argument(parser)


# ---------------------------------------------------------------------- classes and trees


def restrict_tree(tree: Tree, classes: np.ndarray) -> Tree:
    """``tree`` cut down to the classes ``classes`` (indices into ``tree.classes``, in the new output order) and
    their ancestors. Path lengths between kept classes are unchanged (unary chains are kept, not contracted)."""
    parents = np.asarray(tree.parents)
    nodes = np.asarray(tree.classes)[np.asarray(classes)]
    keep = np.zeros(tree.num_nodes, dtype=bool)
    for v in nodes:
        while v >= 0 and not keep[v]:
            keep[v] = True
            v = parents[v]
    old = np.flatnonzero(keep)
    new_id = np.full(tree.num_nodes, -1, dtype=np.int64)
    new_id[old] = np.arange(old.size)
    new_parents = np.where(parents[old] >= 0, new_id[np.maximum(parents[old], 0)], -1)
    names = [tree.names[v] for v in old] if tree.names is not None else None
    return Tree.from_parents(new_parents, weights=np.asarray(tree.weights)[old], names=names, classes=new_id[nodes])


def class_subset(seed: int, num_classes: int) -> np.ndarray:
    """The seed's ImageNet classes (indices in the standard class order), sorted; all 1,000 when asked for."""
    if num_classes >= 1000:
        return np.arange(1000)
    return np.sort(np.random.default_rng([seed, 41]).choice(1000, size=num_classes, replace=False))


def mismatched_tree(seed: int, num_classes: int) -> Tree:
    """A uniform random recursive tree with ``3 * num_classes`` nodes, ``num_classes`` of its leaves as classes."""
    rng = np.random.default_rng([seed, 43])
    while True:  # a recursive tree on n nodes has ~n/2 leaves: one draw nearly always suffices
        t = random_tree(rng, 3 * num_classes)
        if t.num_classes >= num_classes:
            return restrict_tree(t, np.sort(rng.choice(t.num_classes, size=num_classes, replace=False)))


def generator_means(group: str, loss_tree: Tree, seed: int, dim: int) -> np.ndarray:
    """(C, dim) latent class means for the loss's classes 0..C-1 in ``group`` (see the module docstring),
    centred and scaled so that ``mean_c |mu_c|^2 = dim``."""
    c = loss_tree.num_classes
    rng = np.random.default_rng([seed, 1])
    if group == "mismatched":
        mu = class_means(mismatched_tree(seed, c), dim, 1.0, rng)
    else:
        mu = class_means(loss_tree, dim, 1.0, rng)
        if group == "shuffled":
            mu = mu[np.random.default_rng([seed, 44]).permutation(c)]
    mu = mu - mu.mean(0)
    return mu * np.sqrt(dim / (mu**2).sum(1).mean())


# ---------------------------------------------------------------------- the renderer


class Generator(nn.Module):
    """Frozen random decoder ``(N, d_z + d_n) -> (N, 1, 16, 16)`` in [-1, 1] (see the module docstring).

    Weights ~ N(0, gain^2 / fan_in) (He-style for LeakyReLU(0.2), so activations keep their scale through the
    layers), biases ~ N(0, 0.1^2), all from ``torch.Generator().manual_seed(seed)``: a function of ``seed`` only,
    whatever the global torch state.
    """

    def __init__(self, d_in: int, seed: int, width: int = 64) -> None:
        super().__init__()
        self.width = width
        self.fc = nn.Linear(d_in, width * 16)
        self.up1 = nn.ConvTranspose2d(width, width // 2, 4, stride=2, padding=1)
        self.up2 = nn.ConvTranspose2d(width // 2, width // 4, 4, stride=2, padding=1)
        self.out = nn.Conv2d(width // 4, 1, 3, padding=1)
        g = torch.Generator().manual_seed(int(seed))
        gain = (2.0 / (1 + 0.2**2)) ** 0.5
        with torch.no_grad():
            for layer in (self.fc, self.up1, self.up2, self.out):
                w = layer.weight
                # a transposed conv (in, out, 4, 4) with stride 2 feeds an output pixel from 2 x 2 taps an input
                # map; Linear (out, in) and Conv2d (out, in, 3, 3) from all of w[0]
                fan_in = w.shape[0] * 4 if isinstance(layer, nn.ConvTranspose2d) else w[0].numel()
                w.copy_(torch.randn(w.shape, generator=g) * gain / fan_in**0.5)
                layer.bias.copy_(0.1 * torch.randn(layer.bias.shape, generator=g))
        self.requires_grad_(False)
        self.eval()

    def forward(self, latent: Tensor) -> Tensor:
        act = nn.functional.leaky_relu
        h = act(self.fc(latent), 0.2).view(-1, self.width, 4, 4)
        h = act(self.up1(h), 0.2)
        h = act(self.up2(h), 0.2)
        return torch.tanh(self.out(h))


def render_images(
    mu: np.ndarray, y: np.ndarray, seed: int, stream: int, cfg: dict[str, Any], generator: Generator
) -> Tensor:
    """(N, 1, 16, 16) images of classes ``y`` (N,) from class means ``mu`` (C, d_z), with their nuisances; the
    random draws come from ``default_rng([seed, stream])``."""
    r = np.random.default_rng([seed, stream])
    n = y.size
    z = mu[y] + cfg["sigma_within"] * r.standard_normal((n, mu.shape[1]))
    nuis = r.standard_normal((n, cfg["nuisance_dim"]))
    with torch.no_grad():
        img = generator(torch.from_numpy(np.concatenate([z, nuis], 1).astype(np.float32)))
    s = cfg["max_shift"]
    shifts = r.integers(-s, s + 1, size=(n, 2))
    for dy in range(-s, s + 1):  # circular shifts, grouped by shift (25 rolls, not N)
        for dx in range(-s, s + 1):
            idx = np.flatnonzero((shifts[:, 0] == dy) & (shifts[:, 1] == dx))
            if idx.size:
                img[idx] = torch.roll(img[idx], (dy, dx), dims=(2, 3))
    contrast = np.exp(cfg["contrast"] * r.standard_normal(n))
    brightness = cfg["brightness"] * r.standard_normal(n)
    img = img * torch.from_numpy(contrast.astype(np.float32)).view(-1, 1, 1, 1)
    img = img + torch.from_numpy(brightness.astype(np.float32)).view(-1, 1, 1, 1)
    return img + cfg["pixel_noise"] * torch.from_numpy(r.standard_normal(img.shape).astype(np.float32))


def make_task(group: str, per_class: int, seed: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """The seed's loss tree (ImageNet restricted to its classes) and the group's train (``per_class`` a class)
    and test (``cfg['test_per_class']`` a class) images, standardised by the training split.

    As in :func:`.hierarchy.generated_task`, the classes, generator and test set depend on the seed and group
    only, not on ``per_class``."""
    g = cfg["generator"]
    tree = restrict_tree(data.imagenet_tree(), class_subset(seed, cfg["classes"]))
    mu = generator_means(group, tree, seed, g["latent_dim"])
    gen = Generator(g["latent_dim"] + g["nuisance_dim"], seed=seed * 100 + 3, width=g["width"])
    c = tree.num_classes
    ytr, yte = np.repeat(np.arange(c), per_class), np.repeat(np.arange(c), cfg["test_per_class"])
    xtr, xte = render_images(mu, ytr, seed, 2, g, gen), render_images(mu, yte, seed, 3, g, gen)
    m, s = xtr.mean(), xtr.std()
    return {
        "tree": tree,
        "x_train": (xtr - m) / s,
        "y_train": torch.from_numpy(ytr),
        "x_test": (xte - m) / s,
        "y_test": torch.from_numpy(yte),
    }


# ---------------------------------------------------------------------- the model and one unit


def cnn(num_classes: int, width: int = 16) -> nn.Module:
    """The CNN every loss trains: (N, 1, 16, 16) -> conv3x3(width) -> BN -> ReLU -> maxpool -> conv3x3(2 width) ->
    BN -> ReLU -> maxpool -> flatten (2 width * 16) -> linear -> (N, num_classes) logits. (Batch norm: without
    it Adam at the upper learning rates left the net at chance for whole trials.)"""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * width * 16, num_classes),
    )


def run_unit(group: str, per_class: int, loss: str, seed: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """One (group, examples a class, loss, seed): tune, train and score on the test split."""
    task = make_task("imagenet" if group == "linear" else group, per_class, seed, cfg)
    tree = task["tree"]
    if group == "linear":
        x_train, x_test = task["x_train"].flatten(1), task["x_test"].flatten(1)
        make_model = lambda: mlp(x_train.shape[1], tree.num_classes, 0)  # noqa: E731
    else:
        x_train, x_test = task["x_train"], task["x_test"]
        make_model = lambda: cnn(tree.num_classes, cfg["cnn_width"])  # noqa: E731
    t0 = time.process_time()
    model, info = fit_tuned(
        make_model,
        lambda hp: make_loss(loss, tree, hp),
        loss,
        x_train,
        task["y_train"],
        protocol=cfg["protocol"],
        seed=seed,
        score=_top1,
    )
    with torch.no_grad():
        result = tree_metrics(model(x_test), task["y_test"], tree)
    chosen = {k: info[k] for k in ("lr", "hp", "best_epoch", "epochs", "val_score")}
    return {**result, "chosen": chosen, "cpu_s": time.process_time() - t0}


# ---------------------------------------------------------------------- configuration and run


def configuration(quick: bool, seeds: int, smoke: bool = False) -> dict[str, Any]:
    q = quick or smoke
    return {
        "experiment": "proxy",
        "seeds": seeds,
        "losses": list(LOSSES),
        "classes": 10 if smoke else 50 if quick else 100,
        "protocol": {
            "val_fraction": 0.2,
            "budget": 1 if smoke else 1 if quick else 3,
            "lr_range": [5e-4, 5e-3],
            "batch": 64,
            "max_epochs": 1 if smoke else 8 if quick else 40,
            "patience": 1 if smoke else 2 if quick else 4,
            "select": "validation top-1",
        },
        "generator": {
            "latent_dim": 16,
            "nuisance_dim": 8,
            "width": 64,
            "sigma_within": 0.6,
            "max_shift": 2,
            "contrast": 0.3,
            "brightness": 0.3,
            "pixel_noise": 0.1,
        },
        "cnn_width": 16,
        "test_per_class": 2 if smoke else 10,
        "per_class": [3] if smoke else [20] if q else [5, 20, 50],
        "control_per_class": 3 if smoke else 20 if q else 50,
        "linear_per_class": 3 if smoke else 20 if q else 50,
    }


def units(cfg: dict[str, Any]) -> list[tuple[str, int, str, int]]:
    """The run's units (group, examples a class, loss, seed), in the order they are computed."""
    out: list[tuple[str, int, str, int]] = []
    for s in range(cfg["seeds"]):
        out += [("imagenet", k, loss, s) for k in cfg["per_class"] for loss in LOSSES]
        out += [(g, cfg["control_per_class"], loss, s) for g in GROUPS[1:] for loss in LOSSES]
        out.append(("linear", cfg["linear_per_class"], "ce", s))
    return out


@on_small_model_cpu
def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    out = runner.output_folder(args.out)
    seeds = num_seeds(args, 5)
    cfg = configuration(args.quick, seeds, args.smoke)
    ckpt = runner.Checkpoint(out, cfg, resume=args.resume)
    results = runner.run_units(
        ckpt,
        units(cfg),
        lambda g, k, loss, s: run_unit(g, k, loss, s, cfg),
        "proxy",
        not args.no_progress,
        args.workers,
    )

    record = {"config": cfg, "results": results}
    header = runner.report_header("Proxy: a frozen random generator on the ImageNet tree, CNN from scratch", cfg)
    runner.publish(out, record, [header, verdicts(record), render(record)])
    _plot(results, cfg["per_class"], out / "proxy_sweep.png")
    hierarchy.pareto(results, out / "proxy_pareto.png")
    _samples(cfg, out / "proxy_samples.png")
    names = ["report.md", "results.json", "proxy_sweep.png", "proxy_pareto.png", "proxy_samples.png"]
    runner.wrote(out, names, time.perf_counter() - t0)
    return 0


# ---------------------------------------------------------------------- report


TITLES = {
    "imagenet": "ImageNet tree, generator on the same tree",
    "shuffled": "control: labels shuffled over the leaves",
    "mismatched": "control: generator on a random tree, loss on the ImageNet tree",
}


def render(record: dict[str, Any]) -> str:
    """The report's tables from a run's ``{"config", "results"}``."""
    res = record["results"]
    text = [group_report(group, by_loss) for group, by_loss in res.items() if not group.startswith("linear/")]
    text += [linear_report(group, res) for group in res if group.startswith("linear/")]
    text.append(
        "Test split, mean ± std over seeds; paired differences to cross-entropy with 95 % percentile-bootstrap "
        "intervals over the seeds. Higher is better for top1/top5; lower for the others (LCA height and path "
        "length over the mistakes only). distinct_pred: number of different predicted classes; pred_depth: mean "
        "hop depth of the predicted classes. All metrics on the ImageNet tree restricted to the seed's classes.\n"
    )
    return "\n".join(text)


def is_full(config: dict[str, Any]) -> bool:
    """Whether ``config`` is the full configuration (any number of seeds >= 5), the one verdicts may rest on."""
    return config["seeds"] >= 5 and {**config, "seeds": 5} == configuration(False, 5)


def group_report(group: str, by_loss: dict[str, list[dict[str, Any]]]) -> str:
    """The markdown section of one (group, images a class): :func:`.hierarchy.group_report` under this group's title."""
    g, k = group.split("/")
    return hierarchy.group_report(group, by_loss, heading=f"{TITLES[g]}, {k} training images a class")


def linear_report(group: str, results: dict[str, Any]) -> str:
    """The nonlinearity check: cross-entropy with a linear model on the pixels against the CNN (same data)."""
    k = group.split("/")[1]
    cnn_runs = results.get(f"imagenet/{k}", {}).get("ce")
    lin = results[group]["ce"]
    rows = [["linear on pixels, ce", *(f"{summarize(lin, ['top1', 'top5'])[m][0]:.3f}" for m in ("top1", "top5"))]]
    diff = "—"
    if cnn_runs:
        s = summarize(cnn_runs, ["top1", "top5"])
        rows.insert(0, ["CNN, ce", f"{s['top1'][0]:.3f}", f"{s['top5'][0]:.3f}"])
        d, lo, hi = runner.paired_bootstrap([r["top1"] for r in cnn_runs], [r["top1"] for r in lin])
        diff = f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]"
    return (
        f"## Check: is a representation needed? ({k} training images a class)\n\n"
        + runner.markdown_table(["model", "top1", "top5"], rows)
        + f"\n\nCNN - linear top-1, paired over seeds: {diff}\n"
    )


def verdicts(record: dict[str, Any]) -> str:
    """Per (group, images a class) and loss: does it beat cross-entropy in top-1, and make milder mistakes
    (:func:`.training.versus_baseline` with :mod:`.hierarchy`'s losses and metrics)? In the controls a "better"
    would mean the gain does not come from the tree matching the data. The linear check is not a loss: no rows."""
    res = {g: by_loss for g, by_loss in record["results"].items() if not g.startswith("linear/")}
    table = verdict_table(
        versus_baseline(res, VERDICT_LOSSES, VERDICT_METRICS), VERDICT_METRICS, record["config"]["seeds"]
    )
    return "## Claim 2 verdicts (proxy): does a loss beat cross-entropy in top-1?\n\n" + table


def claim_summary(record: dict[str, Any]) -> str:
    """One sentence for the README: the EMD-family losses' top-1 against cross-entropy at the controls' size, with
    the tree matching the generator and in the two controls."""
    k = record["config"]["control_per_class"]
    parts = []
    for group in GROUPS:
        rows = versus_baseline(
            {group: record["results"].get(f"{group}/{k}", {})}, ("emd", "relaxed", "ce+relaxed"), VERDICT_METRICS
        )
        parts.append(f"{group} {verdict_counts(rows, 'top1')}")
    return (
        f"Claim 2 on the image proxy (CNN from scratch, {k} images a class), the EMD-family losses' top-1 against "
        "cross-entropy: " + "; ".join(parts) + "."
    )


def _plot(results: dict[str, Any], sizes: list[int], path: Path) -> None:
    hierarchy._plot(
        results,
        sizes,
        path,
        xlabel="training images a class",
        title="Proxy: frozen random generator on the ImageNet tree, CNN from scratch",
    )


def _samples(cfg: dict[str, Any], path: Path, num_classes: int = 8, per_class: int = 6) -> None:
    """A grid of training images of seed 0: one row a class (the first ``num_classes`` of the seed)."""
    task = make_task("imagenet", per_class, 0, cfg)
    plt = runner.pyplot()
    c = min(num_classes, task["tree"].num_classes)
    fig, axes = plt.subplots(c, per_class, figsize=(per_class, c), squeeze=False)
    for i in range(c):
        for j in range(per_class):
            axes[i][j].imshow(task["x_train"][i * per_class + j, 0].numpy(), cmap="gray")
            axes[i][j].axis("off")
    runner.save_figure(fig, path)
