"""Graph passes: find projections, rewrite them to ``qsparse`` ops, share and fuse."""

from .fuse_norm import fuse_norm_sparsify
from .pipeline import PassResult, run_passes
from .projections import Projection, find_projections
from .relu2_glu import relu2_glu
from .rewrite import RewrittenProjection, sparsify_graph
from .share_inputs import share_sparsify_inputs
from .weights import WeightTable

__all__ = [
    "Projection",
    "find_projections",
    "RewrittenProjection",
    "sparsify_graph",
    "share_sparsify_inputs",
    "fuse_norm_sparsify",
    "PassResult",
    "run_passes",
    "relu2_glu",
    "WeightTable",
]
