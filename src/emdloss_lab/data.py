"""Where the shared real data lives, and the hierarchies built from it that tests, benchmarks and
experiments use. Data is read in place and never copied (some files are non-commercial)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from emdloss import Tree
from emdloss.hierarchies import from_isa_file, read_isa, read_words

from .errors import UsageError

ENV_VAR = "EMDLOSS_DATA"

#: what the shared data folder holds, for the messages that ask for it
CONTENTS = "PROVENANCE.md and the hierarchies/, ordinal/ and spectra/ folders it describes"
#: where it comes from, for the same messages
SOURCE = (
    f"set {ENV_VAR} to that folder, or run from a checkout that has shared/data beside it "
    "(emdloss demo needs none of it)"
)


class DataUnavailable(FileNotFoundError, UsageError):
    """The shared data folder (or a file in it) is not on this machine; the message says where it is looked for."""


def shared_data_dir() -> Path:
    """The shared data folder: ``$EMDLOSS_DATA``, else the first ``shared/data`` found next to the current
    folder or any of its parents (the layout of this project's checkouts)."""
    env = os.environ.get(ENV_VAR)
    if env:
        if not Path(env).is_dir():
            raise DataUnavailable(
                f"{ENV_VAR}={env} is not a folder: it must name the shared data folder, which holds {CONTENTS}"
            )
        return Path(env)
    for base in (Path.cwd(), *Path.cwd().parents, Path(__file__).resolve().parent, *Path(__file__).resolve().parents):
        cand = base / "shared" / "data"
        if (cand / "PROVENANCE.md").exists():
            return cand
    raise DataUnavailable(
        f"the shared data folder was not found: this command reads real data files ({CONTENTS}); {SOURCE}"
    )


def data_file(relative: str) -> Path:
    """A file under the shared data folder, or :class:`DataUnavailable` naming it."""
    folder = shared_data_dir()
    path = folder / relative
    if not path.exists():
        origin = f"from {ENV_VAR}" if os.environ.get(ENV_VAR) else "found beside the checkout"
        hint = (
            ""
            if (folder / "PROVENANCE.md").exists()
            else f"; it has no PROVENANCE.md, so {ENV_VAR} may name the wrong folder"
        )
        raise DataUnavailable(
            f"shared data file missing: {path} (data folder {folder}, {origin}{hint}); point {ENV_VAR} at a "
            f"complete copy of the shared data folder, which holds {CONTENTS}"
        )
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
