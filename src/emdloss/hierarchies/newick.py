"""Hierarchies from Newick strings, the usual format for taxonomies and phylogenies.

Supported: nested ``(a,b)c`` groups, branch lengths ``:0.5`` (also scientific notation), internal node
labels, single-quoted labels with ``''`` for a quote (``'Homo sapiens'``), ``[...]`` comments anywhere
between tokens (nested brackets allowed), whitespace and newlines between tokens. The parser is a loop
over tokens with an explicit stack, so 10^5-deep trees are fine.

Unquoted labels are kept as written (the Newick convention of turning ``_`` into a blank is off by
default; pass ``underscores_to_spaces=True``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np

from ..tree import Tree, TreeError

__all__ = ["NewickError", "from_newick"]

_PUNCT = "(),:;"


class NewickError(TreeError):
    """Malformed Newick text; the message gives the character offset."""


def _tokens(text: str) -> Iterator[tuple[str, str, int]]:
    """Yield ``(kind, value, offset)`` with kind in ``( ) , : ; label``; comments and blanks are skipped."""
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch.isspace():
            i += 1
        elif ch == "[":
            depth, j = 1, i + 1
            while j < n and depth:
                depth += {"[": 1, "]": -1}.get(text[j], 0)
                j += 1
            if depth:
                raise NewickError(f"unterminated [comment] starting at offset {i}")
            i = j
        elif ch in _PUNCT:
            yield ch, ch, i
            i += 1
        elif ch == "'":
            parts, j = [], i + 1
            while True:
                k = text.find("'", j)
                if k < 0:
                    raise NewickError(f"unterminated quoted label starting at offset {i}")
                parts.append(text[j:k])
                if k + 1 < n and text[k + 1] == "'":  # '' is an escaped quote
                    parts.append("'")
                    j = k + 2
                else:
                    break
            yield "qlabel", "".join(parts), i
            i = k + 1
        elif ch == "]":
            raise NewickError(f"unmatched ']' at offset {i}")
        else:
            j = i
            while j < n and not (text[j].isspace() or text[j] in _PUNCT or text[j] in "[]'"):
                j += 1
            yield "label", text[i:j], i
            i = j


def from_newick(
    text: str,
    classes: Sequence[str] | None = None,
    *,
    default_length: float = 1.0,
    internal_labels: str = "names",
    underscores_to_spaces: bool = False,
) -> Tree:
    """Parse one Newick tree (ending in ``;``) into a :class:`~emdloss.Tree`.

    Args:
        text: e.g. ``"((cat:1,dog:1)carnivora:2,(cow:1.5,'sperm whale':2)cetartiodactyla:1)mammalia;"``.
        classes: node names that are the model's outputs, in output order (default: the leaves in the
            order they appear in the text). Internal nodes may be classes.
        default_length: length of edges written without ``:length``.
        internal_labels: "names" uses internal labels as node names; "ignore" discards them (use this when
            they are support values such as ``95``, which repeat).
        underscores_to_spaces: turn ``_`` in unquoted labels into blanks (the Newick convention).

    Unlabelled nodes are named ``<node K>`` (K = their order of appearance). Raises
    :class:`NewickError` for malformed text and :class:`~emdloss.TreeError` for duplicate names or
    negative lengths.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a Newick string, got {type(text).__name__}")
    if internal_labels not in ("names", "ignore"):
        raise ValueError(f"internal_labels must be 'names' or 'ignore', got {internal_labels!r}")
    default_length = float(default_length)
    if not (math.isfinite(default_length) and default_length >= 0):
        raise ValueError(f"default_length must be a finite number >= 0, got {default_length}")

    parent: list[int] = [-1]
    length: list[float | None] = [None]
    label: list[str | None] = [None]
    has_kids: list[bool] = [False]
    stack: list[int] = []
    cur = 0
    expect_length = False
    closed_here = False  # cur was just closed by ')' (an internal node awaiting its label/length)
    ended = False

    def new_child(p: int) -> int:
        parent.append(p)
        length.append(None)
        label.append(None)
        has_kids.append(False)
        has_kids[p] = True
        return len(parent) - 1

    for kind, value, off in _tokens(text):
        if ended:
            raise NewickError(f"text after the final ';' at offset {off}: {value!r} (one tree per string)")
        if expect_length:
            if kind != "label":
                raise NewickError(f"expected a branch length after ':' at offset {off}, got {value!r}")
            try:
                x = float(value)
            except ValueError:
                raise NewickError(f"bad branch length {value!r} at offset {off}") from None
            if not math.isfinite(x) or x < 0:
                raise TreeError(f"branch lengths must be finite and >= 0: {value!r} at offset {off}")
            if length[cur] is not None:
                raise NewickError(f"a second branch length at offset {off}")
            length[cur] = x
            expect_length = False
            continue
        if kind == "(":
            if label[cur] is not None or length[cur] is not None or has_kids[cur]:
                raise NewickError(f"unexpected '(' at offset {off}")
            stack.append(cur)
            cur = new_child(cur)
            closed_here = False
        elif kind == ",":
            if not stack:
                raise NewickError(f"',' outside any parentheses at offset {off}")
            cur = new_child(stack[-1])
            closed_here = False
        elif kind == ")":
            if not stack:
                raise NewickError(f"unmatched ')' at offset {off}")
            cur = stack.pop()
            closed_here = True
        elif kind == ":":
            expect_length = True
        elif kind == ";":
            if stack:
                raise NewickError(f"';' at offset {off} with {len(stack)} unclosed '('")
            ended = True
        else:  # a label
            if label[cur] is not None or length[cur] is not None or (has_kids[cur] and not closed_here):
                raise NewickError(f"unexpected label {value!r} at offset {off}")
            if kind == "label" and underscores_to_spaces:
                value = value.replace("_", " ")
            label[cur] = value
    if expect_length:
        raise NewickError("text ends after ':' without a branch length")
    if not ended:
        raise NewickError("a Newick tree must end with ';'")

    n = len(parent)
    names = []
    for v in range(n):
        lab = label[v]
        if has_kids[v] and internal_labels == "ignore":
            lab = None
        names.append(lab if lab not in (None, "") else f"<node {v}>")
    if len(set(names)) != n:
        seen: set[str] = set()
        for v, nm in enumerate(names):
            if nm in seen:
                hint = ""
                if has_kids[v]:
                    hint = " (internal labels that are support values repeat: pass internal_labels='ignore')"
                raise TreeError(f"duplicate node name {nm!r} in the Newick text{hint}")
            seen.add(nm)
    w = np.array([default_length if x is None else x for x in length], dtype=np.float64)
    if classes is None:
        class_ids = [v for v in range(n) if not has_kids[v]]
    else:
        if isinstance(classes, str):
            raise TypeError("classes must be a sequence of node names, not a single string")
        index = {nm: v for v, nm in enumerate(names)}
        class_ids = []
        for k, c in enumerate(classes):
            if c not in index:
                raise TreeError(f"unknown class: classes[{k}] = {c!r} is not a node of the Newick tree")
            class_ids.append(index[c])
    return Tree.from_parents(np.asarray(parent), weights=w, names=names, classes=np.asarray(class_ids))
