"""Rewrite every projection's input through the ``qsparse`` ops, as the config says.

``y = x @ W^T + b`` becomes ``y = qsparse.sparse_linear(sparsify(x), W, b)``, where ``sparsify``
is ``topk_sparsify`` or ``block_sparsify`` (then ``int8_fake_quant`` for int8/bitnet) and ``W``
is passed ``[out, in]`` (``ternary_fake_quant(W)`` for bitnet). Projections that read the same
tensor with the same plan share one sparsify node, so q/k/v and gate/up select once.
The rewrite emits only ATen and ``qsparse`` ops, so the same pass serves Dynamo graphs
(torch-level IR) and ``torch.export`` graphs (ATen IR).
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
import torch.fx

from .. import ops  # noqa: F401  (registers torch.ops.qsparse)
from ..config import ProjectionPlan, QSparseConfig, topk_count
from .graph_utils import insert_call
from .projections import Projection, find_projections, tensor_meta
from .weights import WeightTable

qsparse = torch.ops.qsparse
aten = torch.ops.aten


@dataclasses.dataclass(frozen=True)
class RewrittenProjection:
    """A projection and the plan applied to it (``plan.dense``: left as it was)."""

    projection: Projection
    plan: ProjectionPlan
    k: int | None
    note: str = ""


def plan_projection(proj: Projection, config: QSparseConfig) -> tuple[ProjectionPlan, int | None,
                                                                       str]:
    """Resolve the plan for one projection; block patterns that do not fit stay dense."""
    plan = config.plan_for(proj.path)
    if not plan.sparse:
        return plan, None, ""
    if plan.method == "block":
        n, m = plan.block
        if proj.in_features % m:
            msg = (f"projection {proj.path!r}: input width {proj.in_features} is not a multiple "
                   f"of m={m}, so block {n}:{m} cannot apply")
            if config.strict:
                raise ValueError(msg + " (strict=True)")
            warnings.warn(msg + "; left dense", stacklevel=3)
            return plan.without_sparsity(), None, "width not a multiple of m"
        return plan, n * (proj.in_features // m), ""
    if plan.method == "relu":
        return plan, None, "sparsity depends on the data"
    return plan, topk_count(proj.in_features, plan.sparsity), ""


def _insert(graph: torch.fx.Graph, target, args: tuple, like: torch.fx.Node) -> torch.fx.Node:
    return insert_call(graph, target, args, like)


def sparsify_graph(gm: torch.fx.GraphModule, weights: WeightTable,
                   config: QSparseConfig) -> list[RewrittenProjection]:
    """Rewrite ``gm`` in place; return one record per projection found (dense ones too)."""
    graph = gm.graph
    records: list[RewrittenProjection] = []
    shared: dict[tuple, torch.fx.Node] = {}
    # Outputs replaced so far: a projection that reads another projection's output directly
    # (two in a row) was found before that node was replaced, so its input is looked up here.
    replaced: dict[torch.fx.Node, torch.fx.Node] = {}
    for proj in find_projections(gm, weights):
        plan, k, note = plan_projection(proj, config)
        records.append(RewrittenProjection(proj, plan, k, note))
        if plan.dense:
            continue
        node = proj.node
        proj.x = replaced.get(proj.x, proj.x)
        with graph.inserting_before(node):
            key = (proj.x, plan.method, k, plan.block, plan.quant)
            xs = shared.get(key)
            if xs is None:
                rescale = config.rescale == "l2"
                if plan.method == "block":
                    n, m = plan.block
                    xs = _insert(graph, qsparse.block_sparsify.default,
                                 (proj.x, n, m, rescale, config.ste), node)
                elif plan.method == "relu":
                    xs = _insert(graph, aten.relu.default, (proj.x,), node)
                elif plan.method == "topk":
                    xs = _insert(graph, qsparse.topk_sparsify.default,
                                 (proj.x, k, rescale, config.ste), node)
                else:
                    xs = proj.x  # not sparsified, only quantized
                if plan.quant in ("int8", "bitnet"):
                    xs = _insert(graph, qsparse.int8_fake_quant.default, (xs,), node)
                shared[key] = xs
            weight = proj.weight
            if proj.weight_layout == "in_out":
                weight = _insert(graph, aten.t.default, (weight,), node)
            if plan.quant == "bitnet":
                weight = _insert(graph, qsparse.ternary_fake_quant.default, (weight,), node)
            bias, extra_bias = proj.bias, None
            bias_meta = tensor_meta(bias)
            if bias is not None and (bias_meta is None or tuple(bias_meta.shape) != (
                    proj.out_features,)):
                bias, extra_bias = None, proj.bias  # broadcast bias: add it after the product
            y = _insert(graph, qsparse.sparse_linear.default, (xs, weight, bias), node)
            if extra_bias is not None:
                y = _insert(graph, aten.add.Tensor, (y, extra_bias), node)
        node.replace_all_uses_with(y)
        replaced[node] = y
        graph.erase_node(node)
    graph.eliminate_dead_code()
    gm.recompile()
    return records
