"""CPU decode: one fused ``qsparse::cpu_topk_linear`` per group of projections sharing an input.

After the rewrite (and sharing), a decoder layer reads each sparsified tensor with several
projections::

    S = qsparse.topk_sparsify(h, k, rescale, ste)        # or block_sparsify(h, n, m, ...)
    q = qsparse.sparse_linear(S, W_q, b_q)
    k = qsparse.sparse_linear(S, W_k, b_k)
    v = qsparse.sparse_linear(S, W_v, b_v)

At decode on a CPU each of those is a separate op call (5-20 us of dispatch each) and the generic
sparsify alone (~120 us at SmolLM2's width) costs more than the product it saves. This pass
replaces the group with::

    y = qsparse.cpu_topk_linear(h, k, n, m, rescale, Wt_cat, b_cat, max_sparse_rows)
    q, k, v = y[..., 0:Nq], y[..., Nq:Nq+Nk], y[..., Nq+Nk:]          # views

where ``Wt_cat = cat([W_q^T, W_k^T, W_v^T], dim=1)`` is built once, here, from the real weights
(``WeightTable.value``), and added to the graph as a constant (:mod:`.constants`). The
selection runs inside the GEMV's C call, and the group makes one call.

Conditions (otherwise the group is left as it is, and later passes may fuse its norm):

* the graph is compiled for inference (grad mode off): the op is inference-only. Dynamo
  compiles a frame under the caller's grad mode (a model called under ``torch.no_grad()`` is
  compiled under it), and a graph compiled with grad on is never reused with grad off: grad
  mode is guarded on. The pass manager runs this lowering only then.
* the sparsify is top-K or block N:M on a fp32/bf16 activation, with no user other than the
  group's projections (through row-preserving views), and no int8 quantizer after it;
* every weight (and bias) is a real CPU tensor of the activation's dtype, not quantized.

Weight formats (``weights=``, ``head_weights=``, ``quant="bitnet"``): a group whose products
read their weights through one weight fake quantizer (int8, int4, ternary; the same for every
member) becomes ``qsparse.cpu_packed_linear`` over the weights packed once
(:mod:`qsparse_compile.codegen.cpu.packed_weights`). Such a group may also follow an int8
quantizer (``quant="int8"``/``"bitnet"``: the kernel quantizes the kept values per row), or no
sparsify at all (the output head with ``head_weights``: ``k = D`` keeps every entry);
* the graph's rows per call (product of the leading dimensions) are static and at most
  ``max_sparse_rows``, which the measured cost model decides for the group's shape
  (``choose_sparse``): the largest of 1, 2, 4, 8 rows for which the
  fused kernel still beats the generic path (0: never, the group is left alone). Prefill
  graphs (many rows) therefore keep the generic path and share no prepared weights with the
  decode graph.

A weight stored ``[in, out]`` (HF ``Conv1D``; the rewritten graph reads it through ``aten.t``)
is K-major already: a group of one such projection uses it without a copy.

**Dense projections** (:func:`lower_dense_decode`): a projection the configuration leaves
dense (the output head by default, DESIGN.md point 8) is still a decode GEMV over the largest
weight of a small model: SmolLM2's tied 576 -> 49152 head is a fifth of its bytes per token.
``torch.mm`` streams that ``[out, in]`` weight at about half the rate the fused kernel streams
a K-major one (8-10 ms against 2.5-4.4 ms on the 2-core EPYC this project measures on), so such
a product becomes ``cpu_topk_linear`` with ``k = D`` (every feature kept: no selection, the
same dense product in another fp32 summation order) where the measured cost model
(:func:`~qsparse_compile.codegen.cpu.cost_model.choose_dense`) finds it faster than ``mm``.
It is a kernel choice only: which features are kept, and the values, are the dense product's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx

from .. import ops  # noqa: F401  (registers torch.ops.qsparse)
from ..codegen.cpu import packed_linear_op, topk_linear_op
from ..codegen.cpu.cost_model import choose_dense, choose_sparse
from ..codegen.cpu.topk_linear_template import MAX_ROWS, SUPPORTED_DTYPES
from ..config import QSparseConfig
from .constants import AddConstant
from .decode_groups import (
    Member,
    group_members,
    out_in_weights,
    prepared_constants,
    sparse_linear_inputs,
    splice_group,
    static_rows,
)
from .dims import feature_view
from .graph_utils import insert_like, insert_op, tensor_meta
from .node_args import arguments, is_call, mutation_between
from .rewrite import RewrittenProjection
from .share_inputs import SPARSIFY_OPS, graph_mutates
from .weights import WeightTable

aten = torch.ops.aten
qsparse = torch.ops.qsparse

#: Row counts the cost model is asked about, largest last.
ROW_CANDIDATES = (1, 2, 4, 8)

__all__ = ["ROW_CANDIDATES", "lower_cpu_decode", "lower_dense_decode"]


def _max_sparse_rows(in_features: int, out_features: int, dtype: torch.dtype,
                     density: float, fmt: str | None = None) -> int:
    """Largest row count (of ``ROW_CANDIDATES``) for which the cost model picks the fused
    kernel over its fallback (the generic sparsify op + dense ``addmm``: what the group costs
    when the kernel does not pay, since the model must be sparsified either way); 0 when it
    never does. Stops at the first loss: more rows only widen the union of the masks."""
    best = 0
    for rows in ROW_CANDIDATES:
        if not choose_sparse(in_features, out_features, rows, dtype, density, fmt=fmt):
            break
        best = rows
    return best


def _max_dense_rows(in_features: int, out_features: int, dtype: torch.dtype) -> int:
    """Largest row count (of ``ROW_CANDIDATES``) for which the kernel keeping every feature
    beats ``torch.mm`` on a dense projection here (measured); 0 when it never does."""
    best = 0
    for rows in ROW_CANDIDATES:
        if not choose_dense(in_features, out_features, rows, dtype):
            break
        best = rows
    return best


def _prepared_weight(members: list[Member], dtype: torch.dtype) -> torch.Tensor:
    """``cat([W_i^T])``; a single ``[in, out]`` weight is used as it is (already K-major)."""
    if len(members) == 1 and members[0].layout == "in_out" and members[0].weight.stride(1) == 1:
        return members[0].weight.detach()
    return topk_linear_op.prepare_group_weight(out_in_weights(members), "out_in", dtype)


def _packed_weight(members: list[Member], fmt: str) -> torch.Tensor:
    """The members' weights packed side by side in ``fmt`` (:mod:`.packed_linear_op`)."""
    return packed_linear_op.prepare_packed_weight(out_in_weights(members), fmt)


