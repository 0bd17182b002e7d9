"""Rewrite every projection's input through the ``qsparse`` ops, as the config says.

Each projection :func:`~.projections.find_projections` finds becomes
``qsparse.sparse_linear(sparsify(x), W, b)``: the nodes are emitted by calling
:func:`qsparse_compile.plan.sparsify_input` and :func:`~qsparse_compile.plan.project_sparsified`
with the ``qsparse`` ops on FX proxies (:data:`qsparse_compile.functional.QSPARSE_OPS`), so the
graph holds exactly what the functional API computes (``topk_sparsify`` / ``block_sparsify``,
then ``int8_fake_quant`` for int8/bitnet; ``ternary_fake_quant(W)`` for bitnet; the weight
format's fake quantizer for ``weights=``, e.g. ``int4_weight_fake_quant(W, -1)``). ``W`` is
passed ``[out, in]`` (``aten.t`` of a ``Conv1D``-style ``[in, out]`` weight). Projections that
read the same node with the same plan share one sparsify, so q/k/v and gate/up select once
(unless an in-place write to it runs between them).

Expert products (grouped, batched, per expert: :mod:`.projections`) keep their op: only their
activation operand is replaced by its sparsified rows (and, for ``bitnet``, the expert weight
by its ternary values, one scale for the whole 3-D tensor, viewed as before). Where the graph
holds a mixture-of-experts block's router but none of its expert products (an experts
implementation that runs them outside the compiled graphs, e.g. Hugging Face's
``experts_implementation="eager"``, whose loop over the experts breaks the graph), the expert
weights are recorded dense with a note, and a warning names them.

Each projection's plan comes from its path and its role (``dense_roles``).
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
import torch.fx

from .. import ops  # noqa: F401  (registers torch.ops.qsparse)
from ..config import ProjectionPlan, QSparseConfig
from ..functional import QSPARSE_OPS
from ..plan import ResolvedPlan, project_sparsified, resolve_plan, sparsify_input
from .graph_utils import emit, tensor_meta
from .node_args import mutation_between
from .projections import Projection, find_projections, unsupported_projections
from .tensor_parallel import sharded_count, sharded_input
from .weights import WeightTable

__all__ = ["RewrittenProjection", "sparsify_graph"]

aten = torch.ops.aten


@dataclasses.dataclass(frozen=True)
class RewrittenProjection:
    """A projection and the plan applied to it (``plan.dense``: left as it was)."""

    projection: Projection
    plan: ProjectionPlan
    k: int | None
    note: str = ""

    @property
    def path(self) -> str:
        return self.projection.path

    @property
    def role(self) -> str:
        return self.projection.role


def _weight_out_in(w, proj: Projection):
    """The weight as the product's ``[out, in]`` operand, in the dtype the product used."""
    if proj.weight_layout == "in_out":
        w = aten.t.default(w)
    for dtype in proj.casts:
        w = aten._to_copy.default(w, dtype=dtype)
    return w


def _replace(gm: torch.fx.GraphModule, proj: Projection, plan: ProjectionPlan,
             config: QSparseConfig, weights: WeightTable, shared: dict[tuple, torch.fx.Node],
             replaced: dict[torch.fx.Node, torch.fx.Node]) -> None:
    graph = gm.graph
    node = proj.node
    bias_meta = tensor_meta(proj.bias)
    vector_bias = proj.bias is not None and bias_meta is not None and \
        tuple(bias_meta.shape) == (proj.out_features,)
    with graph.inserting_before(node):
        x = replaced.get(proj.x, proj.x)  # the output of a projection rewritten before
        if proj.weight_left and not proj.vector:  # W @ x: x's second-to-last dim
            x = emit(graph, node, lambda t: aten.transpose.int(t, -1, -2), x)
        key = (x, plan.method, plan.sparsity, plan.block, plan.quant)
        xs = shared.get(key)
        if xs is not None and mutation_between(xs, node):
            xs = None  # the input was written in place since: select again
        if xs is None:
            shard = weights.row_shard(proj.path)
            if shard is None:
                xs = emit(graph, node, lambda t: sparsify_input(t, plan, config, QSPARSE_OPS,
                                                                proj.in_features), x)
            else:  # tensor parallelism: this rank's shard of the row
                xs = emit(graph, node, lambda t: sharded_input(t, plan, config, shard,
                                                               proj.path), x)
            shared[key] = xs

        def product(xs_, w, b):
            y = project_sparsified(xs_, _weight_out_in(w, proj), b if vector_bias else None,
                                   plan, QSPARSE_OPS)
            if b is not None and not vector_bias:  # a broadcast bias: added after
                y = aten.add.Tensor(y, b)
            if proj.weight_left and not proj.vector:
                y = aten.transpose.int(y, -1, -2)
            return y

        y = emit(graph, node, product, xs, proj.weight, replaced.get(proj.bias, proj.bias))
    node.replace_all_uses_with(y)
    replaced[node] = y
    graph.erase_node(node)


