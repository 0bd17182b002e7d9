"""Call the ``qsparse_triton`` ops explicitly where no device key routes to them (CPU tensors).

On CUDA the Triton kernels are the registered CUDA implementations of the ``qsparse`` sparsify
ops (:mod:`..codegen.triton.dispatch`), and graphs keep the ordinary ops. ``kernels="triton"``
on CPU tensors (Triton's interpreter) has no such route, so this pass retargets each forward
sparsify node to the ``qsparse_triton`` op that the CUDA implementation would run:

==============================================================  ==================================
``qsparse``                                                     ``qsparse_triton``
==============================================================  ==================================
``topk_sparsify(x, k, rescale, ste)``                           ``topk_sparsify(x, k, rescale,
                                                                False)``
``block_sparsify(x, n, m, rescale, ste)``                       ``block_sparsify(x, n, m,
                                                                rescale, False)``
``norm_sparsify(x, norm, w, b, eps, k, n, m, rescale, quant,    ``norm_sparsify(x, norm, w, b,
ste)``                                                          eps, k, n, m, rescale, quant)``
==============================================================  ==================================

Only in graphs compiled with grad mode off: the ``qsparse_triton`` ops have no backward. Nodes
the kernels do not take (float64, a LayerNorm with mixed dtypes) keep the ``qsparse`` op, as
the CUDA implementations fall back to ATen for them.
"""

from __future__ import annotations

import torch
import torch.fx

from .projections import tensor_meta

__all__ = ["lower_to_triton"]

qsparse = torch.ops.qsparse


def _lowered_args(node: torch.fx.Node) -> tuple[object, tuple] | None:
    """(qsparse_triton target, its args) for a ``qsparse`` sparsify node, or None."""
    from ..codegen.triton.dispatch import fused_norm_applies
    from ..codegen.triton.template_common import DTYPES

    triton_ops = torch.ops.qsparse_triton
    x = tensor_meta(node.args[0]) if node.args else None
    if x is None or x.dtype not in DTYPES or node.kwargs:
        return None
    if node.target == qsparse.topk_sparsify.default:
        x_node, k, rescale, _ste = node.args
        return triton_ops.topk_sparsify.default, (x_node, k, rescale, False)
    if node.target == qsparse.block_sparsify.default:
        x_node, n, m, rescale, _ste = node.args
        return triton_ops.block_sparsify.default, (x_node, n, m, rescale, False)
    if node.target == qsparse.norm_sparsify.default:
        *args, _ste = node.args
        weight, bias = tensor_meta(args[2]), tensor_meta(args[3])
        if (args[2] is not None and weight is None) or (args[3] is not None and bias is None):
            return None
        if not fused_norm_applies(x, args[1], weight, bias):
            return None
        return triton_ops.norm_sparsify.default, tuple(args)
    return None


def lower_to_triton(gm: torch.fx.GraphModule) -> int:
    """Retarget the forward sparsify nodes of ``gm`` to ``qsparse_triton`` ops, in place.

    Returns the number of nodes retargeted (0 when grad mode is on).
    """
    if torch.is_grad_enabled():
        return 0
    from ..codegen.triton import ops as _registers  # noqa: F401  (torch.ops.qsparse_triton)

    lowered = 0
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        found = _lowered_args(node)
        if found is None:
            continue
        node.target, node.args = found
        lowered += 1
    if lowered:
        gm.recompile()
    return lowered
