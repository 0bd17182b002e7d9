"""Call the Triton kernels by retargeting a graph's ``qsparse`` nodes to ``qsparse_triton`` ops.

The Triton path is chosen per graph (:mod:`.kernel_select`) and applied to that graph only:
each node whose kernel exists is retargeted, nothing is registered for the whole process, and
graphs on the other path keep the ATen implementations:

==============================================  ==============================================
``qsparse``                                     ``qsparse_triton``
==============================================  ==============================================
``topk_sparsify(x, k, rescale, ste)``           ``topk_sparsify(x, k, rescale, quant=False)``
``block_sparsify(x, n, m, rescale, ste)``       ``block_sparsify(x, n, m, rescale, quant=False)``
``norm_sparsify(x, ..., quant, ste)``           ``norm_sparsify(x, ..., quant)`` where the fused
                                                kernel takes its dtypes
``topk_mask(x, k)`` / ``block_mask(x, n, m)``   the same (masks the backward recomputes)
==============================================  ==============================================

The ``qsparse_triton`` ops have no autograd, so the retargeting happens after autograd: on an
inference graph (the pass manager's lowering stage), or on the forward and backward graphs
AOTAutograd made (the post-grad pass of :mod:`.post_grad`). ``ste`` only shapes the backward,
which is already in the graph by then. Nodes the kernels do not take (float64, a LayerNorm
with mixed dtypes) keep the ``qsparse`` op.
"""

from __future__ import annotations

import torch
import torch.fx

from .graph_utils import tensor_meta
from .node_args import arguments, retarget

__all__ = ["retarget_to_triton"]

qsparse = torch.ops.qsparse


def _triton_call(node: torch.fx.Node) -> tuple[object, dict] | None:
    """(qsparse_triton target, its named arguments) for a ``qsparse`` node, or None."""
    from ..codegen.triton.fused_norm import fused_norm_applies
    from ..codegen.triton.template_common import DTYPES

    triton_ops = torch.ops.qsparse_triton
    args = arguments(node)
    x = tensor_meta(args["x"])
    if x is None or x.dtype not in DTYPES:
        return None
    if node.target is qsparse.topk_sparsify.default:
        return triton_ops.topk_sparsify.default, {
            "x": args["x"], "k": args["k"], "rescale": args["rescale"], "quant": False}
    if node.target is qsparse.block_sparsify.default:
        return triton_ops.block_sparsify.default, {
            "x": args["x"], "n": args["n"], "m": args["m"], "rescale": args["rescale"],
            "quant": False}
    if node.target is qsparse.topk_mask.default:
        return triton_ops.topk_mask.default, {"x": args["x"], "k": args["k"]}
    if node.target is qsparse.block_mask.default:
        return triton_ops.block_mask.default, {"x": args["x"], "n": args["n"], "m": args["m"]}
    if node.target is qsparse.norm_sparsify.default:
        weight, bias = tensor_meta(args["weight"]), tensor_meta(args["bias"])
        if (args["weight"] is not None and weight is None) or (
                args["bias"] is not None and bias is None):
            return None
        if not fused_norm_applies(x, args["norm"], weight, bias):
            return None
        del args["ste"]
        return triton_ops.norm_sparsify.default, args
    return None


_TARGETS = (qsparse.topk_sparsify.default, qsparse.block_sparsify.default,
            qsparse.topk_mask.default, qsparse.block_mask.default,
            qsparse.norm_sparsify.default)


def retarget_to_triton(graph: torch.fx.Graph) -> int:
    """Retarget the ``qsparse`` sparsify and mask nodes of ``graph``; return how many.

    Only for graphs past autograd (see the module docstring).
    """
    from ..codegen.triton import ops as _registers  # noqa: F401  (torch.ops.qsparse_triton)

    lowered = 0
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in _TARGETS:
            continue
        found = _triton_call(node)
        if found is None:
            continue
        retarget(node, *found)
        lowered += 1
    return lowered
