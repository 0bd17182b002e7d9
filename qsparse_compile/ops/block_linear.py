"""The projection on an input already masked ``n:m``: ``qsparse::block_sparse_linear``.

``y = x @ W^T + b`` exactly like ``qsparse::sparse_linear``, with the promise that ``x`` keeps
at most ``n`` of every ``m`` consecutive features (it is the output of an N:M sparsify, possibly
rescaled, quantized or viewed row by row). The promise is what lets a device back end choose a
structured-sparse product; the op does not verify it (that would read the activation once more).

This implementation, for every device, is the dense product on the masked input. A kernel
module may register a better one for a device: :mod:`qsparse_compile.codegen.semi_structured`
registers PyTorch's 2:4 semi-structured sparse matmul as the CUDA implementation (kernels
register onto ops; ops never import kernels).

The backward pass is ``sparse_linear``'s (dense products; the mask's straight-through gradient
belongs to the sparsify op before this one).
"""

from __future__ import annotations

import torch

from . import linear
from .checks import check_block, check_linear_operands


def check_block_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       n: int, m: int) -> None:
    """The op's argument checks (also run by device implementations registered for it)."""
    check_linear_operands("block_sparse_linear", x, weight, bias)
    check_block("block_sparse_linear", n, m, x.shape[-1])


@torch.library.custom_op("qsparse::block_sparse_linear", mutates_args=())
def block_sparse_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        n: int, m: int) -> torch.Tensor:
    """``x @ weight^T + bias`` for ``x`` masked ``n:m`` along its last dimension."""
    check_block_linear(x, weight, bias, n, m)
    return torch.nn.functional.linear(x, weight, bias)


@block_sparse_linear.register_fake
def _(x, weight, bias, n, m):
    check_block_linear(x, weight, bias, n, m)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup(ctx, inputs, output) -> None:
    linear.setup_context(ctx, inputs[:3], output)


def _backward(ctx, grad):
    return (*linear.backward(ctx, grad), None, None)


block_sparse_linear.register_autograd(_backward, setup_context=_setup)
