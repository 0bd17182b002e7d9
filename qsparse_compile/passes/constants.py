"""Compile-time constant tensors a pass adds to a graph (a folded weight, a rotation, a K-major
copy of a group's weights), for either entry point.

A pass prepares a tensor once and the graph must read it on every call without recomputing
it. How depends on who runs the graph:

* Dynamo graphs (:class:`ExtraInputs`): the tensor becomes an extra placeholder after the
  graph's own inputs, and the backend binds the prepared tensors to those placeholders when it
  returns the compiled callable. To the inner compiler (AOTAutograd and Inductor, or eager
  execution) they are ordinary inputs that need no gradient: nothing about Dynamo's own
  bookkeeping of parameters is touched. A prepared tensor made from graph inputs (a K-major
  copy of weights) says which ones and how to make it again: Dynamo reuses one graph for every
  instance of a module class, and weights change (``load_state_dict``, an optimizer step), so
  each call checks that those inputs are the same tensors at the same version and prepares the
  tensor again from the current ones where they are not.
* ``torch.export`` programs (:func:`export_constants`): the verifier allows no ``get_attr``
  tensors (``torch.export.save`` refuses them), so the tensor becomes a lifted constant: a
  placeholder before the user inputs, an ``InputSpec`` of kind ``CONSTANT_TENSOR`` and an
  entry of ``ep.constants``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence

import torch
import torch.fx
from torch._guards import detect_fake_mode

from .graph_utils import tensor_meta

__all__ = ["AddConstant", "ExtraInputs", "export_constants"]

#: ``(tensor, like, name, sources=(), recipe=None) -> node``: adds ``tensor`` to the graph;
#: ``like`` is a node whose fake mode the new node's value joins; ``name`` is a readable stem,
#: made unique here; ``sources`` are the graph inputs ``tensor`` was made from and
#: ``recipe(source_tensors)`` makes it again from them.
AddConstant = Callable[..., torch.fx.Node]
Recipe = Callable[[list[torch.Tensor]], torch.Tensor]

PREFIX = "_qsparse_const"


def _fake_value(node: torch.fx.Node, tensor: torch.Tensor, like: torch.fx.Node) -> None:
    fake_mode = detect_fake_mode([tensor_meta(like)])
    if fake_mode is not None:
        node.meta["val"] = fake_mode.from_tensor(tensor, static_shapes=True)


class ExtraInputs:
    """Constants as extra trailing placeholders of a Dynamo graph; :attr:`values` holds the
    tensors to pass after the graph's own inputs, in order.

    ``example_inputs`` are the inputs the graph was compiled for (the sources of prepared
    tensors are checked against them on every call).
    """

    def __init__(self, gm: torch.fx.GraphModule, example_inputs: Sequence[object] = ()):
        self.gm = gm
        self._inputs = {n: i for i, n in enumerate(
            n for n in gm.graph.nodes if n.op == "placeholder")}
        self._examples = list(example_inputs)
        self.values: list[torch.Tensor] = []
        self.names: list[str] = []
        #: per constant: (graph input positions it is made from, how to make it from the
        #: inputs), or ((), None) for a constant made from nothing in the graph
        self._makers: list[tuple[tuple[int, ...], Callable[[Sequence], torch.Tensor] | None]] = []
        self._constant_of: dict[torch.fx.Node, int] = {}

    def _source(self, node: torch.fx.Node) -> tuple[tuple[int, ...], Callable]:
        """(input positions, ``args -> tensor``) of a source: a graph input, or a constant
        added before (itself made from inputs, or fixed)."""
        if node in self._inputs:
            i = self._inputs[node]
            return (i,), lambda args: args[i]
        if node in self._constant_of:
            j = self._constant_of[node]
            indices, make = self._makers[j]
            if make is None:
                value = self.values[j]
                return (), lambda args: value
            return indices, make
        raise ValueError(f"ExtraInputs: {node.name} is neither a graph input nor a constant")

    def __call__(self, tensor: torch.Tensor, like: torch.fx.Node, name: str,
                 sources: Sequence[torch.fx.Node] = (), recipe: Recipe | None = None
                 ) -> torch.fx.Node:
        graph = self.gm.graph
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        anchor = placeholders[-1] if placeholders else None
        ctx = graph.inserting_after(anchor) if anchor is not None else graph.inserting_before()
        with ctx:
            node = graph.placeholder(f"{PREFIX}_{name}{len(self.values)}")
        _fake_value(node, tensor, like)
        if sources and recipe is None:
            raise ValueError("ExtraInputs: a tensor made from graph inputs needs its recipe")
        found = [self._source(s) for s in sources]
        indices = tuple(dict.fromkeys(i for idx, _ in found for i in idx))
        makers = [make for _, make in found]
        make = (lambda args: recipe([m(args) for m in makers])) if indices else None
        self._constant_of[node] = len(self.values)
        self.values.append(tensor)
        self.names.append(node.name)
        self._makers.append((indices, make))
        return node

    def by_name(self) -> dict[str, torch.Tensor]:
        """Placeholder name -> the tensor bound to it."""
        return dict(zip(self.names, self.values, strict=True))

    def bind(self, compiled: Callable) -> Callable:
        """``compiled`` (which takes the graph's inputs, then the constants) as a callable of
        the graph's own inputs, called as Dynamo calls a backend's result."""
        values = list(self.values)
        if not values:
            return compiled
        remade = [(j, indices, make) for j, (indices, make) in enumerate(self._makers)
                  if indices]
        if not remade:
            def run(*args: object) -> object:
                return compiled(*args, *values)

            return run

        # weak references to the inputs each value was made from, and their versions
        made = {j: [(weakref.ref(self._examples[i]), self._examples[i]._version)
                    for i in indices] for j, indices, _ in remade}

        def run_checked(*args: object) -> object:
            for j, indices, make in remade:
                if any(ref() is not args[i] or version != args[i]._version
                       for (ref, version), i in zip(made[j], indices, strict=True)):
                    with torch.no_grad():
                        values[j] = make(args)
                    made[j] = [(weakref.ref(args[i]), args[i]._version) for i in indices]
            return compiled(*args, *values)

        return run_checked


def export_constants(ep: torch.export.ExportedProgram) -> AddConstant:
    """Constants as lifted ``CONSTANT_TENSOR`` inputs of an exported program."""
    from torch.export.graph_signature import InputKind, InputSpec, TensorArgument

    def add(tensor: torch.Tensor, like: torch.fx.Node, name: str,
            sources: Sequence[torch.fx.Node] = (), recipe: Recipe | None = None
            ) -> torch.fx.Node:
        # a program is a snapshot of its state dict: the constant is made from it, once
        del sources, recipe
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
