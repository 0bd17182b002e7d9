"""Fake quantizers (quantize, then dequantize) with straight-through gradients.

``int8_fake_quant`` is per-row absmax int8 for activations (DESIGN.md point 5);
``ternary_fake_quant`` is per-tensor absmean ternary for weights (point 6, BitNet b1.58). Both
compute in float32 and round once back to the input dtype; both pass the gradient unchanged.
"""

from __future__ import annotations

import torch

from .checks import check_float


@torch.library.custom_op("qsparse::int8_fake_quant", mutates_args=())
def int8_fake_quant(x: torch.Tensor) -> torch.Tensor:
    """``q * g / 127`` with ``g = max(max|x|, 1e-5)`` per row, ``q = clamp(round(127 x / g))``."""
    check_float("int8_fake_quant", "x", x)
    xf = x.float()
    gamma = torch.clamp_min(torch.amax(torch.abs(xf), dim=-1, keepdim=True), 1e-5)
    q = torch.clamp(torch.round(127.0 * xf / gamma), -128, 127)
    return (q * gamma / 127.0).to(x.dtype)


@int8_fake_quant.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    check_float("int8_fake_quant", "x", x)
    return torch.empty_like(x)


@torch.library.custom_op("qsparse::ternary_fake_quant", mutates_args=())
def ternary_fake_quant(w: torch.Tensor) -> torch.Tensor:
    """``clamp(round(w / a), -1, 1) * a`` with ``a = max(mean|w|, 1e-5)`` over the whole tensor."""
    check_float("ternary_fake_quant", "w", w)
    wf = w.float()
    alpha = torch.clamp_min(torch.mean(torch.abs(wf)), 1e-5)
    return (torch.clamp(torch.round(wf / alpha), -1, 1) * alpha).to(w.dtype)


@ternary_fake_quant.register_fake
def _(w: torch.Tensor) -> torch.Tensor:
    check_float("ternary_fake_quant", "w", w)
    return torch.empty_like(w)


def _identity_backward(ctx, grad):
    return grad


def _no_context(ctx, inputs, output) -> None:
    pass


int8_fake_quant.register_autograd(_identity_backward, setup_context=_no_context)
ternary_fake_quant.register_autograd(_identity_backward, setup_context=_no_context)
