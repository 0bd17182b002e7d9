"""Squared-ReLU GLU (DESIGN.md point 9): ``act(gate(x)) * up(x)`` -> ``relu(gate(x))**2 * up(x)``.

Q-Sparse trains from scratch with ReLU²GLU because it makes the down projection's input
naturally sparse. The pass changes the architecture, so it is opt-in (``relu2_glu=True``) and
meant for training from scratch; it only touches a SiLU/GELU whose input is a projection output
and whose result is multiplied by another projection output (a GLU), never a plain MLP.
"""

from __future__ import annotations

import operator

import torch
import torch.fx
import torch.nn.functional as F

from .graph_utils import insert_call
from .projections import find_projections
from .weights import WeightTable

aten = torch.ops.aten

_GATE_ACTIVATIONS = {F.silu, F.gelu, torch.nn.functional.silu, aten.silu.default,
                     aten.gelu.default, torch.sigmoid}
_MUL = {operator.mul, torch.mul, aten.mul.Tensor}


def _is_activation(node: torch.fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _GATE_ACTIVATIONS and node.target is not torch.sigmoid
    return node.op == "call_method" and node.target in ("silu", "gelu")


def relu2_glu(gm: torch.fx.GraphModule, weights: WeightTable) -> int:
    """Rewrite ``gm`` in place; return the number of gate activations replaced."""
    outputs = {p.node for p in find_projections(gm, weights)}
    graph = gm.graph
    replaced = 0
    for node in list(graph.nodes):
        if not _is_activation(node) or node.args[0] not in outputs:
            continue
        users = list(node.users)
        is_glu = len(users) == 1 and users[0].op == "call_function" and \
            users[0].target in _MUL and any(
                a in outputs for a in users[0].args if a is not node)
        if not is_glu:
            continue
        with graph.inserting_before(node):
            relu = insert_call(graph, aten.relu.default, (node.args[0],), node)
            squared = insert_call(graph, aten.mul.Tensor, (relu, relu), node)
        node.replace_all_uses_with(squared)
        graph.erase_node(node)
        replaced += 1
    gm.recompile()
    return replaced
