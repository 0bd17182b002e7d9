"""The pass pipeline, one direction: [ReLU² GLU] -> rewrite -> share -> [CPU decode] -> fuse."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterator

import torch.fx

from ..config import QSparseConfig
from .cpu_decode import prepare_cpu_decode
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
    decode: int = 0  # projection groups replaced by one fused CPU decode op (cpu_topk_linear)


def has_side_effects(node: torch.fx.Node) -> bool:
    """Whether dead-code elimination must keep ``node`` although nothing reads its result.

    ``Node.is_impure`` knows mutating ``call_function`` targets, but calls every
    ``call_method`` pure, so an in-place *method* whose result is unused (Dynamo records
    ``keys.index_copy_(2, pos, k)`` that way when a static KV cache is filled) would be
    deleted, and the cache never written. Tensor methods ending in ``_`` are in place.
    """
    if node.is_impure():
        return True
    return (node.op == "call_method" and isinstance(node.target, str)
            and node.target.endswith("_") and not node.target.startswith("_"))


@contextlib.contextmanager
def _keep_side_effects(graph: torch.fx.Graph) -> Iterator[None]:
    """Within the block, ``graph.eliminate_dead_code()`` keeps every node with side effects.

    The passes each end with a plain ``eliminate_dead_code()``; binding the predicate on this
    graph object covers all of them at once.
    """
    graph.eliminate_dead_code = functools.partial(  # type: ignore[method-assign]
        torch.fx.Graph.eliminate_dead_code, graph, is_impure_node=has_side_effects)
    try:
        yield
    finally:
        del graph.eliminate_dead_code


def run_passes(gm: torch.fx.GraphModule, weights: WeightTable, config: QSparseConfig,
               fuse: bool = True, decode: bool = True) -> PassResult:
    """Rewrite ``gm`` in place.

    ``fuse=False`` skips sharing and norm fusion. ``decode=True`` replaces each group of
    projections reading one sparsified input by a single ``qsparse::cpu_topk_linear`` (selection
    fused into a CPU sparse GEMV) where :func:`~.cpu_decode.prepare_cpu_decode` finds it pays:
    inference (grad mode off), real CPU weights, few rows per call; the norms before those
    groups stay ordinary ops (the inner compiler fuses them), the others may still be fused.
    """
    with _keep_side_effects(gm.graph):
        relu2 = relu2_glu(gm, weights) if config.relu2_glu else 0
        records = sparsify_graph(gm, weights, config)
        shared = fused = decoded = 0
        if any(not r.plan.dense for r in records):
            if fuse:
                shared = share_sparsify_inputs(gm)
            if decode:
                # before norm fusion: the groups it takes keep their norm as an ordinary op
                decoded = prepare_cpu_decode(gm, weights, config)
            if fuse:
                fused = fuse_norm_sparsify(gm, weights)
    gm.graph.lint()
    return PassResult(records, shared, fused, relu2, decoded)
