"""Small FX helpers shared by the passes: inserting nodes with correct tracer metadata."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
from torch._guards import detect_fake_mode

from .projections import tensor_meta

_META_KEYS = ("nn_module_stack", "stack_trace", "source_fn_stack")


def _run_fake(node: torch.fx.Node) -> Any:
    args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), tensor_meta)
    first = args[0] if args else None
    fake_mode = detect_fake_mode([first]) if isinstance(first, torch.Tensor) else None
    if fake_mode is None:
        return None
    with fake_mode:
        # Dynamo may record parameters under another fake mode than activations: re-create
        # such tensors (static shapes) in the activation's mode so the op can run on them.
        args, kwargs = torch.utils._pytree.tree_map_only(
            torch.Tensor,
            lambda t: t if getattr(t, "fake_mode", None) is fake_mode else torch.empty_strided(
                t.shape, t.stride(), dtype=t.dtype, device=t.device),
            (args, kwargs),
        )
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return node.target(*args, **kwargs)


def copy_meta(new: torch.fx.Node, like: torch.fx.Node) -> None:
    """Give an inserted node the metadata later stages read: module stack and fake value."""
    for key in _META_KEYS:
        if key in like.meta:
            new.meta[key] = like.meta[key]
    value = _run_fake(new)
    if value is not None:
        new.meta["val" if "val" in like.meta else "example_value"] = value


def insert_call(graph: torch.fx.Graph, target: Any, args: tuple, like: torch.fx.Node,
                kwargs: dict | None = None, op: str = "call_function") -> torch.fx.Node:
    """Insert ``target(*args, **kwargs)`` at the graph's insertion point, metadata from ``like``."""
    node = graph.create_node(op, target, args, kwargs or {})
    copy_meta(node, like)
    return node
