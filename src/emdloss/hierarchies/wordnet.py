"""WordNet hierarchies: from ImageNet-style is-a edge files, or from nltk's WordNet corpus.

WordNet's noun hypernym graph is a DAG (restricted to the ImageNet-1k classes: 1,860 synsets, 75 of them
with several hypernyms). Both builders restrict it to the ancestor closure of the requested classes and
resolve several parents by the documented policy of :mod:`emdloss.hierarchies._dag` (default: keep the
deepest parent, ties to the first listed). Node names are wnids, ``n`` + the 8-digit synset offset
(``n01440764``), as ImageNet uses them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any, Literal, overload

from .._optional import require
from ..tree import Tree, TreeError
from ._dag import DagReport, check_policy, dag_to_tree

__all__ = ["from_isa_file", "from_nltk", "read_isa", "read_words"]


def read_isa(path: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """Read ``PARENT CHILD`` lines (whitespace separated; blank lines and ``#`` comments skipped)."""
    edges = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{path}:{lineno}: expected 'PARENT CHILD', got {line!r}")
            edges.append((parts[0], parts[1]))
    return edges


def read_words(path: str | os.PathLike[str]) -> dict[str, str]:
    """wnid -> first lemma from ImageNet's ``words.txt`` (``WNID<TAB>lemma, lemma, ...`` per line)."""
    out = {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            wnid, _, lemmas = line.rstrip("\n").partition("\t")
            if wnid:
                out[wnid] = lemmas.split(",")[0].strip()
    return out


def _finish(tree_report: tuple[Tree, DagReport], return_report: bool) -> Tree | tuple[Tree, DagReport]:
    return tree_report if return_report else tree_report[0]


# The overloads tell a type checker that the result is a (tree, report) pair exactly when return_report=True.
@overload
def from_isa_file(
    path: str | os.PathLike[str],
    classes: Sequence[str],
    *,
    multi_parent: str = "deepest",
    prune: bool = False,
    return_report: Literal[False] = False,
) -> Tree: ...


@overload
def from_isa_file(
    path: str | os.PathLike[str],
    classes: Sequence[str],
    *,
    multi_parent: str = "deepest",
    prune: bool = False,
    return_report: Literal[True],
) -> tuple[Tree, DagReport]: ...


@overload
def from_isa_file(
    path: str | os.PathLike[str],
    classes: Sequence[str],
    *,
    multi_parent: str = "deepest",
    prune: bool = False,
    return_report: bool = False,
) -> Tree | tuple[Tree, DagReport]: ...


def from_isa_file(
    path: str | os.PathLike[str],
    classes: Sequence[str],
    *,
    multi_parent: str = "deepest",
    prune: bool = False,
    return_report: bool = False,
) -> Tree | tuple[Tree, DagReport]:
    """Tree over ``classes`` (wnids, in output order) from an is-a edge file (``PARENT CHILD`` per line).

    Args:
        path: edge file, e.g. ImageNet's ``wordnet.is_a.txt`` (all WordNet 3.0 noun hypernym edges).
        classes: the model's classes, in output order.
        multi_parent: "deepest" | "shallowest" | "first" (see :mod:`emdloss.hierarchies._dag`).
        prune: contract chains of single-child non-class nodes (class distances unchanged).
        return_report: also return the :class:`DagReport` (how many nodes had several parents, ...).
    """
    return _finish(dag_to_tree(read_isa(path), classes, multi_parent=multi_parent, prune=prune), return_report)


def _wnid(synset: Any) -> str:
    return f"{synset.pos()}{synset.offset():08d}"


@overload
def from_nltk(
    classes: Sequence[Any],
    *,
    wordnet: Any = None,
    include_instances: bool = False,
    names: str = "wnid",
    multi_parent: str = "deepest",
    prune: bool = False,
    return_report: Literal[False] = False,
) -> Tree: ...


@overload
def from_nltk(
    classes: Sequence[Any],
    *,
    wordnet: Any = None,
    include_instances: bool = False,
    names: str = "wnid",
    multi_parent: str = "deepest",
    prune: bool = False,
    return_report: Literal[True],
) -> tuple[Tree, DagReport]: ...


@overload
def from_nltk(
    classes: Sequence[Any],
    *,
    wordnet: Any = None,
    include_instances: bool = False,
    names: str = "wnid",
    multi_parent: str = "deepest",
    prune: bool = False,
    return_report: bool = False,
) -> Tree | tuple[Tree, DagReport]: ...


def from_nltk(
    classes: Sequence[Any],
    *,
    wordnet: Any = None,
    include_instances: bool = False,
    names: str = "wnid",
    multi_parent: str = "deepest",
    prune: bool = False,
    return_report: bool = False,
) -> Tree | tuple[Tree, DagReport]:
    """Tree over ``classes`` from nltk's WordNet corpus (``pip install emdloss[nltk]`` and the corpus).

    Args:
        classes: wnids (``"n01440764"``), synset names (``"tench.n.01"``) or nltk ``Synset`` objects.
        wordnet: a WordNet corpus reader (default ``nltk.corpus.wordnet``). The corpus is never
            downloaded here; run ``nltk.download("wordnet")`` yourself.
        include_instances: also follow instance hypernyms (``@i``; ImageNet's is-a file has none).
        names: node names, "wnid" (``n01440764``) or "synset" (``tench.n.01``).
        multi_parent, prune, return_report: as in :func:`from_isa_file`.
    """
    check_policy(multi_parent)
    if names not in ("wnid", "synset"):
        raise ValueError(f"names must be 'wnid' or 'synset', got {names!r}")
    if wordnet is None:
        wordnet = _nltk_wordnet()
    synsets = [_to_synset(wordnet, c, k) for k, c in enumerate(classes)]
    label = _wnid if names == "wnid" else (lambda s: s.name())

    edges: list[tuple[str, str]] = []
    seen: set[str] = set()
    stack = list(synsets)
    while stack:  # walk up the hypernym DAG from the classes
        s = stack.pop()
        key = label(s)
        if key in seen:
            continue
        seen.add(key)
        ups: Iterable[Any] = s.hypernyms()
        if include_instances:
            ups = list(ups) + list(s.instance_hypernyms())
        for h in ups:
            edges.append((label(h), key))
            stack.append(h)
    return _finish(
        dag_to_tree(edges, [label(s) for s in synsets], multi_parent=multi_parent, prune=prune), return_report
    )


def _nltk_wordnet() -> Any:
    wordnet = require("nltk.corpus", "nltk", "emdloss.hierarchies.from_nltk").wordnet
    try:
        wordnet.ensure_loaded()
    except LookupError:
        raise LookupError(
            "nltk's WordNet corpus is not installed; run nltk.download('wordnet') once (emdloss never downloads it)"
        ) from None
    return wordnet


def _to_synset(wordnet: Any, c: Any, k: int) -> Any:
    if not isinstance(c, str):
        return c  # a Synset already
    if len(c) == 9 and c[0] in "nvasr" and c[1:].isdigit():
        try:
            return wordnet.synset_from_pos_and_offset(c[0], int(c[1:]))
        except Exception as exc:
            raise TreeError(f"classes[{k}] = {c!r} is not a WordNet synset: {exc}") from None
    try:
        return wordnet.synset(c)
    except Exception as exc:
        raise TreeError(f"classes[{k}] = {c!r} is neither a wnid nor a WordNet synset name: {exc}") from None
