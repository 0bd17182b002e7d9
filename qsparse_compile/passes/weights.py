"""Which FX nodes are constant weights, what they are called, and what they hold.

A projection is ``x @ W^T`` where ``W`` is a parameter or constant, never an activation. The
graphs the passes rewrite say so in different ways, and this table hides the difference:

* Dynamo graphs (normalised, see :mod:`.normalise`): a placeholder is a weight when its example
  input is, by identity, a parameter or buffer of the compiled root (:mod:`.identity`); names
  and projection paths are ``named_parameters()`` / ``named_modules()`` names;
* ``torch.export`` programs: the graph signature maps placeholders to state-dict names; the
  module a projection is called in comes from the program's ``nn_module_stack`` metadata
  (part of the export IR), so a tied head is still ``lm_head``;
* ``GraphModule``s built by ``symbolic_trace``: ``get_attr`` nodes.

The table also holds the projections' roles (:class:`~qsparse_compile.roles.ProjectionRoles`):
read off the compiled root's module structure for Dynamo graphs, off the parameters' names and
shapes for exported programs (where the compiler adds the graph's rule for the head), and off
names alone otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
import torch.fx

from ..roles import (
    NAMES_ONLY,
    ExpertCount,
    ProjectionRoles,
    projection_roles,
    roles_from_parameters,
)
from .identity import ParameterNames

if TYPE_CHECKING:
    from .tensor_parallel import RowShard

__all__ = ["WeightTable", "path_of_name"]

#: ``(weight node, projection node) -> path``
PathRule = Callable[[torch.fx.Node, torch.fx.Node], str]


def path_of_name(name: str) -> str:
    """``model.layers.0.q_proj.weight`` -> ``model.layers.0.q_proj``; other names unchanged
    (a bare parameter used functionally is named by itself: ``blocks.0.w1``)."""
    if name == "weight":
        return ""
    return name[: -len(".weight")] if name.endswith(".weight") else name


class WeightTable:
    """Maps the constant-weight nodes of a graph to names, projection paths and real values."""

    def __init__(self, names: Mapping[torch.fx.Node, str],
                 values: Mapping[torch.fx.Node, torch.Tensor] | None = None,
                 paths: Mapping[torch.fx.Node, str] | None = None,
                 path_rule: PathRule | None = None,
                 aliases: Mapping[torch.fx.Node, list[str]] | None = None,
                 roles: ProjectionRoles | None = None,
                 row_shards: Mapping[str, RowShard] | None = None):
        self._names = dict(names)
        self._row_shards = dict(row_shards or {})
        self._values = dict(values or {})
        self._paths = dict(paths or {})
        self._path_rule = path_rule
        self._aliases = dict(aliases or {})
        self.roles = roles if roles is not None else NAMES_ONLY

    def role(self, path: str) -> str:
        """The role of the projection at ``path`` (:meth:`ProjectionRoles.role`)."""
        return self.roles.role(path)

    def row_shard(self, path: str) -> RowShard | None:
        """How the input of the projection at ``path`` is sharded across tensor-parallel
        ranks (a row-parallel projection); None: this rank reads whole rows."""
        return self._row_shards.get(path)

    def expert_count(self, path: str) -> ExpertCount | None:
        """Experts held by the weight at ``path`` (None: not an expert weight)."""
        return self.roles.expert_count(path)

    def is_weight(self, node: object) -> bool:
        return isinstance(node, torch.fx.Node) and node in self._names

    def name(self, node: torch.fx.Node) -> str:
        return self._names[node]

    def value(self, node: torch.fx.Node) -> torch.Tensor | None:
        """The real tensor behind a weight node, where the graph's source provides it.

        Passes that prepare weights once at compile time (a K-major copy for a decode kernel,
        a folded rotation) read it here; None where only fake tensors are known.
        """
        value = self._values.get(node)
        if value is None and node.op == "get_attr":
            value = _attribute(node)
        if not isinstance(value, torch.Tensor) or isinstance(value,
                                                             torch._subclasses.FakeTensor):
            return None
        return value

    def projection_paths(self, weight: torch.fx.Node, at: torch.fx.Node) -> list[str]:
        """The module paths the projection ``at`` reading ``weight`` may have: one, unless the
        weight is shared by several projection modules (tied) and the product cannot be told
        apart. The module the product was called in, where the tracer recorded it
        (``nn_module_stack``), picks among the weight's own paths (never adds one)."""
        aliases = self._aliases.get(weight)
        if not aliases:
            return [self.projection_path(weight, at)]
        stack = at.meta.get("nn_module_stack")
        if stack:
            called = str(list(stack.values())[-1][0])
            matches = [p for p in aliases if called == p or called.endswith("." + p)]
            if len(matches) == 1:
                return matches
        return aliases

    def projection_path(self, weight: torch.fx.Node, at: torch.fx.Node) -> str:
        """The module path of the projection ``at`` that reads ``weight``."""
        if weight in self._paths:
            return self._paths[weight]
        if self._path_rule is not None:
            return self._path_rule(weight, at)
        return path_of_name(self._names[weight])

    def add(self, node: torch.fx.Node, like: torch.fx.Node,
            value: torch.Tensor | None = None) -> None:
        """Record a weight a pass added to the graph (a folded copy of ``like``): it keeps the
        original's name and path, so the projection reading it keeps its path."""
        self._names[node] = self._names[like]
        if like in self._paths:
            self._paths[node] = self._paths[like]
        if like in self._aliases:
            self._aliases[node] = self._aliases[like]
        if value is not None:
            self._values[node] = value

    @classmethod
    def for_dynamo(cls, gm: torch.fx.GraphModule, example_inputs: Sequence[object],
                   names: ParameterNames,
                   row_shards: Mapping[str, RowShard] | None = None) -> WeightTable:
        """Placeholders whose example input is a parameter or buffer under ``names``' roots.

        ``gm`` takes the Dynamo graph's inputs in order (the normalised graph does);
        ``row_shards``: the row-parallel projections of a tensor-parallel program.
        """
        table_names: dict[torch.fx.Node, str] = {}
        values: dict[torch.fx.Node, torch.Tensor] = {}
        paths: dict[torch.fx.Node, str] = {}
        aliases: dict[torch.fx.Node, list[str]] = {}
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        for node, example in zip(placeholders, example_inputs, strict=False):
            if isinstance(example, torch.Tensor) and example in names:
                table_names[node] = names.name(example)
                paths[node] = names.projection_path(example)
                values[node] = example
                shared = names.projection_paths(example)
                if len(shared) > 1:
                    aliases[node] = shared
        table_names.update(_get_attrs(gm))
        modules = [projection_roles(root, prefix) for prefix, root in names.roots.items()
                   if isinstance(root, torch.nn.Module)]
        roles = ProjectionRoles.merged(modules) if modules else NAMES_ONLY
        return cls(table_names, values, paths, aliases=aliases, roles=roles,
                   row_shards=row_shards)

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
        shapes = {name: tuple(n.meta["val"].shape) for n, name in names.items()
                  if isinstance(n.meta.get("val"), torch.Tensor)}
        table = cls(names, tensors, roles=roles_from_parameters(shapes))
        table._path_rule = lambda weight, at: _export_path(at, table.name(weight))
        return table

    @classmethod
    def from_graph_module(cls, gm: torch.fx.GraphModule) -> WeightTable:
        """``get_attr`` constants only (``symbolic_trace`` output)."""
        return cls(_get_attrs(gm))


def _export_path(node: torch.fx.Node, weight_name: str) -> str:
    """An exported projection's path: the module it is called in (``nn_module_stack``, whose
    paths are relative to the exported root), unless its weight is a bare parameter of that
    module (``blocks.0.w1``), which names it."""
    stack = node.meta.get("nn_module_stack")
    weight_path = path_of_name(weight_name)
    if not stack:
        return weight_path
    module = str(list(stack.values())[-1][0])
    inside = module == "" or weight_name.startswith(module + ".")
    if inside and weight_name != (f"{module}.weight" if module else "weight"):
        return weight_name
    return module


def _attribute(node: torch.fx.Node) -> object:
    value: object = node.graph.owning_module
    for atom in str(node.target).split("."):
        value = getattr(value, atom, None)
    return value


def _get_attrs(gm: torch.fx.GraphModule) -> dict[torch.fx.Node, str]:
    """``get_attr`` nodes that resolve to tensors."""
    return {node: str(node.target) for node in gm.graph.nodes
            if node.op == "get_attr" and isinstance(_attribute(node), torch.Tensor)}
