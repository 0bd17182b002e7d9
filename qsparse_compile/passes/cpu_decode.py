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

import dataclasses
import math
from collections.abc import Callable

import torch
import torch.fx
from torch._dynamo.source import ConstantSource
from torch._guards import detect_fake_mode

from .. import ops  # noqa: F401  (registers torch.ops.qsparse)
from ..codegen.cpu import topk_linear_op  # noqa: F401  (registers qsparse::cpu_topk_linear)
from ..codegen.cpu.cost_model import choose_sparse
from ..codegen.cpu.topk_linear_template import MAX_ROWS, SUPPORTED_DTYPES
from ..config import QSparseConfig
from .graph_utils import _run_fake, insert_call
from .projections import tensor_meta
from .share_inputs import _row_preserving
from .weights import WeightTable

aten = torch.ops.aten
qsparse = torch.ops.qsparse

#: Row counts the cost model is asked about, largest last.
ROW_CANDIDATES = (1, 2, 4, 8)

#: Prefix of the buffers holding the prepared weights on the graph module.
BUFFER_PREFIX = "_qsparse_decode"


@dataclasses.dataclass
class _Member:
    """One projection of a group: ``sparse_linear(x_node, weight, bias)``."""

    node: torch.fx.Node
    weight: torch.Tensor  # the real tensor
    layout: str  # "out_in" (nn.Linear) or "in_out" (Conv1D, read through aten.t)
    bias: torch.Tensor | None
    out_features: int


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


def _real_value(gm: torch.fx.GraphModule, weights: WeightTable,
                node: object) -> torch.Tensor | None:
    """The real tensor behind a weight node (a Dynamo placeholder or a ``get_attr``)."""
    if not weights.is_weight(node):
        return None
    value = weights.value(node)
    if value is None and node.op == "get_attr":
        value = gm
        for atom in str(node.target).split("."):
            value = getattr(value, atom, None)
    if not isinstance(value, torch.Tensor) or isinstance(value, torch._subclasses.FakeTensor):
        return None
    return value


def _weight_of(gm: torch.fx.GraphModule, weights: WeightTable,
               node: object) -> tuple[torch.Tensor, str] | None:
    """(real weight, layout) for a ``sparse_linear`` weight argument, or None."""
    value = _real_value(gm, weights, node)
    if value is not None:
        return value, "out_in"
    if isinstance(node, torch.fx.Node) and node.op == "call_function" and \
            node.target == aten.t.default:
        value = _real_value(gm, weights, node.args[0])
        if value is not None:
            return value, "in_out"
    return None


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


def _static_rows(meta: torch.Tensor) -> int | None:
    """Rows per call (product of the leading dims) when all are static ints, else None."""
    # int() of a SymInt does not fail: it specialises the size (a guard), so a graph compiled
    # for dynamic sequence lengths would recompile for every length. Only plain ints count.
    if not all(isinstance(s, int) for s in meta.shape[:-1]):
        return None
    return math.prod(meta.shape[:-1])


def _register(gm: torch.fx.GraphModule, tensor: torch.Tensor, like: torch.fx.Node,
              prefix: str) -> torch.fx.Node:
    """Register ``tensor`` as a buffer of ``gm`` and return a ``get_attr`` node reading it.

    AOTAutograd (Inductor's front end) lifts a Dynamo graph's buffers to graph inputs, so the
    prepared weight is passed by reference on every call and fake-ified like a parameter while
    tracing; it requires a Dynamo source for each lifted name (used to deduplicate inputs),
    which a tensor made here gets as a :class:`ConstantSource` named after the buffer.
    """
    index = 0
    while hasattr(gm, f"{BUFFER_PREFIX}_{prefix}{index}"):
        index += 1
    name = f"{BUFFER_PREFIX}_{prefix}{index}"
    gm.register_buffer(name, tensor)
    sources = getattr(gm, "_param_name_to_source", None)
    if isinstance(sources, dict):
        sources[name] = ConstantSource(f"{type(gm).__name__}.{name}")
    node = gm.graph.get_attr(name)
    fake_mode = detect_fake_mode([tensor_meta(like)])
    if fake_mode is not None:
        node.meta["val" if "val" in like.meta else "example_value"] = fake_mode.from_tensor(
            tensor, static_shapes=True)
    return node


_VIEWS = {aten.view.default, aten._unsafe_view.default, torch.Tensor.view}


def _make_viewable(graph: torch.fx.Graph, out: torch.fx.Node) -> None:
    """Give ``view`` users of a column slice a contiguous copy where they need one.

    A slice of the group's output is a strided view (its rows are ``sum(out_features)``
    apart); with one row that is contiguous anyway, and a ``view`` that only splits the last
    dimension (heads) works on it, but one that merges the last dimension with another does
    not. Such users are found by re-running them on the fake slice.
    """
    for user in list(out.users):
        is_view = (user.op == "call_method" and user.target == "view") or (
            user.op == "call_function" and user.target in _VIEWS)
        if not is_view:
            continue
        try:
            _run_fake(user)
        except RuntimeError:
            with graph.inserting_before(user):
                copy = insert_call(graph, aten.clone.default, (out,), out,
                                   kwargs={"memory_format": torch.contiguous_format})
            user.replace_input_with(out, copy)


