"""emdloss: exact and relaxed Earth Mover's Distance losses on trees and chains, in O(classes).

    >>> import torch, emdloss
    >>> tree = emdloss.Tree.chain(5)
    >>> loss = emdloss.EMDLoss(tree, rho=2.0)
    >>> loss(torch.zeros(2, 5), torch.tensor([0, 4])).item() > 0
    True
"""

from . import functional
from .losses import EMDLoss, SinkhornLoss
from .tree import Tree, TreeError

__version__ = "0.1.0"
__all__ = ["EMDLoss", "SinkhornLoss", "Tree", "TreeError", "functional", "__version__"]
