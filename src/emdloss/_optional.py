"""Optional dependencies, imported when first needed, with the install command when one is missing.

Every lazily imported optional dependency of the distribution (the library and the lab) goes through
:func:`require`, so a user without it reads which extra brings it instead of a bare
``ModuleNotFoundError: No module named 'matplotlib'``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["MissingOptionalDependency", "install_hint", "require"]


class MissingOptionalDependency(ModuleNotFoundError):
    """An optional dependency is not installed (or cannot be imported); the message names the extra that brings it.

    A subclass of :class:`ModuleNotFoundError` (and so of :class:`ImportError`): code that catches either keeps
    working, and ``exc.name`` is the missing module's name as Python reports it.
    """


def install_hint(extra: str) -> str:
    """The command that installs the optional extra ``extra``: ``pip install 'emdloss[extra]'``."""
    return f"pip install 'emdloss[{extra}]'"


def require(module: str, extra: str, feature: str | None = None) -> ModuleType:
    """Import ``module`` (dotted names allowed) or raise :class:`MissingOptionalDependency`.

    Args:
        module: what to import, e.g. ``"matplotlib.pyplot"`` or ``"scipy.cluster.hierarchy"``.
        extra: the optional extra of ``emdloss`` that installs it, e.g. ``"plot"``.
        feature: what needs it, for the message (default: ``module``'s top-level package is named alone).

    Returns:
        The imported module.

    Raises:
        MissingOptionalDependency: the import failed; the message names the module, what needs it, the reason
            the import gave, and the ``pip install 'emdloss[extra]'`` command.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # absent, or present but broken (a binary built for another numpy, say)
        top = module.split(".")[0]
        needs = f"{feature} needs {top}" if feature else f"{top} is needed"
        message = f"{needs}, which could not be imported ({exc}): {install_hint(extra)}"
        raise MissingOptionalDependency(message, name=exc.name or top) from exc
