"""``emdloss train-imagenet``: the paper's small-data ImageNet run (``--per-class 50``) with any loss.

    emdloss train-imagenet --root /data/imagenet --isa wordnet.is_a.txt --per-class 50 --loss relaxed \\
        --arch resnet18 --epochs 90 --out runs/relaxed50
    torchrun --nproc_per_node 8 -m emdloss train-imagenet ...          # multi-GPU (DDP)

Data: ``ROOT/train/<wnid>/*`` and, if present, ``ROOT/val/<wnid>/*`` (ImageFolder layout; classes are the sorted
wnid folder names of ``train``, the standard class order). ``--per-class K`` keeps K training images a class,
chosen by ``--seed`` from the sorted file list. The tree comes from an is-a edge file (``--isa``, e.g. ImageNet's
``wordnet.is_a.txt``; the DAG is resolved by :func:`emdloss.hierarchies.from_isa_file`); without ``--isa`` the
project's ImageNet-1k tree is used when the classes are exactly its 1,000 wnids.

Models and images: with torchvision installed, ``torchvision.models.<arch>`` and the usual ImageNet
augmentation (random-resized crop 224 + flip; resize 256 + centre crop 224 to evaluate). Without torchvision
(PyPI's torchvision does not import beside torch 2.13.0 CPU on our machine), a small CNN of this module
(:class:`SmallCNN`, ``--arch small-cnn``) and a minimal PIL loader (resize to ``--image-size``, random flip); the
run says so on start. Losses: see :mod:`emdloss_lab.experiments.training` (``ce``, ``emd``, ``relaxed``,
``ce+relaxed``, ``hxe``, ``soft``). The loss is computed in float32 even under autocast.

Training: SGD with momentum 0.9, ``lr * global batch / 256``, cosine schedule, weight decay 1e-4; bf16/fp16
autocast on CUDA (``--amp``); DDP with a DistributedSampler when ``WORLD_SIZE > 1`` (launch with torchrun).
After every epoch, rank 0 writes ``OUT/last.pt`` atomically (model, optimizer, scaler, epoch) and
``OUT/results.json`` (per-epoch metrics); ``--resume`` continues from ``last.pt``. The data order and the
augmentation of an epoch depend only on (seed, epoch), so a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from emdloss.tree import Tree

from ..errors import UsageError
from . import runner
from .training import LOSSES, make_loss

#: what ``emdloss train-imagenet --help`` says
DESCRIPTION = (
    "Train on ImageNet (or any folder of images in the ImageFolder layout, with an is-a file for its classes) in "
    "the paper's small-data regime, --per-class training images a class, with any of the losses. Needs the "
    "images: --root DIR holding train/<wnid>/ and optionally val/<wnid>/. After every epoch it writes "
    "OUT/last.pt and OUT/results.json (--resume continues from last.pt). Several GPUs: torchrun "
    "--nproc_per_node N -m emdloss train-imagenet ..."
)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".webp", ".tif", ".tiff")
LAYOUT = "it must hold train/<wnid>/<images> (and optionally val/<wnid>/<images>), one folder a class"


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one, else the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def default_workers() -> int:
    """Data-loading processes per training process: the CPUs available, shared among the processes torchrun
    starts on this machine (``LOCAL_WORLD_SIZE``), at most 8 (beyond that image decoding rarely helps)."""
    per_node = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return min(8, available_cpus() // per_node)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    positive, nonnegative = runner.positive_int, runner.nonnegative_int
    parser.add_argument(
        "--root",
        required=True,
        help="ImageNet folder holding train/<wnid>/<images> (and optionally val/<wnid>/<images>)",
    )
    parser.add_argument("--out", default="imagenet-run", help="output folder (last.pt checkpoint, results.json)")
    parser.add_argument(
        "--isa",
        default=None,
        help="is-a edge file, 'PARENT CHILD' wnids per line (e.g. ImageNet's wordnet.is_a.txt); "
        "default: the project's ImageNet-1k tree, for exactly the 1,000 ImageNet-1k classes",
    )
    parser.add_argument("--per-class", type=nonnegative, default=50, help="training images a class (0 = all)")
    parser.add_argument("--loss", choices=LOSSES, default="ce", help="training loss")
    parser.add_argument("--arch", default="resnet18", help="torchvision model name, or small-cnn")
    parser.add_argument("--epochs", type=positive, default=90, help="epochs in total")
    parser.add_argument("--batch-size", type=positive, default=256, help="images per step and process")
    parser.add_argument(
        "--lr", type=float, default=0.1, help="learning rate for a global batch of 256 (scaled linearly)"
    )
    parser.add_argument("--weight-decay", type=float, default=1e-4, help="SGD weight decay")
    parser.add_argument("--image-size", type=positive, default=224, help="side of the square input images")
    parser.add_argument(
        "--workers",
        type=nonnegative,
        default=default_workers(),
        help="data-loading processes per training process (0: load in the training process; "
        "default: %(default)s, the CPUs available here, at most 8)",
    )
    parser.add_argument("--amp", choices=("bf16", "fp16", "off"), default="bf16", help="autocast dtype on CUDA")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subsample, the data order and the weights")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pt, with the same options")
    parser.add_argument(
        "--stop-after",
        type=positive,
        default=None,
        help="end this invocation after this many epochs in total (for time-limited jobs; "
        "continue later with --resume)",
    )
    parser.add_argument(
        "--device", default=None, help="torch device, e.g. cuda:1 (default: cuda if available, else cpu)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


# ---------------------------------------------------------------------- data


def list_images(folder: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """Classes (sorted sub-folder names) and (path, class index) pairs in sorted order, as ImageFolder."""
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    if not classes:
        raise ValueError(f"{folder} has no class sub-folders")
    samples = [
        (str(p), i)
        for i, c in enumerate(classes)
        for p in sorted((folder / c).rglob("*"))
        if p.suffix.lower() in IMAGE_EXTENSIONS
    ]
    return classes, samples


def subsample(samples: list[tuple[str, int]], per_class: int, seed: int) -> list[tuple[str, int]]:
    """``per_class`` samples of each class (all if fewer or ``per_class <= 0``), chosen by ``seed``."""
    if per_class <= 0:
        return samples
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[tuple[str, int]]] = {}
    for s in samples:
        by_class.setdefault(s[1], []).append(s)
    kept = []
    for c in sorted(by_class):
        items = by_class[c]
        idx = np.sort(rng.permutation(len(items))[:per_class])
        kept += [items[i] for i in idx]
    return kept


class PILImageDataset(torch.utils.data.Dataset):
    """Minimal ImageFolder stand-in: RGB, resized to ``size`` x ``size``, ImageNet-normalised, optional flip.

    The flip of item ``i`` in epoch ``e`` is drawn from a generator seeded by (seed, e, i), so the augmentation
    is reproducible across resumes and independent of worker scheduling.
    """

    MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
    STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

    def __init__(self, samples: list[tuple[str, int]], size: int, train: bool, seed: int = 0) -> None:
        self.samples, self.size, self.train, self.seed, self.epoch = samples, size, train, seed, 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        path, label = self.samples[i]
        with Image.open(path) as im:
            im = im.convert("RGB").resize((self.size, self.size), Image.BILINEAR)
            x = (np.asarray(im, dtype=np.float32) / 255.0 - self.MEAN) / self.STD
        if self.train and np.random.default_rng([self.seed, self.epoch, i]).random() < 0.5:
            x = x[:, ::-1]
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))), label


def torchvision_datasets(train: list[tuple[str, int]], val: list[tuple[str, int]], size: int) -> tuple[Any, Any]:
    import torchvision.transforms as T
    from torchvision.datasets.folder import default_loader

    norm = T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    tf_train = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    tf_val = T.Compose([T.Resize(int(size * 256 / 224)), T.CenterCrop(size), T.ToTensor(), norm])

    class _Folder(torch.utils.data.Dataset):
        def __init__(self, samples: list[tuple[str, int]], tf: Any) -> None:
            self.samples, self.tf, self.epoch = samples, tf, 0

        def __len__(self) -> int:
            return len(self.samples)

        def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
            path, label = self.samples[i]
            return self.tf(default_loader(path)), label

    return _Folder(train, tf_train), _Folder(val, tf_val)


# ---------------------------------------------------------------------- models


class SmallCNN(nn.Module):
    """Four conv-BN-ReLU blocks (32-64-128-256 channels, stride 2 from the second on), global average pooling and
    a linear classifier: the fallback model when torchvision is absent."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for i, c in enumerate((32, 64, 128, 256)):
            layers += [
                nn.Conv2d(c_in, c, 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                nn.BatchNorm2d(c),
                nn.ReLU(inplace=True),
            ]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean((2, 3)))


