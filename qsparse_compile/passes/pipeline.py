"""The pass pipeline, one direction: [ReLU² GLU] -> rewrite projections -> share -> fuse."""

from __future__ import annotations

import dataclasses

import torch.fx

from ..config import QSparseConfig
from .fuse_norm import fuse_norm_sparsify
from .relu2_glu import relu2_glu
from .rewrite import RewrittenProjection, sparsify_graph
from .share_inputs import share_sparsify_inputs
from .weights import WeightTable


@dataclasses.dataclass
class PassResult:
    """What the pipeline did to one graph."""

    records: list[RewrittenProjection]
    shared: int  # sparsify nodes removed because projections read the same tensor
    fused: int  # norm + sparsify (+ quant) groups replaced by one fused op
    relu2: int = 0  # GLU gate activations replaced by the squared ReLU


def run_passes(gm: torch.fx.GraphModule, weights: WeightTable, config: QSparseConfig,
               fuse: bool = True) -> PassResult:
    """Rewrite ``gm`` in place; ``fuse=False`` stops after the projection rewrite."""
    relu2 = relu2_glu(gm, weights) if config.relu2_glu else 0
    records = sparsify_graph(gm, weights, config)
    shared = fused = 0
    if fuse and any(not r.plan.dense for r in records):
        shared = share_sparsify_inputs(gm)
        fused = fuse_norm_sparsify(gm, weights)
    gm.graph.lint()
    return PassResult(records, shared, fused, relu2)