def _resolve(proj: Projection, config: QSparseConfig, weights: WeightTable):
    """The plan of ``proj``; for a tied weight whose product cannot be told apart, one that is
    safe for every module it may be: left dense if any of them is (an excluded head)."""
    shard = weights.row_shard(proj.path)
    if shard is not None:  # tensor parallelism: the plan of the whole row, k of this rank's
        resolved = resolve_plan(proj.path, shard.in_features, config, role=proj.role)
        if resolved.plan.dense:
            return resolved
        return ResolvedPlan(resolved.plan, *sharded_count(resolved.plan, config, shard,
                                                          proj.path))
    resolved = resolve_plan(proj.path, proj.in_features, config, role=proj.role)
    if len(proj.aliases) < 2:
        return resolved
    roles = {p: proj.role if p == proj.path else weights.role(p) for p in proj.aliases}
    plans = {p: resolve_plan(p, proj.in_features, config, warn=False, role=roles[p])
             for p in proj.aliases}
    if len({r.plan for r in plans.values()}) == 1:
        return resolved
    dense = [p for p, r in plans.items() if r.plan.dense]
    chosen = dense[0] if dense else proj.path
    warnings.warn(f"projection reading the weight shared by {', '.join(map(repr, plans))}: "
                  f"the graph does not say which module calls it, and their plans differ; "
                  f"planned as {chosen!r}", stacklevel=3)
    proj.path, proj.role = chosen, roles[chosen]
    return plans[chosen]


def _replace_in_place(gm: torch.fx.GraphModule, proj: Projection, plan: ProjectionPlan,
                      config: QSparseConfig, shared: dict[tuple, torch.fx.Node],
                      replaced: dict[torch.fx.Node, torch.fx.Node]) -> None:
    """Sparsify an expert product's activation operand (its rows), keeping the product."""
    graph = gm.graph
    node = proj.node
    x = replaced.get(proj.x, proj.x)
    with graph.inserting_before(node):
        rows = x
        if proj.weight_left and not proj.vector:  # W @ X: X's second-to-last dim is the input
            rows = emit(graph, node, lambda t: aten.transpose.int(t, -1, -2), x)
        key = (rows, plan.method, plan.sparsity, plan.block, plan.quant)
        xs = shared.get(key)
        if xs is not None and mutation_between(xs, node):
            xs = None
        if xs is None:
            xs = emit(graph, node, lambda t: sparsify_input(t, plan, config, QSPARSE_OPS,
                                                            proj.in_features), rows)
            shared[key] = xs
        if proj.weight_left and not proj.vector:
            xs = emit(graph, node, lambda t: aten.transpose.int(t, -1, -2), xs)
        if plan.quant == "bitnet" or plan.weights is not None:
            # bitnet: one scale for the whole expert weight; a weight format: per expert,
            # output channel (and group); then the same views and picks as before
            in_dim = -1 if proj.weight_layout == "out_in" else -2
            quantized = emit(graph, node, lambda w: QSPARSE_OPS.weights(
                w, plan.weights, in_dim) if plan.weights else QSPARSE_OPS.ternary(w),
                proj.weight)
            mapped = {proj.weight: quantized}
            for view in proj.weight_chain:
                mapped[view] = graph.node_copy(view, lambda a: mapped.get(a, a))
            operand = proj.weight_chain[-1] if proj.weight_chain else proj.weight
            node.replace_input_with(operand, mapped[operand])
    node.replace_input_with(x, xs)


_OUTSIDE = ("left dense: the graph holds this block's router but none of its expert "
            "products (an experts implementation that runs them outside the compiled graphs, "
            "e.g. experts_implementation='eager', whose loop over the experts breaks the "
            "graph; 'grouped_mm' or 'batched_mm' compile)")


def _experts_outside(found: list[Projection], weights: WeightTable) -> list[Projection]:
    """Expert weights of the blocks whose router is in the graph but whose experts are not,
    as dense projections (their ``node`` is the router's product, where the block begins)."""
    present = {weights.expert_count(p.path).block for p in found
               if p.experts and weights.expert_count(p.path) is not None}
    out = []
    for router in found:
        block = weights.roles.routers.get(router.path)
        if block is None or block in present:
            continue
        present.add(block)
        for path, count in weights.roles.block_experts(block).items():
            out.append(Projection(
                node=router.node, x=router.node, weight=router.weight, weight_layout="out_in",
                bias=None, path=path, aliases=(path,), in_features=count.in_features,
                out_features=count.out_features, role=weights.role(path),
                experts=count.num_experts, experts_per_token=count.experts_per_token,
                in_place=True, unsupported=_OUTSIDE))
    return out


def sparsify_graph(gm: torch.fx.GraphModule, weights: WeightTable,
                   config: QSparseConfig) -> list[RewrittenProjection]:
    """Rewrite ``gm`` in place; return one record per projection found (dense ones too).

    Projections are found once, before any is rewritten, so a projection that reads another
    one's output (two in a row) is found with that output as its input; replacing the first
    routes its users, the second's product included, to the new node.
    """
    records: list[RewrittenProjection] = []
    shared: dict[tuple, torch.fx.Node] = {}
    replaced: dict[torch.fx.Node, torch.fx.Node] = {}
    found = find_projections(gm, weights)
    for proj in [*unsupported_projections(gm, weights), *_experts_outside(found, weights)]:
        if not config.plan_for(proj.path, proj.role).dense:
            warnings.warn(f"projection {proj.path!r}: {proj.unsupported}", stacklevel=3)
        records.append(RewrittenProjection(proj, ProjectionPlan(None, None, None), None,
                                           proj.unsupported))
    for proj in found:
        resolved = _resolve(proj, config, weights)
        records.append(RewrittenProjection(proj, resolved.plan, resolved.k, resolved.note))
        if resolved.plan.dense:
            continue
        if proj.in_place:
            if weights.row_shard(proj.path) is not None:
                raise NotImplementedError(
                    f"qsparse: expert projection {proj.path!r} is row-parallel; expert "
                    f"products under tensor parallelism are not supported yet")
            _replace_in_place(gm, proj, resolved.plan, config, shared, replaced)
        else:
            _replace(gm, proj, resolved.plan, config, weights, shared, replaced)
    return records