def has_torchvision() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # ImportError, or a binary mismatch with the installed torch
        return False
    return True


def build_model(arch: str, num_classes: int) -> tuple[nn.Module, str]:
    if arch == "small-cnn":
        return SmallCNN(num_classes), "small-cnn"
    if has_torchvision():
        import torchvision.models as tvm

        if not hasattr(tvm, arch):
            raise UsageError(f"--arch {arch!r} is not a torchvision model: use a name such as resnet18, or small-cnn")
        return getattr(tvm, arch)(num_classes=num_classes), arch
    print(
        f"emdloss: torchvision is not importable here; using the package's SmallCNN instead of {arch!r}",
        file=sys.stderr,
    )
    return SmallCNN(num_classes), "small-cnn"


def build_tree(classes: list[str], isa: str | None) -> Tree:
    if isa is not None:
        from emdloss.hierarchies import from_isa_file

        if not Path(isa).is_file():
            raise UsageError(f"--isa {isa}: no such file (it should list is-a edges, 'PARENT CHILD' wnids a line)")
        try:
            return from_isa_file(isa, classes)
        except (ValueError, UnicodeDecodeError) as exc:  # TreeError is a ValueError
            raise UsageError(f"--isa {isa} gives no tree over the {len(classes)} class folders: {exc}") from exc
    from ..data import DataUnavailable, imagenet_tree

    try:
        tree = imagenet_tree()
    except DataUnavailable as exc:
        raise DataUnavailable(f"without --isa FILE the ImageNet-1k tree comes from the shared data: {exc}") from exc
    names = [tree.names[int(v)] for v in tree.classes]
    if names != classes:
        raise UsageError(
            f"the {len(classes)} class folders are not the 1,000 ImageNet-1k wnids: pass their "
            "hierarchy with --isa FILE"
        )
    return tree


