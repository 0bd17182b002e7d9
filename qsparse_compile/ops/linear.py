"""The projection on an already-sparsified input: ``y = x_s @ W^T + b``.

A separate op (rather than ``aten.linear``) so that device back ends can swap in kernels that
skip the weight rows of zeroed activations; this CPU implementation is the dense product, correct
for any number of tokens and any leading shape.
"""

from __future__ import annotations

import torch

from .checks import check_float


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    check_float("sparse_linear", "x", x)
    check_float("sparse_linear", "weight", weight)
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"qsparse.sparse_linear: expected x [..., in_features] and weight "
            f"[out_features, in_features], got x {tuple(x.shape)} and weight {tuple(weight.shape)}"
        )
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(
            f"qsparse.sparse_linear: x, weight and bias must share a dtype, got "
            f"{x.dtype}, {weight.dtype}, {None if bias is None else bias.dtype}"
        )


@torch.library.custom_op("qsparse::sparse_linear", mutates_args=())
def sparse_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight^T + bias`` where ``x`` is a sparsified activation."""
    _check(x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)


@sparse_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    _check(x, weight, bias)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup(ctx, inputs, output) -> None:
    x, weight, bias = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight)


def _backward(ctx, grad):
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


sparse_linear.register_autograd(_backward, setup_context=_setup)
