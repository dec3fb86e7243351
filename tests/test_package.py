"""Packaging promises: importing emdloss pulls in no optional dependency, none of the lab (emdloss_lab), no
numba before a fused call, and touches no GPU."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from emdloss._optional import MissingOptionalDependency, install_hint, require

ROOT = Path(__file__).resolve().parents[1]


def test_import_pulls_no_optional_dependency() -> None:
    code = (
        "import sys, emdloss, emdloss.functional, emdloss.losses, emdloss.metrics, emdloss.hierarchies,"
        " emdloss.backends;"
        "bad = [m for m in ('numba', 'scipy', 'matplotlib', 'networkx', 'ot', 'sklearn', 'nltk', 'triton',"
        " 'emdloss_lab') if m in sys.modules];"
        "import torch; assert not torch.cuda.is_initialized(); print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"imported at package import: {out.stdout.strip()}"


def test_submodules_are_attributes_without_a_heavier_import():
    """emdloss.metrics / .hierarchies / .plot resolve on first use (PEP 562); `import emdloss` alone loads none of
    them, nor numba, matplotlib, scipy, networkx or the lab."""
    code = (
        "import sys, emdloss\n"
        "heavy = ('numba', 'matplotlib', 'scipy', 'networkx', 'emdloss_lab')\n"
        "lazy = ('emdloss.metrics', 'emdloss.hierarchies', 'emdloss.plot')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy or m in lazy))\n"
        "listed = lambda names: sorted(set(lazy) - {'emdloss.' + n for n in names})\n"
        "print(listed(dir(emdloss)), listed(emdloss.__all__))\n"
        "print([getattr(emdloss, m.split('.')[1]) is sys.modules[m] for m in lazy])\n"
        "try:\n    emdloss.no_such_thing\nexcept AttributeError as exc:\n    print(exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert done.stdout.splitlines() == [
        "[]",
        "[] []",
        "[True, True, True]",
        "module 'emdloss' has no attribute 'no_such_thing'",
    ], done.stdout + done.stderr


# ---------------------------------------------------------------------- optional dependencies: install hints

#: top-level modules that only an optional extra installs (numba, numpy and torch are core dependencies)
OPTIONAL_MODULES = {
    "matplotlib": "plot",
    "scipy": "hierarchies",
    "networkx": "hierarchies",
    "nltk": "nltk",
    "sklearn": "demo",
    "tqdm": "cli",
    "ot": "bench",
    "torchmetrics": "metrics",
    "lightning": "metrics",
    "pytorch_lightning": "metrics",
    "triton": "gpu",
}


#: modules that import an optional dependency at their top because they are imported only once it is known to be
#: there, with the reason
IMPORTED_AFTER_A_PROBE = {
    "triton_kernels.py": "imported by backends.triton_gpu only after TritonBackend.unavailable() imported triton",
}


def _hide(monkeypatch: pytest.MonkeyPatch, top: str) -> None:
    """Make ``import top`` and ``import top.anything`` fail as if ``top`` were not installed (None in
    sys.modules halts the import), including submodules already imported by earlier tests."""
    for name in [m for m in sys.modules if m == top or m.startswith(top + ".")] + [top]:
        monkeypatch.setitem(sys.modules, name, None)


def _plot_chain() -> None:
    from emdloss import plot

    plot.plot_chain_cdfs(np.full(4, 0.25), 1)


def _plot_tree() -> None:
    from emdloss import Tree, plot

    plot.plot_tree_flows(np.full(3, 1 / 3), 0, Tree.from_parents([-1, 0, 0, 0]))


def _cluster_matrix() -> None:
    from emdloss import hierarchies

    hierarchies.from_distance_matrix(np.array([[0.0, 1.0], [1.0, 0.0]]))


def _cluster_embeddings() -> None:
    from emdloss import hierarchies

    hierarchies.from_embeddings(np.eye(3))


def _distortion() -> None:
    from emdloss import Tree, hierarchies

    hierarchies.tree_distortion(Tree.chain(3), Tree.chain(3).distance_matrix())


def _nltk() -> None:
    from emdloss import hierarchies

    hierarchies.from_nltk(["dog.n.01"])


def _demo_data() -> None:
    from emdloss_lab.experiments import demo

    demo.chain_task(0, 5)


def _lab_figures() -> None:
    from emdloss_lab.experiments import runner

    runner.pyplot()


def _bench_pot() -> None:
    import torch

    from emdloss_lab.bench import methods

    methods.pot_emd2(torch.zeros(2, 2))


def _sinkhorn_study_pot() -> None:
    from emdloss_lab.experiments import sinkhorn_study

    sinkhorn_study._timing("chain", 4, {"seed": 0})


def _metric_class() -> None:
    import emdloss.metrics

    emdloss.metrics.TopKAccuracy  # noqa: B018 - the attribute access is the import


@pytest.mark.parametrize(
    "call, missing, extra",
    [
        (_metric_class, "torchmetrics", "metrics"),
        (_plot_chain, "matplotlib", "plot"),
        (_plot_tree, "matplotlib", "plot"),
        (_cluster_matrix, "scipy", "hierarchies"),
        (_cluster_embeddings, "scipy", "hierarchies"),
        (_distortion, "scipy", "hierarchies"),
        (_nltk, "nltk", "nltk"),
        (_demo_data, "sklearn", "demo"),
        (_lab_figures, "matplotlib", "cli"),
        (_bench_pot, "ot", "bench"),
        (_sinkhorn_study_pot, "ot", "bench"),
    ],
    ids=lambda v: getattr(v, "__name__", v).lstrip("_") if callable(v) else None,
)
def test_a_missing_optional_dependency_names_its_extra(
    monkeypatch: pytest.MonkeyPatch, call: Callable[[], None], missing: str, extra: str
) -> None:
    _hide(monkeypatch, missing)
    # emdloss.metrics loads its torchmetrics classes on first use: forget an earlier test's load (restored after)
    monkeypatch.delitem(sys.modules, "emdloss.metrics._torchmetrics", raising=False)
    with pytest.raises(ModuleNotFoundError, match=re.escape(f"pip install 'emdloss[{extra}]'")) as info:
        call()
    assert isinstance(info.value, MissingOptionalDependency) and info.value.name.split(".")[0] == missing
    assert missing in str(info.value)


def test_require_returns_the_module_and_keeps_the_cause(monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    assert require("json", "plot") is json
    _hide(monkeypatch, "json")
    with pytest.raises(ImportError) as info:
        require("json.decoder", "cli", "the test")
    assert str(info.value).startswith("the test needs json, which could not be imported (")
    assert isinstance(info.value.__cause__, ImportError)
    assert install_hint("cli") == "pip install 'emdloss[cli]'"


def test_every_hinted_extra_exists() -> None:
    """The extras the hints name are declared in pyproject.toml (a hint for a missing extra would mislead)."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11+")
    if not (ROOT / "pyproject.toml").exists():
        pytest.skip("no pyproject.toml beside the tests")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = set(pyproject["project"]["optional-dependencies"])
    hinted = set()
    for path in _source_files():
        if path.name == "_optional.py":  # its docstrings show the form, "emdloss[extra]"
            continue
        hinted |= set(re.findall(r"""require\(\s*"[\w.]+",\s*"(\w+)\"""", path.read_text()))
        hinted |= set(re.findall(r"install_hint\(\s*'(\w+)'", path.read_text()))
        hinted |= set(re.findall(r"emdloss\[(\w+)\]", path.read_text()))
    assert hinted, "no install hint found in the sources"
    assert hinted <= extras, f"hints name extras that pyproject.toml does not declare: {sorted(hinted - extras)}"