def _selection(x_node: torch.fx.Node, copies: bool, formats: bool):
    """How the group's input was made: ``(x_in, sparsify, chain, quant, made)`` or None.

    ``sparsify`` is the top-K / N:M node the input comes from, ``x_in`` that node's input and
    ``chain`` the row-preserving views from it to ``x_node`` (replayed on ``x_in``); ``quant``:
    an int8 quantizer follows the selection; ``made`` the nodes between ``x_in`` and
    ``x_node``, last first (erased once unused). Without a sparsify (a projection whose input
    is not sparsified, e.g. the output head with a weight format) ``sparsify`` is None. None:
    the input is made some other way. Only weight-format groups (``formats``) take the
    quantizer or no sparsify.
    """
    def selects(n):
        return is_call(n, *SPARSIFY_OPS) or (
            formats and is_call(n, qsparse.int8_fake_quant.default))

    traced = feature_view(x_node, selects, copies=copies)
    if traced is None:
        return (x_node, None, [], False, []) if formats else None
    source, chain, made = traced.source, list(traced.chain), [*reversed(traced.chain)]
    quant = is_call(source, qsparse.int8_fake_quant.default)
    if quant:
        made.append(source)
        inner = feature_view(arguments(source)["x"], lambda n: is_call(n, *SPARSIFY_OPS),
                             copies=copies)
        if inner is None:  # quantized, not sparsified
            return arguments(source)["x"], None, chain, True, made
        source, chain = inner.source, [*inner.chain, *chain]
        made += reversed(inner.chain)
    return arguments(source)["x"], source, chain, quant, [*made, source]


