"""Where the shared real data lives, and the hierarchies built from it that tests, benchmarks and
experiments use. Data is read in place and never copied (some files are non-commercial)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from emdloss import Tree
from emdloss.hierarchies import from_isa_file, read_isa, read_words

ENV_VAR = "EMDLOSS_DATA"


class DataUnavailable(FileNotFoundError):
    """The shared data folder (or a file in it) is not on this machine."""


def shared_data_dir() -> Path:
    """The shared data folder: ``$EMDLOSS_DATA``, else the first ``shared/data`` found next to the current
    folder or any of its parents (the layout of this project's checkouts)."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    for base in (Path.cwd(), *Path.cwd().parents, Path(__file__).resolve().parent, *Path(__file__).resolve().parents):
        cand = base / "shared" / "data"
        if (cand / "PROVENANCE.md").exists():
            return cand
    raise DataUnavailable(
        f"shared data folder not found: set {ENV_VAR} to the folder that holds PROVENANCE.md "
        "(this project's checkouts keep it at ../shared/data)"
    )


def data_file(relative: str) -> Path:
    """A file under the shared data folder, or :class:`DataUnavailable` naming it."""
    path = shared_data_dir() / relative
    if not path.exists():
        raise DataUnavailable(f"shared data file missing: {path}")
    return path


def _isa_tree(isa_file: str, classes: list[str] | None) -> Tree:
    edges = read_isa(data_file(isa_file))
    if classes is None:
        parents = {p for p, _ in edges}
        classes = sorted({c for _, c in edges if c not in parents})
    return Tree.from_edges(edges, classes)


def imagenet_classes() -> list[str]:
    """The 1,000 ILSVRC-2012 wnids in the standard class-index order (sorted, as torchvision's ImageFolder)."""
    return data_file("hierarchies/timm/imagenet_synsets.txt").read_text().split()


def imagenet_tree() -> Tree:
    """ImageNet-1k WordNet tree ("ImageNet-H", Bertinetto et al. 2020; 1,372 nodes) with its 1,000 leaves as
    classes in the standard class-index order."""
    return _isa_tree("hierarchies/making-better-mistakes/imagenet_isa.txt", imagenet_classes())


def tiered_imagenet_tree() -> Tree:
    """tieredImageNet-H tree (843 nodes, 608 leaf classes in sorted wnid order)."""
    return _isa_tree("hierarchies/making-better-mistakes/tiered_imagenet_isa.txt", None)


def inaturalist19_tree() -> Tree:
    """iNaturalist-2019 taxonomy (1,190 nodes, 1,010 species ``nat0000``..``nat1009`` in id order)."""
    return _isa_tree("hierarchies/making-better-mistakes/inaturalist19_isa.txt", None)


def imagenet_wordnet_tree(**options: Any) -> Any:
    """The ImageNet-1k WordNet tree built from the raw WordNet 3.0 is-a DAG (1,860 nodes unpruned, 75 resolved
    from several parents; root ``n00001740``, entity); ``options`` as :func:`emdloss.hierarchies.from_isa_file`.
    :func:`imagenet_tree` is Bertinetto et al.'s hand-pruned version."""
    return from_isa_file(data_file("hierarchies/imagenet-wordnet/is_a.txt"), imagenet_classes(), **options)


def imagenet_words() -> dict[str, str]:
    """wnid -> first lemma, from ImageNet's ``words.txt``."""
    return read_words(data_file("hierarchies/imagenet-wordnet/words.txt"))