def _source_files() -> list[Path]:
    import emdloss
    import emdloss_lab

    return sorted(
        p for pkg in (emdloss, emdloss_lab) for p in Path(pkg.__file__).parent.rglob("*.py") if "_build" not in p.parts
    )


def _guarded(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """Is ``node`` inside a ``try`` that handles ImportError (a deliberate fallback or availability probe) or
    under ``if TYPE_CHECKING``?"""
    while node in parents:
        parent = parents[node]
        if isinstance(parent, ast.Try) and node in parent.body:
            names = {
                n.id if isinstance(n, ast.Name) else getattr(n, "attr", "")
                for h in parent.handlers
                for n in ([h.type] if not isinstance(h.type, ast.Tuple) else h.type.elts)
                if h.type is not None
            }
            if names & {"ImportError", "ModuleNotFoundError", "Exception"}:
                return True
        if isinstance(parent, ast.If) and any(k in ast.unparse(parent.test) for k in ("TYPE_CHECKING", "sys.modules")):
            return True  # type-checking only, or the module is already imported
        node = parent
    return False


def test_optional_dependencies_are_imported_only_through_require() -> None:
    """Every import of an optional dependency in the library and the lab goes through
    :func:`emdloss._optional.require` (which names the extra), unless it sits in a ``try`` that handles its
    absence itself; a plain ``import matplotlib`` would give users a bare ModuleNotFoundError."""
    offenders = []
    for path in _source_files():
        if path.name in IMPORTED_AFTER_A_PROBE:
            continue
        tree = ast.parse(path.read_text())
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        # `require("torchmetrics", ...)` first, then `from torchmetrics import ...` in the same module: the hint
        # has been given by then.
        required = {
            node.args[0].value.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.Call)
            and getattr(node.func, "id", getattr(node.func, "attr", None)) == "require"
            and node.args
            and isinstance(node.args[0], ast.Constant)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            bad = [n for n in names if n.split(".")[0] in OPTIONAL_MODULES and n.split(".")[0] not in required]
            if bad and not _guarded(node, parents):
                offenders.append(f"{path.name}:{node.lineno}: import {', '.join(bad)}")
    assert not offenders, "import these through emdloss._optional.require(module, extra): " + "; ".join(offenders)


def test_py_typed_ships_with_the_package() -> None:
    """PEP 561: the marker sits beside the installed package, so type checkers read emdloss's annotations."""
    import emdloss

    assert (Path(emdloss.__file__).parent / "py.typed").is_file()


def test_readme_links_work_on_a_package_index_page() -> None:
    """The README is the package index's project page, where relative links resolve against the index, not the
    repository: every link and image is absolute, images point at raw files (a GitHub "blob" page is HTML)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"(!?)\[[^\]]*\]\(([^)\s]+)\)", readme)
    assert links
    relative = [target for _, target in links if not re.match(r"https?://|#", target)]
    assert not relative, f"relative links in README.md: {relative}"
    images = [target for bang, target in links if bang]
    assert images and all("/blob/" not in t for t in images), images
