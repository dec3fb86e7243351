"""Builders of :class:`~emdloss.Tree` hierarchies from real sources, one module per source.

- :mod:`.wordnet`: ImageNet-style is-a edge files (:func:`from_isa_file`)
  and nltk's WordNet corpus (:func:`from_nltk`).
- :mod:`.graph`: networkx ``DiGraph`` (:func:`from_networkx`).
- :mod:`.newick`: Newick strings (:func:`from_newick`).
- :mod:`.cluster`: any class metric or class embeddings via hierarchical clustering
  (:func:`from_distance_matrix`, :func:`from_embeddings`, :func:`tree_distortion`).

Sources that are DAGs are resolved by the deterministic policy of :mod:`._dag` (see
:func:`~emdloss.hierarchies._dag.dag_to_tree`). Optional dependencies (networkx, scipy, nltk) are imported
only when a builder needs them. See docs/hierarchies.md.
"""

from ._dag import POLICIES, DagReport, dag_to_tree
from .cluster import DistortionReport, from_distance_matrix, from_embeddings, tree_distortion
from .graph import from_networkx
from .newick import NewickError, from_newick
from .wordnet import from_isa_file, from_nltk, read_isa, read_words

__all__ = [
    "POLICIES",
    "DagReport",
    "DistortionReport",
    "NewickError",
    "dag_to_tree",
    "from_distance_matrix",
    "from_embeddings",
    "from_isa_file",
    "from_networkx",
    "from_newick",
    "from_nltk",
    "read_isa",
    "read_words",
    "tree_distortion",
]