def lower_cpu_decode(
    gm: torch.fx.GraphModule,
    weights: WeightTable,
    config: QSparseConfig,
    add_constant: AddConstant,
    *,
    decide: Callable[..., int] | None = None,
) -> int:
    """Replace qualifying sparsify + projection groups of ``gm`` by ``cpu_topk_linear``, or by
    ``cpu_packed_linear`` where the weights take a format (``weights=``, ``quant="bitnet"``).

    Args:
        gm: an inference graph rewritten by :func:`~.rewrite.sparsify_graph` (and optionally
            shared by :func:`~.share_inputs.share_sparsify_inputs`); edited in place.
        weights: the graph's weight table; ``weights.value`` must give the real tensors.
        config: the sparsity configuration the graph was rewritten with.
        add_constant: how the prepared weights join the graph (:mod:`.constants`).
        decide: ``(in_features, out_features, dtype, density[, fmt]) -> max_sparse_rows``
            (``fmt`` passed only for weight-format groups); default the measured cost model
            (largest of 1, 2, 4, 8 rows for which the fused kernel wins).

    Returns:
        The number of groups replaced.
    """
    decide = decide or _max_sparse_rows
    graph = gm.graph
    copies = not graph_mutates(graph)
    replaced = 0
    for x_node in sparse_linear_inputs(graph):
        meta = tensor_meta(x_node)
        if meta is None or meta.dtype not in SUPPORTED_DTYPES or meta.dim() < 1:
            continue
        rows = static_rows(meta)
        if rows is None or not 1 <= rows <= MAX_ROWS:
            continue
        members = group_members(weights, x_node,
                                lambda t, dtype=meta.dtype: t.is_cpu and t.dtype == dtype,
                                formats=True)
        if members is None:
            continue
        fmt = members[0].format
        found = _selection(x_node, copies, fmt is not None)
        if found is None:
            continue
        x_in, sparsify, chain, quant, made = found
        if mutation_between(sparsify if sparsify is not None else x_node, members[0].node):
            continue  # (the selection moves to the product: nothing may write in between)
        D = int(meta.shape[-1])
        if sparsify is None:
            k, n, m, rescale = D, 0, 0, False  # the whole row
        else:
            sargs = arguments(sparsify)
            rescale = sargs["rescale"]
            if sparsify.target == qsparse.topk_sparsify.default:
                k, n, m = sargs["k"], 0, 0
            else:
                k, n, m = 0, sargs["n"], sargs["m"]
        density = k / D if m == 0 else n / m
        total_out = sum(mb.out_features for mb in members)
        max_rows = decide(D, total_out, meta.dtype, density) if fmt is None else \
            decide(D, total_out, meta.dtype, density, fmt)
        if rows > max_rows:
            continue
        like = sparsify if sparsify is not None else x_node
        with graph.inserting_before(members[0].node):
            wt_node, b_node = prepared_constants(
                add_constant, members, meta.dtype, like,
                (lambda group, dtype=meta.dtype: _prepared_weight(group, dtype)) if fmt is None
                else (lambda group, fmt=fmt: _packed_weight(group, fmt)))
            for view in chain:  # sparsify commutes with row-preserving views: view the input
                x_in = insert_like(graph, view, self=x_in)
            if fmt is None:
                y = insert_op(graph, qsparse.cpu_topk_linear.default, {
                    "x": x_in, "k": k, "n": n, "m": m, "rescale": rescale,
                    "weight_t": wt_node, "bias": b_node, "max_sparse_rows": max_rows},
                    members[0].node)
            else:
                y = insert_op(graph, qsparse.cpu_packed_linear.default, {
                    "x": x_in, "k": k, "n": n, "m": m, "rescale": rescale, "quant": quant,
                    "format": fmt, "out_features": total_out, "packed": wt_node,
                    "bias": b_node, "max_sparse_rows": max_rows}, members[0].node)
            splice_group(graph, members, y, erase_after=made)
        replaced += 1
    return replaced


