"""The pass pipeline, one direction: rewrite projections -> share inputs -> fuse norms."""

from __future__ import annotations

import dataclasses

import torch.fx

from ..config import QSparseConfig
from .fuse_norm import fuse_norm_sparsify
from .rewrite import RewrittenProjection, sparsify_graph
from .share_inputs import share_sparsify_inputs
from .weights import WeightTable


@dataclasses.dataclass
class PassResult:
    """What the pipeline did to one graph."""

    records: list[RewrittenProjection]
    shared: int  # sparsify nodes removed because projections read the same tensor
    fused: int  # norm + sparsify (+ quant) groups replaced by one fused op


def run_passes(gm: torch.fx.GraphModule, weights: WeightTable, config: QSparseConfig,
               fuse: bool = True) -> PassResult:
    """Rewrite ``gm`` in place; ``fuse=False`` stops after the projection rewrite."""
    records = sparsify_graph(gm, weights, config)
    shared = fused = 0
    if fuse and any(not r.plan.dense for r in records):
        shared = share_sparsify_inputs(gm)
        fused = fuse_norm_sparsify(gm, weights)
    gm.graph.lint()
    return PassResult(records, shared, fused)
