"""The projection on an already-sparsified input: ``y = x_s @ W^T + b``.

A separate op (rather than ``aten.linear``) so that device back ends can swap in kernels that
skip the weight rows of zeroed activations; this CPU implementation is the dense product, correct
for any number of tokens and any leading shape.
"""

from __future__ import annotations

import torch

from .checks import check_linear_operands


@torch.library.custom_op("qsparse::sparse_linear", mutates_args=())
def sparse_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight^T + bias`` where ``x`` is a sparsified activation."""
    check_linear_operands("sparse_linear", x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)


@sparse_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    check_linear_operands("sparse_linear", x, weight, bias)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def setup_context(ctx, inputs, output) -> None:
    """Save what the backward of ``y = x W^T + b`` needs (shared with ``block_sparse_linear``)."""
    x, weight, bias = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight)


def backward(ctx, grad):
    """Dense products: the straight-through gradient belongs to the sparsify before this op."""
    x, weight = ctx.saved_tensors
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = grad @ weight
    flat_grad = grad.reshape(-1, grad.shape[-1])
    if ctx.needs_input_grad[1]:
        grad_w = flat_grad.t() @ x.reshape(-1, x.shape[-1])
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_b = flat_grad.sum(0)
    return grad_x, grad_w, grad_b


sparse_linear.register_autograd(backward, setup_context=setup_context)