def _group_members(gm: torch.fx.GraphModule, weights: WeightTable, x_node: torch.fx.Node,
                   dtype: torch.dtype) -> list[_Member] | None:
    """The projections reading ``x_node``, if every user of it is one that qualifies."""
    members = []
    for user in x_node.users:
        if not (user.op == "call_function" and user.target == qsparse.sparse_linear.default
                and user.args[0] is x_node and not user.kwargs):
            return None
        found = _weight_of(gm, weights, user.args[1])
        if found is None:
            return None
        weight, layout = found
        bias_node = user.args[2] if len(user.args) > 2 else None
        bias = None
        if bias_node is not None:
            bias = _real_value(gm, weights, bias_node)
            if bias is None or bias.dim() != 1:
                return None
        if any(t is not None and (not t.is_cpu or t.dtype != dtype) for t in (weight, bias)):
            return None
        out_features = weight.shape[0] if layout == "out_in" else weight.shape[1]
        if bias is not None and bias.shape[0] != out_features:
            return None
        members.append(_Member(user, weight, layout, bias, out_features))
    return members or None


def _prepared_weight(members: list[_Member], dtype: torch.dtype) -> torch.Tensor:
    """``cat([W_i^T])``; a single ``[in, out]`` weight is used as it is (already K-major)."""
    if len(members) == 1 and members[0].layout == "in_out" and members[0].weight.stride(1) == 1:
        return members[0].weight.detach()
    return topk_linear_op.prepare_group_weight(
        [m.weight if m.layout == "out_in" else m.weight.t() for m in members], "out_in", dtype)


def _prepared_bias(members: list[_Member], dtype: torch.dtype) -> torch.Tensor | None:
    if all(m.bias is None for m in members):
        return None
    if len(members) == 1:
        return members[0].bias.detach().contiguous()
    return torch.cat([m.bias.detach() if m.bias is not None else
                      torch.zeros(m.out_features, dtype=dtype) for m in members]).contiguous()


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
    # the input nodes of sparse_linear, in graph order, each once
    x_nodes = list(dict.fromkeys(
        n.args[0] for n in graph.nodes
        if n.op == "call_function" and n.target == qsparse.sparse_linear.default
        and isinstance(n.args[0], torch.fx.Node)))
    for x_node in x_nodes:
        found = _chain_to_sparsify(x_node)
        if found is None:
            continue
        sparsify, chain = found
        source = sparsify.args[0]
        meta = tensor_meta(x_node)
        if meta is None or meta.dtype not in SUPPORTED_DTYPES or meta.dim() < 1:
            continue
        rows = _static_rows(meta)
        if rows is None or not 1 <= rows <= MAX_ROWS:
            continue
        members = _group_members(gm, weights, x_node, meta.dtype)
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
            wt_node = _register(gm, _prepared_weight(members, meta.dtype), sparsify, "wt")
            bias = _prepared_bias(members, meta.dtype)
            b_node = None if bias is None else _register(gm, bias, sparsify, "b")
            x_in = source
            for view in chain:  # sparsify commutes with row-preserving views: view the input
                x_in = insert_call(graph, view.target, (x_in, *view.args[1:]), view,
                                   kwargs=dict(view.kwargs), op=view.op)
            y = insert_call(graph, qsparse.cpu_topk_linear.default,
                            (x_in, k, n, m, rescale, wt_node, b_node, max_rows), members[0].node)
            offset = 0
            for mb in members:
                if len(members) == 1:
                    out = y
                else:
                    out = insert_call(graph, aten.slice.Tensor,
                                      (y, -1, offset, offset + mb.out_features), mb.node)
                offset += mb.out_features
                mb.node.replace_all_uses_with(out)
                if out is not y:
                    _make_viewable(graph, out)
        weight_args = [mb.node.args[1] for mb in members]  # erasing a node clears its args
        for mb in members:
            graph.erase_node(mb.node)
        # targeted clean-up, not a graph-wide dead-code pass: that would also delete in-place
        # method calls whose result is unused (a static KV cache's index_copy_)
        for node in [*reversed(chain), sparsify, *weight_args]:
            _erase_if_unused(graph, node)
        replaced += 1
    if replaced:
        gm.recompile()
    return replaced


def _erase_if_unused(graph: torch.fx.Graph, node: object) -> None:
    """Erase a view, sparsify or transpose node that nothing reads any more."""
    if isinstance(node, torch.fx.Node) and node.op in ("call_function", "call_method") \
            and not node.users and node.graph is graph:
        graph.erase_node(node)
