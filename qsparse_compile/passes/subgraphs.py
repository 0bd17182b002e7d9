"""Graphs inside graphs: the bodies of higher-order ops, where projections hide.

Dynamo puts some regions of a model in a subgraph called by a higher-order op (HOP) instead of
inlining them: activation checkpointing (``tag_activation_checkpoint``: the body is recomputed
in the backward pass), ``torch._higher_order_ops.wrap`` and ``cond``. The passes rewrite those
bodies too, as graphs of their own: a body's placeholders are the HOP's operands, so a body
placeholder is a weight when the operand it receives is one (:func:`body_weights`), with that
weight's name and path. The ``qsparse`` ops inserted in a checkpointed body are recomputed with
it, and their straight-through gradient flows through the recomputation.

HOPs this module does not know (``while_loop``, ``map``, ``flex_attention``, ...) are left as
they are; the backend warns about every projection weight such a graph reads that no pass
rewrote (:func:`unrewritten_weights`).

Tracing a checkpointed region to pre-dispatch ATen reads the body's checkpoint policy from
``GraphModule.meta["_checkpoint_context_fn"]``, which Dynamo sets only for *selective*
checkpointing (a ``context_fn``); for plain checkpointing the key is missing and tracing
fails. :func:`checkpoint_policies_for_tracing` sets it, for the trace only, to the policy
PyTorch applies when there is none (recompute everything), and removes it afterwards, so
the compiled graph runs PyTorch's own default.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from collections.abc import Callable, Iterator

import torch
import torch.fx

from .weights import WeightTable

__all__ = ["SubgraphCall", "body_weights", "checkpoint_policies_for_tracing",
           "subgraph_calls", "unrewritten_weights"]

_POLICY_KEY = "_checkpoint_context_fn"


def _hop(name: str) -> object | None:
    return getattr(torch.ops.higher_order, name, None)


def _body_then_operands(node: torch.fx.Node) -> list[tuple[object, list[object]]]:
    """``hop(body, *operands)``: ``tag_activation_checkpoint``, ``wrap``."""
    return [(node.args[0], list(node.args[1:]))]


def _cond(node: torch.fx.Node) -> list[tuple[object, list[object]]]:
    """``cond(pred, true_fn, false_fn, operands)``: both branches take the operands."""
    operands = list(node.args[3]) if len(node.args) > 3 else []
    return [(node.args[1], operands), (node.args[2], operands)]


#: HOP name -> how its node's arguments split into (body, the operands the body receives)
_LAYOUTS: dict[str, Callable[[torch.fx.Node], list[tuple[object, list[object]]]]] = {
    "tag_activation_checkpoint": _body_then_operands,
    "wrap": _body_then_operands,
    "cond": _cond,
}


@dataclasses.dataclass(frozen=True)
class SubgraphCall:
    """One body called by a HOP node: ``operands[i]`` is what its ``i``-th placeholder gets."""

    node: torch.fx.Node
    body: torch.fx.GraphModule
    operands: tuple[object, ...]

    @property
    def kind(self) -> str:
        return str(getattr(self.node.target, "__name__", self.node.target))


def _known_hops() -> dict[object, Callable]:
    return {op: layout for name, layout in _LAYOUTS.items() if (op := _hop(name)) is not None}


def _submodule(gm: torch.fx.GraphModule, arg: object) -> torch.fx.GraphModule | None:
    if isinstance(arg, torch.fx.Node) and arg.op == "get_attr":
        body = getattr(gm, str(arg.target), None)
        if isinstance(body, torch.fx.GraphModule):
            return body
    return None


def subgraph_calls(gm: torch.fx.GraphModule) -> list[SubgraphCall]:
    """Every body the known HOPs of ``gm`` call (not nested ones: run on each body for those)."""
    layouts = _known_hops()
    calls = []
    for node in gm.graph.nodes:
        layout = layouts.get(node.target) if node.op == "call_function" else None
        if layout is None:
            continue
        for arg, operands in layout(node):
            body = _submodule(gm, arg)
            if body is not None:
                calls.append(SubgraphCall(node, body, tuple(operands)))
    return calls


def body_weights(call: SubgraphCall, outer: WeightTable) -> WeightTable:
    """The weights of ``call.body``: the placeholders whose operand is a weight of ``outer``.

    Each keeps the outer weight's name, value and projection paths (the HOP node stands for
    the place the weight is read from); the roles are the outer table's.
    """
    names, values, paths, aliases = {}, {}, {}, {}
    placeholders = [n for n in call.body.graph.nodes if n.op == "placeholder"]
    for placeholder, operand in zip(placeholders, call.operands, strict=False):
        if not outer.is_weight(operand):
            continue
        names[placeholder] = outer.name(operand)
        paths[placeholder] = outer.projection_path(operand, call.node)
        value = outer.value(operand)
        if value is not None:
            values[placeholder] = value
        shared = outer.projection_paths(operand, call.node)
        if len(shared) > 1:
            aliases[placeholder] = shared
    return WeightTable(names, values, paths, aliases=aliases, roles=outer.roles)


def walk_bodies(gm: torch.fx.GraphModule, weights: WeightTable
                ) -> Iterator[tuple[SubgraphCall, WeightTable]]:
    """Every body under ``gm`` (nested ones too, outermost first) with its weight table."""
    for call in subgraph_calls(gm):
        table = body_weights(call, weights)
        yield call, table
        yield from walk_bodies(call.body, table)


def _recompute_all(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.PREFER_RECOMPUTE


def _checkpoint_bodies(gm: torch.fx.GraphModule) -> Iterator[torch.fx.GraphModule]:
    op = _hop("tag_activation_checkpoint")
    for module in gm.modules():
        if not isinstance(module, torch.fx.GraphModule):
            continue
        for node in module.graph.nodes:
            if node.op == "call_function" and node.target is op:
                body = _submodule(module, node.args[0])
                if body is not None:
                    yield body


@contextlib.contextmanager
def checkpoint_policies_for_tracing(gm: torch.fx.GraphModule) -> Iterator[list]:
    """Within the block, every checkpointed body of ``gm`` has a checkpoint policy (see the
    module docstring); yields a list that the caller fills with the traced graphs, whose
    bodies get the policy removed again on exit."""
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    default = functools.partial(create_selective_checkpoint_contexts, _recompute_all)
    added = list({id(b): b for b in _checkpoint_bodies(gm) if _POLICY_KEY not in b.meta}.values())
    for body in added:
        body.meta[_POLICY_KEY] = default
    traced: list[torch.fx.GraphModule] = []
    # the trace runs the region once on fake tensors and logs that a policy was given
    hop_log = logging.getLogger("torch._higher_order_ops.wrap")
    level = hop_log.level
    hop_log.setLevel(logging.ERROR)
    try:
        yield traced
    finally:
        hop_log.setLevel(level)
        for body in added:
            body.meta.pop(_POLICY_KEY, None)
        for out in traced:
            for body in _checkpoint_bodies(out):
                if body.meta.get(_POLICY_KEY) is default:
                    body.meta.pop(_POLICY_KEY, None)


def unrewritten_weights(gm: torch.fx.GraphModule, weights: WeightTable,
                        is_projection_weight: Callable[[torch.Tensor], bool],
                        found: set[str]) -> list[str]:
    """Paths of the projection modules whose weight ``gm`` (or a body) reads but whose path
    no record has (``found``): read by a product or a HOP the passes do not take.

    ``is_projection_weight(tensor)`` says whether a weight belongs to a projection module.
    Only reads by a product or by a HOP the passes do not enter count: a weight an embedding
    lookup, a regulariser or a statistic reads is not a projection read.
    """
    missed = []
    tables = [(gm, weights)] + [(call.body, table) for call, table in walk_bodies(gm, weights)]
    for graph_module, table in tables:
        known = {call.node for call in subgraph_calls(graph_module)}
        for node in graph_module.graph.nodes:
            if not table.is_weight(node):
                continue
            value = table.value(node)
            if value is None or not is_projection_weight(value):
                continue
            paths = table.projection_paths(node, node)
            if set(paths) & found:
                continue
            # read by a product, or handed to a HOP whose body the passes do not read; other
            # reads (a regulariser, a statistic, an embedding lookup) are not projections
            if any(_is_product(u) or (_is_hop(u) and u not in known) for u in _uses(node)):
                missed.append(paths[0])
    return sorted(set(missed))


def _is_hop(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and isinstance(node.target, torch._ops.HigherOrderOperator)


def _is_product(node: torch.fx.Node) -> bool:
    name = getattr(getattr(node.target, "_overloadpacket", None), "__name__", "")
    return node.op == "call_function" and name in _PRODUCTS


#: ATen products a weight may reach (the normalised spellings, and the grouped ones)
_PRODUCTS = ("mm", "addmm", "bmm", "mv", "addmv", "baddbmm", "addbmm", "matmul", "linear",
             "einsum", "_grouped_mm", "grouped_mm_fallback", "dot", "tensordot")


_VIEWS = ("view", "t", "transpose", "permute", "expand", "unsqueeze", "_to_copy", "detach",
          "alias", "_unsafe_view")


def _uses(node: torch.fx.Node) -> Iterator[torch.fx.Node]:
    """The users of ``node`` through view-like ops and casts."""
    for user in node.users:
        name = getattr(getattr(user.target, "_overloadpacket", None), "__name__", "")
        if user.op == "call_function" and name in _VIEWS:
            yield from _uses(user)
        else:
            yield user
