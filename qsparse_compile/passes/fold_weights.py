"""Inference graphs: weight fake quantizers on real weights become prepared constants.

A weight format (``weights="int8"`` / ``"int4"``) or ``quant="bitnet"``'s ternary weights are
expressed in the rewritten graph as a fake quantizer on the weight,
``sparse_linear(S, int4_weight_fake_quant(W, -1), b)``: right for training (straight-through),
and what every entry point computes. Where the CPU decode lowering takes a group, its packed
kernel reads the codes directly. What is left (prefill graphs with many rows, groups no kernel
takes) would quantize the weights again on every call; in an inference graph the weights are
constants (as under Inductor's freezing), so this pass computes the quantizer's output once
and reads that instead. The numbers do not change: the constant *is* the quantizer's output,
and it is made again from the current weights when they change (:mod:`.constants`).

The quantizer's input may be the weight itself or the weight through single-input views and
casts (``aten.t`` of a ``Conv1D`` weight, a dtype cast); the same chain is replayed on the
weight.
"""

from __future__ import annotations

import torch
import torch.fx

from .. import ops  # noqa: F401  (registers torch.ops.qsparse)
from .constants import AddConstant
from .decode_groups import WEIGHT_FORMAT_OPS
from .node_args import arguments
from .weights import WeightTable

__all__ = ["fold_weight_formats"]

aten = torch.ops.aten

#: Ops a weight may pass through on its way to the quantizer (one tensor input each).
_CHAIN_OPS = (aten.t.default, aten.transpose.int, aten._to_copy.default, aten.view.default,
              aten.permute.default, aten.clone.default)


def _weight_chain(weights: WeightTable, node: object
                  ) -> tuple[torch.fx.Node, list[torch.fx.Node]] | None:
    """(the weight, the nodes from it to ``node``, first first) or None."""
    chain: list[torch.fx.Node] = []
    while isinstance(node, torch.fx.Node):
        if weights.is_weight(node):
            return node, chain[::-1]
        if node.op != "call_function" or node.target not in _CHAIN_OPS:
            return None
        chain.append(node)
        node = node.args[0]
    return None


def _replay(chain: list[torch.fx.Node], quantizer: torch.fx.Node, weight: torch.Tensor
            ) -> torch.Tensor:
    value = weight.detach()
    for node in [*chain, quantizer]:
        value = node.target(value, *node.args[1:], **node.kwargs)
    return value


def fold_weight_formats(gm: torch.fx.GraphModule, weights: WeightTable,
                        add_constant: AddConstant) -> int:
    """Replace each weight fake quantizer of ``gm`` whose input is a real weight by a constant
    holding its output; return how many were replaced."""
    graph = gm.graph
    folded = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in WEIGHT_FORMAT_OPS:
            continue
        found = _weight_chain(weights, arguments(node)["w"])
        if found is None:
            continue
        source, chain = found
        value = weights.value(source)
        if value is None:
            continue
        with torch.no_grad():
            const = add_constant(
                _replay(chain, node, value), node, "wq", sources=[source],
                recipe=lambda tensors, chain=chain, node=node: _replay(chain, node, tensors[0]))
        node.replace_all_uses_with(const)
        graph.erase_node(node)
        folded += 1
    return folded
