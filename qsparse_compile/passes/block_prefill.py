"""Batched (prefill) projections on an N:M-masked input: ``qsparse::block_sparse_linear``.

On the Triton path, a ``sparse_linear`` that the decode pass did not take and whose input comes
from an N:M sparsify whose pattern implies 2:4 (2:4 itself, 1:4, 1:2, 2:8, ...) is retargeted to
``qsparse::block_sparse_linear(x, W, b, n, m)``. That op records the pattern, which lets its
CUDA implementation run PyTorch's 2:4 semi-structured sparse matmul with the activation as the
sparse operand where the GPU takes it (sm80+, fp16/bf16, accepted shapes: see
:mod:`..codegen.semi_structured`); everywhere else it is the dense product on the masked input,
exactly what ``sparse_linear`` computes. The choice among those is made per call, by the gate, on
the real tensors; this pass only establishes that the input is N:M-masked.

"Comes from" means: through row-preserving views and an int8 quantizer (both keep every zero)
back to ``qsparse.block_sparsify`` or ``qsparse.norm_sparsify`` with ``m > 0``. The op is
differentiable, so training graphs qualify too.
"""

from __future__ import annotations

import torch
import torch.fx

from ..codegen.semi_structured import pattern_fits_2_4
from .share_inputs import _row_preserving

__all__ = ["block_pattern", "use_block_sparse_linear"]

qsparse = torch.ops.qsparse


def block_pattern(x: torch.fx.Node) -> tuple[int, int] | None:
    """The ``(n, m)`` mask ``x`` is known to satisfy along its last dimension, or None."""
    node = x
    while isinstance(node, torch.fx.Node):
        if node.op == "call_function" and node.target == qsparse.block_sparsify.default:
            return int(node.args[1]), int(node.args[2])
        if node.op == "call_function" and node.target == qsparse.norm_sparsify.default:
            n, m = node.args[6], node.args[7]
            return (int(n), int(m)) if m else None
        if node.op == "call_function" and node.target == qsparse.int8_fake_quant.default:
            node = node.args[0]
        elif _row_preserving(node):
            node = node.args[0]
        else:
            return None
    return None


def use_block_sparse_linear(gm: torch.fx.GraphModule) -> int:
    """Retarget qualifying ``sparse_linear`` nodes of ``gm``; return how many."""
    retargeted = 0
    for node in gm.graph.nodes:
        if not (node.op == "call_function" and node.target == qsparse.sparse_linear.default
                and not node.kwargs):
            continue
        pattern = block_pattern(node.args[0])
        if pattern is None or not pattern_fits_2_4(*pattern):
            continue
        x, weight, *rest = node.args
        bias = rest[0] if rest else None
        node.target = qsparse.block_sparse_linear.default
        node.args = (x, weight, bias, *pattern)
        retargeted += 1
    if retargeted:
        gm.recompile()
    return retargeted
