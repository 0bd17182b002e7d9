"""Batched (prefill) projections on an N:M-masked input: ``qsparse::block_sparse_linear``.

In a graph on the Triton path, a ``sparse_linear`` that the decode lowering (inference) did not
take and whose input comes from an N:M sparsify whose pattern implies 2:4 (2:4 itself, 1:4,
1:2, 2:8, ...) is retargeted to ``qsparse::block_sparse_linear(x, W, b, n, m)``. That op
records the pattern, which lets its CUDA implementation run PyTorch's 2:4 semi-structured
sparse matmul with the activation as the sparse operand where the GPU takes it (sm80+,
fp16/bf16, accepted shapes: see :mod:`..codegen.semi_structured`); everywhere else it is the
dense product on the masked input, exactly what ``sparse_linear`` computes. The choice among
those is made per call, by the gate, on the real tensors; this pass only establishes that the
input is N:M-masked.

"Comes from" means: through row-preserving views and an int8 quantizer (both keep every zero)
back to ``qsparse.block_sparsify`` or ``qsparse.norm_sparsify`` with ``m > 0``. Importing the
2:4 kernel module registers its CUDA implementation of the op (kernels register onto ops).
"""

from __future__ import annotations

import torch
import torch.fx

from .dims import feature_view
from .node_args import arguments, is_call, retarget

__all__ = ["block_pattern", "use_block_sparse_linear"]

qsparse = torch.ops.qsparse

_SOURCES = (qsparse.block_sparsify.default, qsparse.norm_sparsify.default,
            qsparse.int8_fake_quant.default)


def block_pattern(x: torch.fx.Node) -> tuple[int, int] | None:
    """The ``(n, m)`` mask ``x`` is known to satisfy along its last dimension, or None."""
    node: object = x
    while isinstance(node, torch.fx.Node):
        traced = feature_view(node, lambda n: is_call(n, *_SOURCES))
        if traced is None:
            return None
        source = traced.source
        args = arguments(source)
        if source.target is qsparse.int8_fake_quant.default:
            node = args["x"]  # quantization keeps every zero
            continue
        if source.target is qsparse.block_sparsify.default:
            return int(args["n"]), int(args["m"])
        return (int(args["n"]), int(args["m"])) if args["m"] else None
    return None


def use_block_sparse_linear(gm: torch.fx.GraphModule) -> int:
    """Retarget qualifying ``sparse_linear`` nodes of ``gm``; return how many."""
    from ..codegen.semi_structured import pattern_fits_2_4  # registers the CUDA kernel

    retargeted = 0
    for node in gm.graph.nodes:
        if not is_call(node, qsparse.sparse_linear.default):
            continue
        args = arguments(node)
        pattern = block_pattern(args["x"])
        if pattern is None or not pattern_fits_2_4(*pattern):
            continue
        retarget(node, qsparse.block_sparse_linear.default,
                 {**args, "n": pattern[0], "m": pattern[1]})
        retargeted += 1
    return retargeted