def _dense_member(record: RewrittenProjection, weights: WeightTable, graph: torch.fx.Graph
                  ) -> Member | None:
    """The projection of ``record`` as a group of one, if it is a plain dense decode product
    (``mm``/``addmm`` of a 2-D fp32/bf16 CPU activation with a real weight, no cast)."""
    proj = record.projection
    node = proj.node
    if not record.plan.dense or proj.unsupported or proj.in_place or proj.experts or \
            proj.weight_left or proj.vector or proj.casts or node.graph is not graph or \
            not is_call(node, aten.mm.default, aten.addmm.default):
        return None
    if is_call(node, aten.addmm.default):
        args = arguments(node)
        if args.get("beta", 1) != 1 or args.get("alpha", 1) != 1:
            return None
    x = arguments(node)[proj.x_arg]  # now (the rewrite may have replaced what it was)
    if not isinstance(x, torch.fx.Node) or x.graph is not graph:
        return None
    meta = tensor_meta(x)
    if meta is None or meta.dim() != 2 or meta.dtype not in SUPPORTED_DTYPES:
        return None
    weight = weights.value(proj.weight)
    if weight is None or weight.dim() != 2 or not weight.is_cpu or weight.dtype != meta.dtype:
        return None
    bias = None
    if proj.bias is not None:
        bias = weights.value(proj.bias) if weights.is_weight(proj.bias) else None
        if bias is None or bias.dim() != 1 or bias.shape[0] != proj.out_features or \
                not bias.is_cpu or bias.dtype != meta.dtype:
            return None
    return Member(node, weight, proj.weight_layout, bias, proj.out_features, proj.weight,
                  proj.bias)


def lower_dense_decode(
    gm: torch.fx.GraphModule,
    weights: WeightTable,
    records: list[RewrittenProjection],
    add_constant: AddConstant,
    *,
    decide: Callable[[int, int, torch.dtype], int] | None = None,
) -> int:
    """Replace the dense decode products of ``gm`` (projections ``records`` left dense) by
    ``cpu_topk_linear`` with ``k = D`` over a K-major copy of the weight, where it is faster.

    Args:
        gm: an inference graph after :func:`~.rewrite.sparsify_graph`; edited in place.
        weights: the graph's weight table (real tensors).
        records: the rewrite's records of ``gm``; only those with a dense plan are looked at.
        add_constant: how the prepared weights join the graph (:mod:`.constants`).
        decide: ``(in_features, out_features, dtype) -> max rows`` for the kernel; default the
            measured cost model (:func:`~qsparse_compile.codegen.cpu.cost_model.choose_dense`).

    Returns:
        The number of products replaced.
    """
    decide = decide or _max_dense_rows
    graph = gm.graph
    replaced = 0
    for record in records:
        member = _dense_member(record, weights, graph)
        if member is None:
            continue
        proj = record.projection
        x = arguments(member.node)[proj.x_arg]
        meta = tensor_meta(x)
        rows = static_rows(meta)
        if rows is None or not isinstance(meta.shape[1], int):
            continue
        D = int(meta.shape[1])
        if not 1 <= rows <= MAX_ROWS:
            continue
        max_rows = decide(D, proj.out_features, meta.dtype)
        if rows > max_rows:
            continue
        node = member.node
        with graph.inserting_before(node):
            wt_node, b_node = prepared_constants(
                add_constant, [member], meta.dtype, x,
                lambda group, dtype=meta.dtype: _prepared_weight(group, dtype))
            y = insert_op(graph, qsparse.cpu_topk_linear.default, {
                "x": x, "k": D, "n": 0, "m": 0, "rescale": False, "weight_t": wt_node,
                "bias": b_node, "max_sparse_rows": max_rows}, node)
        node.replace_all_uses_with(y)
        graph.erase_node(node)
        for view in reversed(proj.weight_chain):  # the weight's transpose, now unread
            if view.graph is graph and not view.users:
                graph.erase_node(view)
        replaced += 1
    return replaced
