"""Projection groups for the decode passes: find them, prepare constants, splice in one call.

After the rewrite (and sharing), several projections read one sparsified tensor::

    q = qsparse.sparse_linear(S, W_q, b_q)
    k = qsparse.sparse_linear(S, W_k, b_k)
    v = qsparse.sparse_linear(S, W_v, b_v)

A decode pass replaces such a group by one product over the concatenated, K-major weights
``cat([W_q^T, W_k^T, W_v^T], dim=1)`` prepared once at compile time, and splits the output with
column views. What differs between the CPU pass (:mod:`.cpu_decode`) and the Triton pass
(:mod:`.cuda_decode`) is the op called and which devices and dtypes qualify; everything here is
shared by both.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable

import torch
import torch.fx

from .. import ops  # noqa: F401  (registers torch.ops.qsparse)
from .constants import buffer_constants
from .graph_utils import _run_fake, insert_call
from .weights import WeightTable

__all__ = [
    "Member",
    "group_members",
    "k_major_weight",
    "prepared_bias",
    "real_value",
    "register_constant",
    "sparse_linear_inputs",
    "splice_group",
    "static_rows",
]

aten = torch.ops.aten
qsparse = torch.ops.qsparse

#: Prefix of the buffers holding prepared weights on the graph module.
BUFFER_PREFIX = "_qsparse_decode"


@dataclasses.dataclass
class Member:
    """One projection of a group: ``sparse_linear(x_node, weight, bias)``."""

    node: torch.fx.Node
    weight: torch.Tensor  # the real tensor
    layout: str  # "out_in" (nn.Linear) or "in_out" (Conv1D, read through aten.t)
    bias: torch.Tensor | None
    out_features: int


def real_value(gm: torch.fx.GraphModule, weights: WeightTable,
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
    value = real_value(gm, weights, node)
    if value is not None:
        return value, "out_in"
    if isinstance(node, torch.fx.Node) and node.op == "call_function" and \
            node.target == aten.t.default:
        value = real_value(gm, weights, node.args[0])
        if value is not None:
            return value, "in_out"
    return None


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
        n.args[0] for n in graph.nodes
        if n.op == "call_function" and n.target == qsparse.sparse_linear.default
        and isinstance(n.args[0], torch.fx.Node)))


def group_members(gm: torch.fx.GraphModule, weights: WeightTable, x_node: torch.fx.Node,
                  accept: Callable[[torch.Tensor], bool]) -> list[Member] | None:
    """The projections reading ``x_node``, if every user of it is one that qualifies.

    A projection qualifies when its weight (and bias) are real tensors, the weight used
    directly or through ``aten.t`` (Conv1D), and ``accept`` (the pass's device and dtype
    condition) holds for each of them.
    """
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
            bias = real_value(gm, weights, bias_node)
            if bias is None or bias.dim() != 1:
                return None
        if any(t is not None and not accept(t) for t in (weight, bias)):
            return None
        out_features = weight.shape[0] if layout == "out_in" else weight.shape[1]
        if bias is not None and bias.shape[0] != out_features:
            return None
        members.append(Member(user, weight, layout, bias, out_features))
    return members or None


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


def register_constant(gm: torch.fx.GraphModule, tensor: torch.Tensor, like: torch.fx.Node,
                      prefix: str) -> torch.fx.Node:
    """Register ``tensor`` as a buffer of ``gm`` and return a ``get_attr`` node reading it.

    AOTAutograd (Inductor's front end) lifts a Dynamo graph's buffers to graph inputs, so the
    prepared weight is passed by reference on every call and fake-ified like a parameter while
    tracing; it requires a Dynamo source for each lifted name (used to deduplicate inputs),
    which a tensor made here gets as a :class:`ConstantSource` named after the buffer.
    """
    return buffer_constants(gm, BUFFER_PREFIX)(tensor, like, prefix)


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
    for node in [*erase_after, *weight_args]:
        _erase_if_unused(graph, node)


def _erase_if_unused(graph: torch.fx.Graph, node: object) -> None:
    """Erase a view, sparsify or transpose node that nothing reads any more."""
    if isinstance(node, torch.fx.Node) and node.op in ("call_function", "call_method") \
            and not node.users and node.graph is graph:
        graph.erase_node(node)
