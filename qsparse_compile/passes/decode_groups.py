"""Projection groups for the decode lowerings: find them, prepare constants, splice in one call.

After the rewrite (and sharing), several projections read one sparsified tensor::

    q = qsparse.sparse_linear(S, W_q, b_q)
    k = qsparse.sparse_linear(S, W_k, b_k)
    v = qsparse.sparse_linear(S, W_v, b_v)

A decode lowering replaces such a group by one product over the concatenated, K-major weights
``cat([W_q^T, W_k^T, W_v^T], dim=1)`` prepared once at compile time from the real weights
(inference graphs treat the weights as constants, as Inductor's freezing does), and splits the
output with column views. What differs between the CPU lowering (:mod:`.cpu_decode`) and the
Triton one (:mod:`.cuda_decode`) is the op called and which devices and dtypes qualify;
everything here is shared by both.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable

import torch
import torch.fx

from .. import ops  # noqa: F401  (registers torch.ops.qsparse)
from .constants import AddConstant
from .dims import trace_dims
from .graph_utils import insert_op, run_fake
from .node_args import arguments, is_call
from .weights import WeightTable

__all__ = [
    "WEIGHT_FORMAT_OPS",
    "Member",
    "group_members",
    "k_major_weight",
    "out_in_weights",
    "prepared_bias",
    "prepared_constants",
    "sparse_linear_inputs",
    "splice_group",
    "static_rows",
    "weight_format",
]

aten = torch.ops.aten
qsparse = torch.ops.qsparse


@dataclasses.dataclass
class Member:
    """One projection of a group: ``sparse_linear(x_node, weight, bias)``.

    ``weight`` / ``bias`` are the real tensors read at compile time; ``weight_node`` /
    ``bias_node`` the graph inputs they are, from which the prepared copy is made again when
    the graph runs with other weights (:mod:`.constants`).
    """

    node: torch.fx.Node
    weight: torch.Tensor
    layout: str  # "out_in" (nn.Linear) or "in_out" (Conv1D, read through aten.t)
    bias: torch.Tensor | None
    out_features: int
    weight_node: torch.fx.Node | None = None
    bias_node: torch.fx.Node | None = None
    #: The weight's format, when the product reads it through a weight fake quantizer:
    #: ``"int8"``, ``"int4"`` or ``"ternary"`` (``quant="bitnet"``); None: the weight itself.
    format: str | None = None


#: Weight fake quantizers a format lowering reads through, and the format each one means.
WEIGHT_FORMAT_OPS = {
    qsparse.int8_weight_fake_quant.default: "int8",
    qsparse.int4_weight_fake_quant.default: "int4",
    qsparse.ternary_fake_quant.default: "ternary",
}


def weight_format(node: object) -> tuple[str | None, object]:
    """``(format, the quantizer's input)`` for a weight read through a weight fake quantizer
    of a ``[out, in]`` operand, else ``(None, node)``."""
    if isinstance(node, torch.fx.Node) and node.op == "call_function" and \
            node.target in WEIGHT_FORMAT_OPS:
        args = arguments(node)
        if args.get("in_dim", -1) == -1:
            return WEIGHT_FORMAT_OPS[node.target], args["w"]
    return None, node


def _weight_of(weights: WeightTable, node: object
               ) -> tuple[torch.Tensor, str, torch.fx.Node] | None:
    """(real weight, layout, its node) for a ``sparse_linear`` weight argument, or None (a
    quantized or cast weight is not a constant the lowering can prepare)."""
    traced = trace_dims(node, weights.is_weight)
    if traced is None or traced.casts or len(traced.labels) != 2:
        return None
    if any(n.target is aten._to_copy.default for n in traced.chain):
        return None
    value = weights.value(traced.source)
    if value is None or value.dim() != 2:
        return None
    return value, ("out_in" if traced.labels == (0, 1) else "in_out"), traced.source


def static_rows(meta: torch.Tensor) -> int | None:
    """Rows per call (product of the leading dims) when all are static ints, else None."""
    # int() of a SymInt does not fail: it specialises the size (a guard), so a graph compiled
    # for dynamic sequence lengths would recompile for every length. Only plain ints count.
    if not all(isinstance(s, int) for s in meta.shape[:-1]):
        return None
    return math.prod(meta.shape[:-1])


def sparse_linear_inputs(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    """The input nodes of ``qsparse.sparse_linear`` calls, in graph order, each once."""
    return list(dict.fromkeys(
        arguments(n)["x"] for n in graph.nodes
        if is_call(n, qsparse.sparse_linear.default)
        and isinstance(arguments(n)["x"], torch.fx.Node)))


def group_members(weights: WeightTable, x_node: torch.fx.Node,
                  accept: Callable[[torch.Tensor], bool],
                  formats: bool = False) -> list[Member] | None:
    """The projections reading ``x_node``, if every user of it is one that qualifies.

    A projection qualifies when its weight (and bias) are real tensors, the weight used
    directly or through ``aten.t`` (Conv1D), and ``accept`` (the lowering's device and dtype
    condition) holds for each of them. With ``formats``, a weight read through one weight
    fake quantizer (:data:`WEIGHT_FORMAT_OPS`) qualifies too, every member with the same one
    (the Member's ``format``); ``accept`` then sees the weight before the quantizer.
    """
    members = []
    for user in x_node.users:
        if not is_call(user, qsparse.sparse_linear.default):
            return None
        args = arguments(user)
        if args["x"] is not x_node:
            return None
        fmt, weight_arg = weight_format(args["weight"]) if formats else (None, args["weight"])
        found = _weight_of(weights, weight_arg)
        if found is None:
            return None
        weight, layout, weight_node = found
        bias = None
        if args["bias"] is not None:
            bias = weights.value(args["bias"]) if weights.is_weight(args["bias"]) else None
            if bias is None or bias.dim() != 1:
                return None
        if any(t is not None and not accept(t) for t in (weight, bias)):
            return None
        out_features = weight.shape[0] if layout == "out_in" else weight.shape[1]
        if bias is not None and bias.shape[0] != out_features:
            return None
        members.append(Member(user, weight, layout, bias, out_features, weight_node,
                              args["bias"] if bias is not None else None, fmt))
    if len({m.format for m in members}) > 1:
        return None  # one call reads one format
    return members or None


def out_in_weights(members: list[Member]) -> list[torch.Tensor]:
    """The members' weights as ``[out, in]`` (a Conv1D ``[in, out]`` weight transposed)."""
    return [m.weight if m.layout == "out_in" else m.weight.t() for m in members]


def k_major_weight(members: list[Member], dtype: torch.dtype) -> torch.Tensor:
    """``cat([W_i^T], dim=1)``, contiguous, detached, on the weights' device.

    A single ``[in, out]`` weight (Conv1D) is K-major already and is used as it is, no copy.
    """
    if len(members) == 1 and members[0].layout == "in_out" and \
            members[0].weight.stride(1) == 1 and members[0].weight.dtype == dtype:
        return members[0].weight.detach()
    parts = [(m.weight.t() if m.layout == "out_in" else m.weight).detach().to(dtype)
             for m in members]
    return torch.cat(parts, dim=1).contiguous()


def prepared_bias(members: list[Member], dtype: torch.dtype) -> torch.Tensor | None:
    """The group's biases concatenated (zeros for members without one); None if none has one."""
    if all(m.bias is None for m in members):
        return None
    if len(members) == 1:
        return members[0].bias.detach().contiguous()
    device = members[0].weight.device
    return torch.cat([m.bias.detach() if m.bias is not None else
                      torch.zeros(m.out_features, dtype=dtype, device=device)
                      for m in members]).contiguous()


def prepared_constants(add_constant: AddConstant, members: list[Member], dtype: torch.dtype,
                       like: torch.fx.Node, prepare: Callable[[list[Member]], torch.Tensor]
                       ) -> tuple[torch.fx.Node, torch.fx.Node | None]:
    """The group's prepared weight ``prepare(members)`` and its bias, added to the graph with
    the recipe that prepares them again from other weights."""
    sources = [m.weight_node for m in members]
    bias_sources = [m.bias_node for m in members if m.bias_node is not None]

    def remade(tensors: list[torch.Tensor], with_bias: bool) -> list[Member]:
        weights = iter(tensors[:len(sources)])
        biases = iter(tensors[len(sources):])
        return [dataclasses.replace(m, weight=next(weights),
                                    bias=next(biases) if m.bias is not None and with_bias
                                    else m.bias) for m in members]

    wt_node = add_constant(prepare(members), like, "wt", sources=sources,
                           recipe=lambda tensors: prepare(remade(tensors, False)))
    bias = prepared_bias(members, dtype)
    if bias is None:
        return wt_node, None
    b_node = add_constant(
        bias, like, "b", sources=[*sources, *bias_sources],
        recipe=lambda tensors: prepared_bias(remade(tensors, True), dtype))
    return wt_node, b_node


_VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)


def _make_viewable(graph: torch.fx.Graph, out: torch.fx.Node) -> None:
    """Give ``view`` users of a column slice a contiguous copy where they need one.

    A slice of the group's output is a strided view (its rows are ``sum(out_features)``
    apart); a ``view`` that only splits the rows works on it, one that merges the last
    dimension with another does not. Such users are found by running them on the fake slice.
    """
    for user in list(out.users):
        if not is_call(user, *_VIEWS):
            continue
        try:
            run_fake(user)
        except RuntimeError:
            with graph.inserting_before(user):
                copy = insert_op(graph, aten.clone.default,
                                 {"self": out, "memory_format": torch.contiguous_format}, out)
            user.replace_input_with(out, copy)


def splice_group(graph: torch.fx.Graph, members: list[Member], y: torch.fx.Node,
                 erase_after: Iterable[object] = ()) -> None:
    """Route each member's users to its columns of ``y`` and erase the members.

    ``y`` computes all members' outputs side by side, in ``members`` order. The graph's
    insertion point must be where ``y`` was inserted (before the first member). Nodes in
    ``erase_after`` (views, a sparsify) are erased afterwards if nothing reads them any more,
    as are the members' weight transposes.
    """
    offset = 0
    for mb in members:
        if len(members) == 1:
            out = y
        else:
            out = insert_op(graph, aten.slice.Tensor,
                            {"self": y, "dim": -1, "start": offset,
                             "end": offset + mb.out_features}, mb.node)
        offset += mb.out_features
        mb.node.replace_all_uses_with(out)
        if out is not y:
            _make_viewable(graph, out)
    weight_args = [arguments(mb.node)["weight"] for mb in members]
    weight_args += [weight_format(w)[1] for w in weight_args if weight_format(w)[0]]
    for mb in members:
        graph.erase_node(mb.node)
    # targeted clean-up (the pass manager's dead-code pass runs after, and keeps side effects)
    for node in [*erase_after, *weight_args]:
        _erase_if_unused(graph, node)


def _erase_if_unused(graph: torch.fx.Graph, node: object) -> None:
    """Erase a view, sparsify or transpose node that nothing reads any more."""
    if isinstance(node, torch.fx.Node) and node.op == "call_function" and not node.users \
            and node.graph is graph:
        graph.erase_node(node)
