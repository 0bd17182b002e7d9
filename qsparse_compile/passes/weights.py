"""Which FX nodes are constant weights, and what are they called.

A projection is ``x @ W^T`` where ``W`` is a parameter or constant, never an activation. The
graphs we rewrite name their constants differently:

* Dynamo graphs lift parameters and buffers to placeholders; ``meta["grapharg"].source`` says
  where each came from (``L['self']._modules['fc']._parameters['weight']``);
* ``torch.export`` graphs lift them too, and the graph signature maps placeholders to names;
* ``GraphModule``s built by ``symbolic_trace`` use ``get_attr`` nodes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
import torch.fx

_SOURCE_PART = re.compile(
    r"\.?_(?:modules|parameters|buffers)\['([^']+)'\]"  # _modules['fc'], _parameters['weight']
    r"|\.([A-Za-z_]\w*)"  # .attr
    r"|\[(\d+)\]"  # [0]
)


def source_to_path(source_name: str) -> str:
    """``L['self']._modules['fc']._parameters['weight']`` -> ``fc.weight``."""
    body = source_name
    for prefix in ("L['self']", "L['fn']", "L['mod']", "L['model']", "G['self']"):
        if body.startswith(prefix):
            body = body[len(prefix):]
            break
    parts = []
    for name, attr, index in _SOURCE_PART.findall(body):
        part = name or attr or index
        if part not in ("_modules", "_parameters", "_buffers"):
            parts.append(part)
    return ".".join(parts)


class WeightTable:
    """Maps the constant-weight nodes of a graph to their qualified names."""

    def __init__(self, names: Mapping[torch.fx.Node, str],
                 values: Mapping[torch.fx.Node, torch.Tensor] | None = None):
        self._names = dict(names)
        self._values = dict(values or {})

    def is_weight(self, node: object) -> bool:
        return isinstance(node, torch.fx.Node) and node in self._names

    def name(self, node: torch.fx.Node) -> str:
        return self._names[node]

    def value(self, node: torch.fx.Node) -> torch.Tensor | None:
        """The real tensor behind a weight node, where the graph's source provides it.

        Passes that prepare weights once at compile time (a K-major copy for a decode kernel)
        read it here; None where only the graph's fake tensors are known.
        """
        return self._values.get(node)

    def add(self, node: torch.fx.Node, name: str, value: torch.Tensor | None = None) -> None:
        """Record a weight a pass added to the graph (a folded copy keeps the original's name,
        so the projection reading it keeps its path)."""
        self._names[node] = name
        if value is not None:
            self._values[node] = value

    @classmethod
    def from_dynamo(cls, gm: torch.fx.GraphModule, example_inputs) -> WeightTable:
        """Placeholders that hold parameters or buffers (Dynamo backend input)."""
        names: dict[torch.fx.Node, str] = {}
        values: dict[torch.fx.Node, torch.Tensor] = {}
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        for node, example in zip(placeholders, example_inputs, strict=False):
            grapharg = node.meta.get("grapharg")
            source = getattr(grapharg, "source", None)
            source_name = source.name() if callable(getattr(source, "name", None)) else str(
                getattr(source, "name", "")
            )
            from_module = "_parameters[" in source_name or "_buffers[" in source_name
            if isinstance(example, torch.nn.Parameter) or from_module:
                names[node] = source_to_path(source_name) or node.name
                if isinstance(example, torch.Tensor):
                    values[node] = example
        names.update(_get_attrs(gm))
        return cls(names, values)

    @classmethod
    def from_export(cls, ep: torch.export.ExportedProgram,
                    values: bool = False) -> WeightTable:
        """Placeholders the export signature marks as parameters, buffers or constants.

        ``values=True`` also records the real tensors (``ep.state_dict`` / ``ep.constants``),
        for passes that fold something into the weights at compile time.
        """
        from torch.export.graph_signature import InputKind

        constant_kinds = {InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR}
        by_name = {spec.arg.name: spec.target for spec in ep.graph_signature.input_specs
                   if spec.kind in constant_kinds}
        names = {n: by_name[n.name] for n in ep.graph.nodes
                 if n.op == "placeholder" and n.name in by_name}
        tensors = {}
        if values:
            stores = (ep.state_dict, ep.constants)
            tensors = {n: store[t] for n, t in names.items() for store in stores if t in store}
        names.update(_get_attrs(ep.graph_module))
        return cls(names, tensors)

    @classmethod
    def from_graph_module(cls, gm: torch.fx.GraphModule) -> WeightTable:
        """``get_attr`` constants only (``symbolic_trace`` output)."""
        return cls(_get_attrs(gm))


def _get_attrs(gm: torch.fx.GraphModule) -> dict[torch.fx.Node, str]:
    """``get_attr`` nodes that resolve to tensors."""
    out = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        value: object = gm
        for atom in str(node.target).split("."):
            value = getattr(value, atom, None)
        if isinstance(value, torch.Tensor):
            out[node] = str(node.target)
    return out
