"""`emdloss train-imagenet` end to end on CPU: a tiny generated ImageFolder (random PNGs), a small is-a tree,
checkpoint, and a resumed run that repeats an uninterrupted one."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

PIL = pytest.importorskip("PIL.Image")

from emdloss_lab.cli import main  # noqa: E402
from emdloss_lab.experiments import imagenet  # noqa: E402
from emdloss_lab.experiments.runner import CheckpointError  # noqa: E402

WNIDS = ["n01", "n02", "n03", "n04"]
ISA = "n00 n10\nn00 n20\nn10 n01\nn10 n02\nn20 n03\nn20 n04\n"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for split, n in (("train", 5), ("val", 2)):
        for c, w in enumerate(WNIDS):
            (root / split / w).mkdir(parents=True)
            for i in range(n):
                img = (rng.random((12, 12, 3)) * 60 + 60 * c).astype(np.uint8)  # class-dependent brightness
                PIL.fromarray(img).save(root / split / w / f"img{i}.png")
    (root / "isa.txt").write_text(ISA)
    return root


def _args(root, out, epochs, loss="relaxed", *extra):
    return [
        "train-imagenet",
        "--root",
        str(root),
        "--isa",
        str(root / "isa.txt"),
        "--out",
        str(out),
        "--per-class",
        "3",
        "--loss",
        loss,
        "--arch",
        "small-cnn",
        "--epochs",
        str(epochs),
        "--batch-size",
        "4",
        "--image-size",
        "16",
        "--workers",
        "0",
        "--lr",
        "0.05",
        "--no-progress",
        *extra,
    ]


def test_listing_subsampling_and_tree(folder) -> None:
    classes, samples = imagenet.list_images(folder / "train")
    assert classes == WNIDS and len(samples) == 20
    sub = imagenet.subsample(samples, 3, seed=1)
    assert [sum(1 for _, y in sub if y == c) for c in range(4)] == [3, 3, 3, 3]
    assert sub == imagenet.subsample(samples, 3, seed=1) and sub != imagenet.subsample(samples, 3, seed=2)
    tree = imagenet.build_tree(classes, str(folder / "isa.txt"))
    d = tree.distance_matrix()
    assert d[0, 1] < d[0, 2]  # n01 and n02 share the parent n10


def test_small_cnn_shapes() -> None:
    assert imagenet.SmallCNN(7)(torch.zeros(2, 3, 16, 16)).shape == (2, 7)


@pytest.mark.parametrize("loss", ["ce", "hxe"])
def test_other_losses_train(folder, tmp_path, loss) -> None:
    assert main(_args(folder, tmp_path / loss, 1, loss)) == 0
    hist = json.loads((tmp_path / loss / "results.json").read_text())["history"]
    assert len(hist) == 1 and np.isfinite(hist[0]["train_loss"])


def test_train_checkpoint_and_resume_equal_uninterrupted(folder, tmp_path, capsys) -> None:
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(_args(folder, full, 2)) == 0
    said = capsys.readouterr()
    assert f"writing to {full}{os.sep}" in said.err
    assert said.out.rstrip().splitlines()[-1].startswith(f"wrote last.pt and results.json to {full}{os.sep}")
    res = json.loads((full / "results.json").read_text())
    assert res["config"]["arch_used"] == "small-cnn" and res["config"]["train_images"] == 12
    hist = res["history"]
    assert [h["epoch"] for h in hist] == [1, 2]
    for h in hist:
        # 4 classes: top-k and hdist@k use k = min(5, classes) = 4
        assert 0.0 <= h["val_top1"] <= h["val_top4"] <= 1.0 and h["val_count"] == 8
        assert np.isfinite(h["train_loss"]) and np.isfinite(h["val_emd"])

    assert main(_args(folder, part, 2, "relaxed", "--stop-after", "1")) == 0  # stop after one epoch ...
    capsys.readouterr()
    assert main(_args(folder, part, 2)) == 2
    err = capsys.readouterr().err
    assert err.startswith("emdloss: error: ") and err.count("\n") == 1 and "--resume" in err
    assert main(_args(folder, part, 3, "relaxed", "--resume")) == 2
    assert "different configuration (epochs 2 -> 3)" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="different configuration"):
        main(["--debug", *_args(folder, part, 3, "relaxed", "--resume")])
    assert main(_args(folder, part, 2, "relaxed", "--resume")) == 0  # ... and continue to two
    hist2 = json.loads((part / "results.json").read_text())["history"]
    drop = {"seconds"}
    assert [{k: v for k, v in h.items() if k not in drop} for h in hist2] == [
        {k: v for k, v in h.items() if k not in drop} for h in hist
    ]
    a = torch.load(full / "last.pt", weights_only=False)["model"]
    b = torch.load(part / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_root_is_a_clear_error(tmp_path, capsys) -> None:
    assert main(["train-imagenet", "--root", str(tmp_path / "nothing"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"emdloss: error: --root {tmp_path / 'nothing'}: no such folder")
    with pytest.raises(FileNotFoundError, match="image folder not found"):  # the function itself, for API users
        imagenet.list_images(tmp_path / "nothing")


def test_other_mistakes_are_clear_errors(folder, tmp_path, capsys) -> None:
    (tmp_path / "bad-isa.txt").write_text("only-one-column\n")
    for extra, words in (
        (["--isa", str(tmp_path / "missing.txt")], "--isa"),
        (["--isa", str(tmp_path / "bad-isa.txt")], "--isa"),
        (["--isa", str(folder / "isa.txt"), "--arch", "no-such-net"], "--arch"),
    ):
        argv = [
            "train-imagenet",
            "--root",
            str(folder),
            "--out",
            str(tmp_path / "o"),
            "--epochs",
            "1",
            "--workers",
            "0",
            "--no-progress",
            *extra,
        ]
        if extra[-1] == "no-such-net" and not imagenet.has_torchvision():
            continue  # without torchvision any --arch falls back to the small CNN
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("emdloss: error: ") and words in err
