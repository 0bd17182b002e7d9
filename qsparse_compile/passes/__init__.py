"""Graph passes: normalise a graph, find its projections, rewrite them to ``qsparse`` ops,
share and fuse; on inference graphs, lower groups to device kernels (:mod:`.manager`)."""

from .manager import GraphResult, PassManager
from .projections import Projection, find_projections
from .rewrite import RewrittenProjection, sparsify_graph
from .weights import WeightTable

__all__ = [
    "GraphResult",
    "PassManager",
    "Projection",
    "RewrittenProjection",
    "WeightTable",
    "find_projections",
    "sparsify_graph",
]