# ---------------------------------------------------------------------- training


def _distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank); initialises torch.distributed when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world, local


def check_root(root: Path) -> None:
    """A :class:`UsageError` unless ``root`` holds a ``train/`` folder."""
    if not root.is_dir():
        raise UsageError(f"--root {root}: no such folder; {LAYOUT}")
    if not (root / "train").is_dir():
        raise UsageError(f"--root {root} has no train/ folder; {LAYOUT}")


def pick_device(name: str | None, local_rank: int) -> torch.device:
    """``--device`` (checked), else cuda:LOCAL_RANK when CUDA is available, else cpu."""
    if not name:
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a torch device: use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError(f"--device {name}: no CUDA device is available here (use --device cpu)")
        if device.index is not None and device.index >= count:
            raise UsageError(f"--device {name}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    return device


def run(args: argparse.Namespace) -> int:
    """Train (see the module docstring). Torch's DataLoader repeats its too-many-workers warning at every
    loader; the run says it once instead."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="This DataLoader will create")
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    if args.per_class < 0 or args.epochs < 1 or args.batch_size < 1 or args.workers < 0:
        raise UsageError("--per-class and --workers must be >= 0, --epochs and --batch-size >= 1")
    root = Path(args.root)
    check_root(root)
    rank, world, local = _distributed()
    device = pick_device(args.device, local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    out = runner.output_folder(args.out) if rank == 0 else Path(args.out)
    if not args.resume and (out / "last.pt").exists():
        raise runner.CheckpointError(
            f"--out {out} already holds a run ({out / 'last.pt'}): pass --resume to continue "
            "it, or choose another --out"
        )
    try:
        classes, train_all = list_images(root / "train")
        val_samples: list[tuple[str, int]] = []
        if (root / "val").is_dir():
            val_classes, val_samples = list_images(root / "val")
            if val_classes != classes:
                raise ValueError(f"{root / 'val'} has other class folders than {root / 'train'}")
    except (OSError, ValueError) as exc:
        raise UsageError(f"--root {root}: {exc}; {LAYOUT}") from exc
    if not train_all:
        raise UsageError(f"--root {root}: no images ({', '.join(IMAGE_EXTENSIONS)}) under {root / 'train'}")
    train_samples = subsample(train_all, args.per_class, args.seed)
    tree = build_tree(classes, args.isa)
    runner.seed_everything(args.seed)  # the initial weights depend on the seed only
    model, arch = build_model(args.arch, len(classes))
    use_tv = arch != "small-cnn"
    if use_tv:
        train_ds, val_ds = torchvision_datasets(train_samples, val_samples, args.image_size)
    else:
        train_ds = PILImageDataset(train_samples, args.image_size, train=True, seed=args.seed)
        val_ds = PILImageDataset(val_samples, args.image_size, train=False)
    ignored = ("resume", "no_progress", "workers", "device", "stop_after", "debug")
    config = {k: v for k, v in vars(args).items() if not k.startswith("_") and k not in ignored}
    config.update(
        {
            "arch_used": arch,
            "num_classes": len(classes),
            "train_images": len(train_samples),
            "val_images": len(val_samples),
            "world_size": world,
            "tree_nodes": tree.num_nodes,
        }
    )
    model.to(device)
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    criterion = make_loss(args.loss, tree)
    if isinstance(criterion, nn.Module):
        criterion.to(device)
    lr = args.lr * args.batch_size * world / 256
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=args.weight_decay)
    steps_per_epoch = max(1, math.ceil(len(train_ds) / (args.batch_size * world)))
    total_steps = steps_per_epoch * args.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps))
    )
    amp = device.type == "cuda" and args.amp != "off"
    amp_dtype = torch.bfloat16 if args.amp == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=amp and amp_dtype == torch.float16)

    start_epoch, history = 0, []
    ckpt_path = out / "last.pt"
    if args.resume and ckpt_path.exists():
        try:
            state = torch.load(ckpt_path, map_location=device, weights_only=False)
        except Exception as exc:  # a truncated or foreign file: pickle, zip and EOF errors alike
            raise runner.CheckpointError(
                f"checkpoint {ckpt_path} cannot be read ({exc.__class__.__name__}: {exc}); delete it to start over"
            ) from None
        if state["config"] != runner.to_jsonable(config):
            changed = runner.config_changes(state["config"], config)
            raise runner.CheckpointError(
                f"--resume: {ckpt_path} belongs to a different configuration ({changed}); resume with the options "
                "of the earlier run, or use another --out for the new ones"
            )
        (model.module if world > 1 else model).load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, history = state["epoch"], state["history"]

    if rank == 0:
        resumed = f", resuming after epoch {start_epoch}" if start_epoch else ""
        print(
            f"emdloss train-imagenet: {len(classes)} classes, {len(train_samples)} training images "
            f"({args.per_class or 'all'} a class), {len(val_samples)} validation images, {arch}, loss {args.loss}, "
            f"{world} process(es) on {device}; writing to {os.path.join(str(out), '')}{resumed}",
            file=sys.stderr,
        )
        cpus = available_cpus()
        if args.workers > cpus:
            print(
                f"emdloss train-imagenet: note: --workers {args.workers} is more than the {cpus} CPUs available "
                f"here; loading may be slower than with --workers {cpus}",
                file=sys.stderr,
            )

    sampler = (
        torch.utils.data.distributed.DistributedSampler(train_ds, world, rank, shuffle=True, seed=args.seed)
        if world > 1
        else None
    )
    last_epoch = args.epochs if args.stop_after is None else min(args.epochs, args.stop_after)
    for epoch in range(start_epoch, last_epoch):
        t0 = time.perf_counter()
        train_ds.epoch = epoch
        if sampler is not None:
            sampler.set_epoch(epoch)
            order = None
        else:
            order = torch.randperm(len(train_ds), generator=torch.Generator().manual_seed(args.seed * 100003 + epoch))
        loader = torch.utils.data.DataLoader(
            train_ds,
            batch_size=args.batch_size,
            sampler=sampler if sampler is not None else order.tolist(),
            num_workers=args.workers,
            pin_memory=device.type == "cuda",
            drop_last=False,
            persistent_workers=False,
        )
        model.train()
        total, count = 0.0, 0
        bar = runner.progress(loader, f"epoch {epoch + 1}/{args.epochs}", enabled=rank == 0 and not args.no_progress)
        for x, y in bar:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
                logits = model(x)
            loss = criterion(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            total += float(loss.detach()) * len(y)
            count += len(y)
        record = {
            "epoch": epoch + 1,
            "train_loss": total / max(count, 1),
            "lr": sched.get_last_lr()[0],
            "seconds": time.perf_counter() - t0,
        }
        if val_samples:
            record.update(evaluate(model, val_ds, tree, device, args, world, rank, amp, amp_dtype))
        history.append(record)
        if rank == 0:
            runner.torch_save(
                {
                    "model": (model.module if world > 1 else model).state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "scaler": scaler.state_dict(),
                    "epoch": epoch + 1,
                    "history": history,
                    "config": runner.to_jsonable(config),
                },
                ckpt_path,
            )
            runner.write_json(
                out / "results.json",
                {
                    "config": config,
                    "history": history,
                    "machine": runner.machine_info(),
                    "command": runner.command_line(),
                },
            )
            print(
                " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()),
                file=sys.stderr,
            )
    if rank == 0:
        if start_epoch >= last_epoch:
            print(
                f"emdloss train-imagenet: {ckpt_path} already holds {start_epoch} epoch(s); nothing to train",
                file=sys.stderr,
            )
        else:
            runner.wrote(out, ["last.pt", "results.json"], time.perf_counter() - t_start)
    return 0


@torch.no_grad()
def evaluate(
    model: nn.Module,
    ds: Any,
    tree: Tree,
    device: torch.device,
    args: argparse.Namespace,
    world: int,
    rank: int,
    amp: bool,
    amp_dtype: torch.dtype,
) -> dict[str, float]:
    """Validation metrics (top-1/5; mistake severity and hdist@5, each as LCA height and as path length; EMD),
    summed across processes by torchmetrics."""
    from emdloss.metrics import HierarchicalMetrics

    sampler = (
        torch.utils.data.distributed.DistributedSampler(ds, world, rank, shuffle=False, drop_last=False)
        if world > 1
        else None
    )
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers)
    m = HierarchicalMetrics(tree, k=min(5, tree.num_classes)).to(device)
    model.eval()
    for x, y in loader:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
            logits = model(x.to(device))
        m.update(logits.float(), y.to(device))
    return {f"val_{k}": float(v) for k, v in m.compute().items()}
