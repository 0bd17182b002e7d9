"""Squared-ReLU GLU (DESIGN.md point 9): ``act(gate(x)) * up(x)`` -> ``relu(gate(x))**2 * up(x)``.

Q-Sparse trains from scratch with ReLU²GLU because it makes the down projection's input
naturally sparse. The pass changes the architecture, so it is opt-in (``relu2_glu=True``) and
meant for training from scratch; it only touches a SiLU/GELU whose input is a projection output
and whose result is multiplied by another projection output (a GLU), never a plain MLP.
Projection outputs are seen through view-like ops (a decomposed ``linear`` reshapes them).
"""

from __future__ import annotations

import torch
import torch.fx

from .dims import trace_dims
from .graph_utils import insert_op
from .node_args import arguments, is_call
from .projections import find_projections
from .weights import WeightTable

__all__ = ["relu2_glu"]

aten = torch.ops.aten

_GATE_ACTIVATIONS = (aten.silu.default, aten.gelu.default)


def relu2_glu(gm: torch.fx.GraphModule, weights: WeightTable) -> int:
    """Rewrite ``gm`` in place; return the number of gate activations replaced."""
    outputs = {p.node for p in find_projections(gm, weights)}

    def is_output(node: object) -> bool:
        return trace_dims(node, lambda n: n in outputs, rows=True) is not None

    graph = gm.graph
    replaced = 0
    for node in list(graph.nodes):
        if not is_call(node, *_GATE_ACTIVATIONS) or not is_output(arguments(node)["self"]):
            continue
        users = list(node.users)
        if len(users) != 1 or not is_call(users[0], aten.mul.Tensor):
            continue
        factors = arguments(users[0])
        other = factors["other"] if factors["self"] is node else factors["self"]
        if not is_output(other):
            continue
        with graph.inserting_before(node):
            relu = insert_op(graph, aten.relu.default, {"self": arguments(node)["self"]}, node)
            squared = insert_op(graph, aten.mul.Tensor, {"self": relu, "other": relu}, node)
        node.replace_all_uses_with(squared)
        graph.erase_node(node)
        replaced += 1
    return replaced
