"""Small FX helpers shared by the passes: values recorded by tracers, inserting nodes with
correct metadata, and emitting a Python function's calls as nodes (through FX proxies)."""

from __future__ import annotations

import collections
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
from torch._guards import detect_fake_mode

__all__ = ["copy_meta", "emit", "insert_call", "insert_like", "insert_op", "op_counts", "op_name",
           "run_fake", "tensor_meta"]

_META_KEYS = ("nn_module_stack", "stack_trace", "source_fn_stack")


def tensor_meta(node: object) -> torch.Tensor | None:
    """The (fake) tensor a node produces, as recorded by the tracer (``val``)."""
    if not isinstance(node, torch.fx.Node):
        return None
    value = node.meta.get("val", node.meta.get("example_value"))
    return value if isinstance(value, torch.Tensor) else None


def run_fake(node: torch.fx.Node) -> Any:
    """Run ``node`` on the fake values of its inputs (None when they have none)."""
    args, kwargs = torch.fx.node.map_arg(
        (node.args, node.kwargs), lambda n: n.meta.get("val", n.meta.get("example_value")))
    fakes = [a for a in torch.utils._pytree.tree_leaves((args, kwargs))
             if isinstance(a, torch.Tensor)]
    fake_mode = detect_fake_mode(fakes) if fakes else None
    if fake_mode is None:
        return None
    with fake_mode:
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return node.target(*args, **kwargs)


def copy_meta(new: torch.fx.Node, like: torch.fx.Node) -> None:
    """Give an inserted node the metadata later stages read: module stack and fake value."""
    for key in _META_KEYS:
        if key in like.meta:
            new.meta[key] = like.meta[key]
    value = run_fake(new)
    if value is not None:
        new.meta["val"] = value


def insert_call(graph: torch.fx.Graph, target: Any, args: tuple, like: torch.fx.Node,
                kwargs: dict | None = None, op: str = "call_function") -> torch.fx.Node:
    """Insert ``target(*args, **kwargs)`` at the graph's insertion point, metadata from ``like``."""
    node = graph.create_node(op, target, args, kwargs or {})
    copy_meta(node, like)
    return node


def insert_op(graph: torch.fx.Graph, target: Any, values: dict[str, Any],
              like: torch.fx.Node) -> torch.fx.Node:
    """Insert a call of the op ``target`` with named arguments (schema order), meta from
    ``like``."""
    from .node_args import call_args

    args, kwargs = call_args(target, values)
    return insert_call(graph, target, args, like, kwargs=kwargs)


def insert_like(graph: torch.fx.Graph, node: torch.fx.Node, **changes: Any) -> torch.fx.Node:
    """Insert a copy of the op call ``node`` with some named arguments changed."""
    from .node_args import arguments

    return insert_op(graph, node.target, {**arguments(node), **changes}, node)


class _RecordingTracer(torch.fx.proxy.GraphAppendingTracer):
    """Appends to a graph at its insertion point and remembers the nodes it created."""

    def __init__(self, graph: torch.fx.Graph):
        super().__init__(graph)
        self.created: list[torch.fx.Node] = []

    def create_node(self, *args: Any, **kwargs: Any) -> torch.fx.Node:
        node = super().create_node(*args, **kwargs)
        self.created.append(node)
        return node


def emit(graph: torch.fx.Graph, like: torch.fx.Node, fn: Callable[..., Any],
         *args: Any) -> Any:
    """Record ``fn(*args)`` into ``graph`` at its insertion point; return the result node(s).

    Node arguments become FX proxies, so every torch / ``torch.ops`` call ``fn`` makes becomes
    a node, in order, each with metadata from ``like`` and its fake value; other arguments
    (ints, bools, None) pass through.
    """
    tracer = _RecordingTracer(graph)
    proxies = [torch.fx.Proxy(a, tracer) if isinstance(a, torch.fx.Node) else a for a in args]
    out = fn(*proxies)
    for node in tracer.created:
        copy_meta(node, like)
    return torch.utils._pytree.tree_map(
        lambda v: v.node if isinstance(v, torch.fx.Proxy) else v, out)


def op_name(node: torch.fx.Node) -> str:
    """A short, stable name for a node's target: ``qsparse.sparse_linear.default`` ->
    ``sparse_linear``, ``aten.mm.default`` -> ``mm``; methods keep their name."""
    target = node.target
    if isinstance(target, str):
        return target
    if isinstance(target, torch._ops.OpOverload):
        return target._opname
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name.split("::")[-1]
    if target is operator.matmul:
        return "matmul"
    return getattr(target, "__name__", str(target))


def op_counts(gm: torch.fx.GraphModule) -> collections.Counter:
    """How many times each op is called in ``gm`` (placeholders, outputs, attributes skipped)."""
    return collections.Counter(
        op_name(n) for n in gm.graph.nodes if n.op in ("call_function", "call_method"))
