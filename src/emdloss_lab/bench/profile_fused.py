"""Where the fused CPU path spends its time: each stage of one batch, timed separately.

    python -m emdloss_lab.bench.profile_fused [--rho 1] [--batch 256] [--soft] [--chain] [--kernel auto|lanes|one-row]

Prints the 20th-percentile time of: F.cross_entropy forward+backward (the yardstick), torch's softmax (for
scale), the fused numba kernel alone (softmax, loss and gradient), the input checks, and EMDLoss forward and
forward+backward. The tree is ImageNet's (needs the shared data, ``emdloss_lab.data.imagenet_tree``), or a chain
of 1,000 classes with ``--chain``. ``--kernel`` forces the eight-row lane kernel or the one-row kernel (default:
the choice ``lanes_pay_off`` makes for the batch). See docs/speed.md.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from emdloss import EMDLoss, Tree
from emdloss._inputs import normalise
from emdloss.backends import numba_kernels
from emdloss.backends.numba_kernels import lane_kernels
from emdloss_lab.bench.harness import wait_for_kernel_compiles
from emdloss_lab.data import imagenet_tree


def timed(fn, n: int = 300) -> float:
    """20th-percentile wall time of ``fn()`` in ms, after a warm-up."""
    for _ in range(10):
        fn()
    wait_for_kernel_compiles()
    fn()
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return float(np.percentile(samples, 20) * 1e3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rho", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--soft", action="store_true", help="soft targets instead of class indices")
    parser.add_argument("--chain", action="store_true", help="a chain of 1,000 classes instead of ImageNet's tree")
    parser.add_argument("--kernel", choices=["auto", "lanes", "one-row"], default="auto", help="force a tree kernel")
    args = parser.parse_args()
    if args.kernel != "auto":
        lane_kernels.lanes_pay_off = lambda *_: args.kernel == "lanes"
    tree = Tree.chain(1000) if args.chain else imagenet_tree()
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(args.batch, tree.num_classes, generator=gen) * 2).requires_grad_()
    y = torch.randint(0, tree.num_classes, (args.batch,), generator=gen)
    q = torch.softmax(torch.randn(args.batch, tree.num_classes, generator=gen), 1)
    target = q if args.soft else y
    loss_fn = EMDLoss(tree, rho=args.rho)

    def ce() -> None:
        x.grad = None
        F.cross_entropy(x, y).backward()

    def fwd_bwd() -> None:
        x.grad = None
        loss_fn(x, target).backward()

    stages = {
        "F.cross_entropy fwd+bwd": ce,
        "softmax": lambda: torch.softmax(x.detach(), 1),
        "fused kernel (softmax, loss, gradient)": lambda: numba_kernels.tree_rows(
            x.detach().numpy(),
            None if args.soft else y.numpy(),
            q.numpy() if args.soft else None,
            tree,
            args.rho,
            True,
            True,
        ),
        "input normalisation": lambda: normalise(
            x, target, tree.num_classes, from_logits=True, ignore_index=-100, validate=None, reduction="mean"
        ),
        "EMDLoss forward": lambda: loss_fn(x, target),
        "EMDLoss fwd+bwd": fwd_bwd,
    }
    kind = "chain of 1,000" if args.chain else "ImageNet tree"
    print(
        f"{kind}, batch {args.batch}, {'soft' if args.soft else 'hard'} targets, rho={args.rho}, "
        f"{torch.get_num_threads()} threads, kernel {args.kernel}"
    )
    for name, fn in stages.items():
        print(f"  {name:40s} {timed(fn):.3f} ms")


if __name__ == "__main__":
    main()
