"""Graph passes: find projections, rewrite them to ``qsparse`` ops."""

from .projections import Projection, find_projections
from .rewrite import RewrittenProjection, sparsify_graph
from .weights import WeightTable

__all__ = ["Projection", "find_projections", "RewrittenProjection", "sparsify_graph",
           "WeightTable"]
