"""Arguments of ATen and ``qsparse`` op nodes by name, from the op's schema.

Passes never index ``node.args`` by position: an argument may be given positionally or by
keyword, and defaults may be omitted, so ``node.args[2]`` means different things in different
graphs. :func:`arguments` binds a node's args and kwargs to the names in its operator schema
(``torch._C.FunctionSchema``, the public schema of every ``OpOverload``), defaults included;
:func:`call_with` creates a call from named arguments in the schema's order.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx

__all__ = ["arguments", "call_args", "freeze", "is_call", "is_mutation", "mutation_between",
           "retarget"]


def is_call(node: object, *targets: Any) -> bool:
    """Whether ``node`` is a ``call_function`` of one of ``targets``."""
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and \
        node.target in targets


def _schema(target: Any) -> torch._C.FunctionSchema:
    schema = getattr(target, "_schema", None)
    if schema is None:
        raise TypeError(f"node_args: {target!r} is not an operator overload with a schema")
    return schema


def arguments(node: torch.fx.Node) -> dict[str, Any]:
    """``{name: value}`` of every schema argument of an op node, defaults filled in."""
    schema = _schema(node.target)
    out: dict[str, Any] = {}
    positional = list(node.args)
    for i, arg in enumerate(schema.arguments):
        if i < len(positional) and not arg.kwarg_only:
            out[arg.name] = positional[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            out[arg.name] = arg.default_value
        else:
            raise ValueError(f"node_args: {node.format_node()} gives no value for "
                             f"{arg.name!r} of {schema.name}")
    return out


def call_args(target: Any, values: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """``(args, kwargs)`` calling ``target`` with the named ``values`` (schema order;
    keyword-only arguments as keywords; omitted ones take their defaults)."""
    schema = _schema(target)
    unknown = set(values) - {a.name for a in schema.arguments}
    if unknown:
        raise ValueError(f"node_args: {schema.name} has no argument(s) {sorted(unknown)}")
    args, kwargs = [], {}
    positional = True  # after an omitted (defaulted) argument, the rest go by keyword
    for arg in schema.arguments:
        if arg.name not in values:
            if not arg.has_default_value():
                raise ValueError(f"node_args: {schema.name} needs {arg.name!r}")
            positional = False
            continue
        if arg.kwarg_only or not positional:
            kwargs[arg.name] = values[arg.name]
        else:
            args.append(values[arg.name])
    return tuple(args), kwargs


def retarget(node: torch.fx.Node, target: Any, values: dict[str, Any]) -> None:
    """Make ``node`` call ``target`` with the named ``values`` (keeps its users and meta)."""
    node.target = target
    node.args, node.kwargs = call_args(target, values)


def freeze(value: Any) -> Any:
    """``value`` with lists and dicts turned into tuples, recursively (usable as a key)."""
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, freeze(v)) for k, v in value.items()))
    return value


def is_mutation(node: torch.fx.Node) -> bool:
    """Whether ``node`` calls an op that writes to one of its inputs (its schema says so)."""
    schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
    return schema is not None and schema.is_mutable


def mutation_between(first: torch.fx.Node, last: torch.fx.Node) -> bool:
    """Whether a mutating op runs after ``first`` and before ``last`` (graph order)."""
    node = first.next
    while node is not last and node.op != "root":
        if is_mutation(node):
            return True
        node = node.next
    return False
