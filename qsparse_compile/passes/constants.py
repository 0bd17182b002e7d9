"""Compile-time constant tensors added to a graph by a pass, for either IR.

A pass that prepares a tensor once (a rotated weight, a rotation) must make the graph read it
without recomputing it per call. How depends on who runs the graph:

* Dynamo graphs (and ``symbolic_trace`` ones): a buffer of the ``GraphModule`` read by a
  ``get_attr`` node. AOTAutograd lifts buffers to graph inputs and wants a Dynamo source
  for each lifted name, which a tensor made here gets as a ``ConstantSource``.
* ``torch.export`` programs: ``get_attr`` tensors are not allowed by the program's verifier
  (``torch.export.save`` refuses them), so the tensor becomes a lifted constant: a placeholder
  before the user inputs, an ``InputSpec`` of kind ``CONSTANT_TENSOR`` and an entry of
  ``ep.constants``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx
from torch._guards import detect_fake_mode

from .projections import tensor_meta

#: ``(tensor, like, name) -> node``: adds ``tensor`` to the graph; ``like`` is a node whose
#: fake mode the new node's value joins; ``name`` is a readable stem, made unique here.
AddConstant = Callable[[torch.Tensor, torch.fx.Node, str], torch.fx.Node]

PREFIX = "_qsparse_const"


def _fake_value(node: torch.fx.Node, tensor: torch.Tensor, like: torch.fx.Node) -> None:
    fake_mode = detect_fake_mode([tensor_meta(like)])
    if fake_mode is not None:
        node.meta["val" if "val" in like.meta else "example_value"] = fake_mode.from_tensor(
            tensor, static_shapes=True)


def buffer_constants(gm: torch.fx.GraphModule, prefix: str = PREFIX) -> AddConstant:
    """Constants as buffers of ``gm`` read by ``get_attr`` (Dynamo and symbolic graphs),
    named ``<prefix>_<name><index>``."""

    def add(tensor: torch.Tensor, like: torch.fx.Node, name: str) -> torch.fx.Node:
        from torch._dynamo.source import ConstantSource

        index = 0
        while hasattr(gm, f"{prefix}_{name}{index}"):
            index += 1
        attr = f"{prefix}_{name}{index}"
        gm.register_buffer(attr, tensor)
        sources = getattr(gm, "_param_name_to_source", None)
        if isinstance(sources, dict):
            sources[attr] = ConstantSource(f"{type(gm).__name__}.{attr}")
        node = gm.graph.get_attr(attr)
        _fake_value(node, tensor, like)
        return node

    return add


def export_constants(ep: torch.export.ExportedProgram) -> AddConstant:
    """Constants as lifted ``CONSTANT_TENSOR`` inputs of an exported program."""
    from torch.export.graph_signature import InputKind, InputSpec, TensorArgument

    def add(tensor: torch.Tensor, like: torch.fx.Node, name: str) -> torch.fx.Node:
        graph = ep.graph_module.graph
        specs = ep.graph_signature.input_specs
        index = 0
        while f"{PREFIX}_{name}{index}" in ep.constants:
            index += 1
        target = f"{PREFIX}_{name}{index}"
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        # lifted inputs come first, user inputs last: the new one goes before the first user
        # input (or after every placeholder when there is none)
        first_user = next((i for i, s in enumerate(specs) if s.kind == InputKind.USER_INPUT),
                          len(specs))
        anchor = placeholders[first_user] if first_user < len(placeholders) else None
        if anchor is not None:
            with graph.inserting_before(anchor):
                node = graph.placeholder(f"c{target}")
        else:
            last = placeholders[-1] if placeholders else None
            ctx = graph.inserting_after(last) if last is not None else graph.inserting_before()
            with ctx:
                node = graph.placeholder(f"c{target}")
        specs.insert(first_user, InputSpec(InputKind.CONSTANT_TENSOR,
                                           TensorArgument(node.name), target))
        ep.constants[target] = tensor
        _fake_value(node, tensor, like)
        return node

    return add
