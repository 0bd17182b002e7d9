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
(``WeightTable.value``), and registered as a buffer of the graph module. The selection runs
inside the GEMV's C call, and the group makes one call.

Conditions (otherwise the group is left as it is, and later passes may fuse its norm):

* grad mode is off while compiling: the op is inference-only. Dynamo compiles a frame under
  the caller's grad mode (a model called under ``torch.no_grad()`` is compiled under it), and
  a graph compiled with grad on is never reused with grad off: grad mode is guarded on.
* the sparsify is top-K or block N:M on a fp32/bf16 activation, with no int8 quantizer after
  it and no user other than the group's projections (through row-preserving views);
* every weight (and bias) is a real CPU tensor of the activation's dtype, not quantized;
* the graph's rows per call (product of the leading dimensions) are static and at most
  ``max_sparse_rows``, which the measured cost model decides for the group's shape
  (``choose_sparse(..., kernel="topk_linear")``): the largest of 1, 2, 4, 8 rows for which the
  fused kernel still beats the generic path (0: never, the group is left alone). Prefill
  graphs (many rows) therefore keep the generic path and share no prepared weights with the
  decode graph.

A weight stored ``[in, out]`` (HF ``Conv1D``; the rewritten graph reads it through ``aten.t``)
is K-major already: a group of one such projection uses it without a copy.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx

from .. import ops  # noqa: F401  (registers torch.ops.qsparse)
from ..codegen.cpu import topk_linear_op  # noqa: F401  (registers qsparse::cpu_topk_linear)
from ..codegen.cpu.cost_model import choose_sparse
from ..codegen.cpu.topk_linear_template import MAX_ROWS, SUPPORTED_DTYPES
from ..config import QSparseConfig
from .decode_groups import (
    BUFFER_PREFIX,
    Member,
    group_members,
    prepared_bias,
    register_constant,
    sparse_linear_inputs,
    splice_group,
    static_rows,
)
from .graph_utils import insert_call
from .projections import tensor_meta
from .share_inputs import _row_preserving
from .weights import WeightTable

aten = torch.ops.aten
qsparse = torch.ops.qsparse

#: Row counts the cost model is asked about, largest last.
ROW_CANDIDATES = (1, 2, 4, 8)

__all__ = ["BUFFER_PREFIX", "ROW_CANDIDATES", "prepare_cpu_decode"]


def _max_sparse_rows(in_features: int, out_features: int, dtype: torch.dtype,
                     density: float) -> int:
    """Largest row count (of ``ROW_CANDIDATES``) for which the cost model picks the fused
    kernel over its fallback (the generic sparsify op + dense ``addmm``: what the group costs
    when the kernel does not pay, since the model must be sparsified either way); 0 when it
    never does. Stops at the first loss: more rows only widen the union of the masks."""
    best = 0
    for rows in ROW_CANDIDATES:
        if not choose_sparse(in_features, out_features, rows, dtype, density,
                             kernel="topk_linear"):
            break
        best = rows
    return best


def _chain_to_sparsify(x: torch.fx.Node) -> tuple[torch.fx.Node, list[torch.fx.Node]] | None:
    """(sparsify node, row-preserving views from it down to ``x``), or None."""
    chain: list[torch.fx.Node] = []
    node = x
    while True:
        if node.op == "call_function" and node.target in (
                qsparse.topk_sparsify.default, qsparse.block_sparsify.default):
            return node, chain[::-1]
        if not _row_preserving(node):
            return None
        chain.append(node)
        node = node.args[0]


def _prepared_weight(members: list[Member], dtype: torch.dtype) -> torch.Tensor:
    """``cat([W_i^T])``; a single ``[in, out]`` weight is used as it is (already K-major)."""
    if len(members) == 1 and members[0].layout == "in_out" and members[0].weight.stride(1) == 1:
        return members[0].weight.detach()
    return topk_linear_op.prepare_group_weight(
        [m.weight if m.layout == "out_in" else m.weight.t() for m in members], "out_in", dtype)


def prepare_cpu_decode(
    gm: torch.fx.GraphModule,
    weights: WeightTable,
    config: QSparseConfig,
    *,
    decide: Callable[[int, int, torch.dtype, float], int] | None = None,
) -> int:
    """Replace qualifying sparsify + projection groups of ``gm`` by ``cpu_topk_linear``.

    Args:
        gm: a graph rewritten by :func:`~qsparse_compile.passes.rewrite.sparsify_graph` (and
            optionally :func:`~qsparse_compile.passes.share_inputs.share_sparsify_inputs`);
            edited in place.
        weights: the graph's weight table; ``weights.value`` must give the real tensors.
        config: the sparsity configuration the graph was rewritten with (``quant`` must be
            None: quantized groups are never taken).
        decide: ``(in_features, out_features, dtype, density) -> max_sparse_rows``; default
            the measured cost model (largest of 1, 2, 4, 8 rows for which sparse wins).

    Returns:
        The number of groups replaced (0 when grad mode is on: the op cannot train).
    """
    if torch.is_grad_enabled() or config.quant is not None:
        return 0
    decide = decide or _max_sparse_rows
    graph = gm.graph
    replaced = 0
    for x_node in sparse_linear_inputs(graph):
        found = _chain_to_sparsify(x_node)
        if found is None:
            continue
        sparsify, chain = found
        source = sparsify.args[0]
        meta = tensor_meta(x_node)
        if meta is None or meta.dtype not in SUPPORTED_DTYPES or meta.dim() < 1:
            continue
        rows = static_rows(meta)
        if rows is None or not 1 <= rows <= MAX_ROWS:
            continue
        members = group_members(gm, weights, x_node,
                                lambda t, dtype=meta.dtype: t.is_cpu and t.dtype == dtype)
        if members is None:
            continue
        D = int(meta.shape[-1])
        if sparsify.target == qsparse.topk_sparsify.default:
            _, k, rescale, _ste = sparsify.args
            n = m = 0
            density = k / D
        else:
            _, n, m, rescale, _ste = sparsify.args
            k = 0
            density = n / m
        total_out = sum(mb.out_features for mb in members)
        max_rows = decide(D, total_out, meta.dtype, density)
        if rows > max_rows:
            continue
        with graph.inserting_before(members[0].node):
            wt_node = register_constant(gm, _prepared_weight(members, meta.dtype), sparsify,
                                        "wt")
            bias = prepared_bias(members, meta.dtype)
            b_node = None if bias is None else register_constant(gm, bias, sparsify, "b")
            x_in = source
            for view in chain:  # sparsify commutes with row-preserving views: view the input
                x_in = insert_call(graph, view.target, (x_in, *view.args[1:]), view,
                                   kwargs=dict(view.kwargs), op=view.op)
            y = insert_call(graph, qsparse.cpu_topk_linear.default,
                            (x_in, k, n, m, rescale, wt_node, b_node, max_rows), members[0].node)
            splice_group(graph, members, y, erase_after=[*reversed(chain), sparsify])
        replaced += 1
    if replaced:
        gm.recompile()
    return replaced

