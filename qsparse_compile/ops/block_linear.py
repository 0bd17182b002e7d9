"""The projection on an input already masked ``n:m``: ``qsparse::block_sparse_linear``.

``y = x @ W^T + b`` exactly like ``qsparse::sparse_linear``, with the promise that ``x`` keeps
at most ``n`` of every ``m`` consecutive features (it is the output of an N:M sparsify, possibly
rescaled, quantized or viewed row by row). The promise is what lets a device back end choose a
structured-sparse product; the op does not verify it (that would read the activation once more).

* CPU (and every device without a better kernel): the dense product on the masked input.
* CUDA: PyTorch's 2:4 semi-structured sparse matmul with the activation as the sparse operand
  where :func:`~qsparse_compile.codegen.semi_structured.semi_structured_supported` holds (sm80+,
  a pattern implying 2:4, fp16/bf16, accepted widths), else the dense product. That branch is
  exercised only on a GPU.

The backward pass is ``sparse_linear``'s (dense products; the mask's straight-through gradient
belongs to the sparsify op before this one).
"""

from __future__ import annotations

import torch

from ..codegen import semi_structured
from . import linear
from .checks import check_block


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, n: int,
           m: int) -> None:
    linear._check(x, weight, bias)
    check_block("block_sparse_linear", n, m, x.shape[-1])


@torch.library.custom_op("qsparse::block_sparse_linear", mutates_args=())
def block_sparse_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        n: int, m: int) -> torch.Tensor:
    """``x @ weight^T + bias`` for ``x`` masked ``n:m`` along its last dimension."""
    _check(x, weight, bias, n, m)
    return torch.nn.functional.linear(x, weight, bias)


@block_sparse_linear.register_fake
def _(x, weight, bias, n, m):
    _check(x, weight, bias, n, m)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def cuda_block_sparse_linear(x: torch.Tensor, weight: torch.Tensor,
                             bias: torch.Tensor | None, n: int, m: int) -> torch.Tensor:
    """The op's CUDA implementation: semi-structured where the gate allows, else dense.

    Plain function, so tests on a machine without a GPU can check its fallback branch.
    """
    _check(x, weight, bias, n, m)
    if semi_structured.semi_structured_supported(x, weight, n, m):
        return semi_structured.semi_structured_linear(x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)


block_sparse_linear.register_kernel("cuda")(cuda_block_sparse_linear)


def _setup(ctx, inputs, output) -> None:
    linear._setup(ctx, inputs[:3], output)


def _backward(ctx, grad):
    return (*linear._backward(ctx, grad), None, None)


block_sparse_linear.register_autograd(_backward, setup_context=_setup)
