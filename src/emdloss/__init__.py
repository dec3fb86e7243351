"""emdloss: exact and relaxed Earth Mover's Distance losses on trees and chains, in O(classes).

    >>> import torch, emdloss
    >>> tree = emdloss.Tree.chain(5)
    >>> loss = emdloss.EMDLoss(tree, rho=2.0)
    >>> loss(torch.zeros(2, 5), torch.tensor([0, 4])).item() > 0
    True

``emdloss.metrics``, ``emdloss.hierarchies`` and ``emdloss.plot`` are imported on first use (PEP 562), so
``import emdloss`` stays light.
"""

import importlib as _importlib
from types import ModuleType as _ModuleType

from . import functional
from .losses import EMDLoss, SinkhornLoss
from .tree import Tree, TreeError

__version__ = "0.1.0"
_LAZY_SUBMODULES = ("hierarchies", "metrics", "plot")
__all__ = ["EMDLoss", "SinkhornLoss", "Tree", "TreeError", "functional", "__version__", *_LAZY_SUBMODULES]


def __getattr__(name: str) -> _ModuleType:
    if name in _LAZY_SUBMODULES:
        return _importlib.import_module(f"{__name__}.{name}")  # the import also sets it as an attribute here
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))
