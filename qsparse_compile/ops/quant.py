"""Fake quantizers (quantize, then dequantize) with straight-through gradients.

``int8_fake_quant`` is per-row absmax int8 for activations (DESIGN.md point 5);
``ternary_fake_quant`` is per-tensor absmean ternary for weights (point 6, BitNet b1.58);
``int8_weight_fake_quant`` and ``int4_weight_fake_quant`` are the inference weight formats
(point 10): one scale per output channel, or a scale and a minimum per output channel and group
of 32 input features. ``in_dim`` names the dimension that holds the input features (-1 for a
``[out, in]`` weight, -2 for ``[in, out]``); every other dimension is an output channel (or an
expert). All compute in float32 and round once back to the input dtype; all pass the gradient
unchanged.
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


#: Input features per int4 group (GGUF Q4_1's block).
INT4_GROUP = 32


def _check_in_dim(op: str, w: torch.Tensor, in_dim: int) -> int:
    if w.dim() < 2 or in_dim not in (-1, -2):
        raise ValueError(f"qsparse.{op}: needs a weight of at least 2 dimensions and in_dim -1 "
                         f"([out, in]) or -2 ([in, out]), got shape {tuple(w.shape)}, "
                         f"in_dim={in_dim}")
    return in_dim


@torch.library.custom_op("qsparse::int8_weight_fake_quant", mutates_args=())
def int8_weight_fake_quant(w: torch.Tensor, in_dim: int) -> torch.Tensor:
    """``q * s`` with ``s = max(max|W[o, :]|, 1e-8) / 127`` per output channel and
    ``q = clamp(round(W / s), -127, 127)``."""
    check_float("int8_weight_fake_quant", "w", w)
    _check_in_dim("int8_weight_fake_quant", w, in_dim)
    wf = w.float()
    s = torch.clamp_min(torch.amax(torch.abs(wf), dim=in_dim, keepdim=True), 1e-8) / 127.0
    return (torch.clamp(torch.round(wf / s), -127, 127) * s).to(w.dtype)


@torch.library.custom_op("qsparse::int4_weight_fake_quant", mutates_args=())
def int4_weight_fake_quant(w: torch.Tensor, in_dim: int) -> torch.Tensor:
    """``d * q + m`` per output channel and group of 32 input features: ``m = min``,
    ``d = (max - m) / 15``, both stored (rounded) in float16, ``q = clamp(round((W - m) / d),
    0, 15)`` with the stored ``d`` and ``m`` (``q = 0`` where ``d == 0``)."""
    check_float("int4_weight_fake_quant", "w", w)
    _check_in_dim("int4_weight_fake_quant", w, in_dim)
    wf = w.float().movedim(in_dim, -1)
    width = wf.shape[-1]
    padded = -width % INT4_GROUP
    # the last group may be shorter: pad it with copies of its first entry (min/max unchanged)
    if padded:
        edge = wf[..., (width // INT4_GROUP) * INT4_GROUP:][..., :1]
        wf = torch.cat([wf, edge.expand(*wf.shape[:-1], padded)], dim=-1)
    g = wf.unflatten(-1, (-1, INT4_GROUP))
    lo = torch.amin(g, dim=-1, keepdim=True)
    d = ((torch.amax(g, dim=-1, keepdim=True) - lo) / 15.0).half().float()
    m = lo.half().float()
    q = torch.where(d == 0, 0.0, torch.clamp(torch.round((g - m) / d), 0, 15))
    out = (d * q + m).flatten(-2)[..., :width]
    return out.movedim(-1, in_dim).to(w.dtype)


def _weight_fake(w: torch.Tensor, in_dim: int) -> torch.Tensor:
    check_float("weight_fake_quant", "w", w)
    _check_in_dim("weight_fake_quant", w, in_dim)
    return torch.empty_like(w)


int8_weight_fake_quant.register_fake(_weight_fake)
int4_weight_fake_quant.register_fake(_weight_fake)

#: The weight-format fake quantizer of each ``weights=`` format (DESIGN.md point 10).
WEIGHT_FAKE_QUANT = {"int8": int8_weight_fake_quant, "int4": int4_weight_fake_quant}


def _identity_backward(ctx, grad):
    return grad


def _identity_backward_weight(ctx, grad):
    return grad, None


def _no_context(ctx, inputs, output) -> None:
    pass


int8_fake_quant.register_autograd(_identity_backward, setup_context=_no_context)
ternary_fake_quant.register_autograd(_identity_backward, setup_context=_no_context)
int8_weight_fake_quant.register_autograd(_identity_backward_weight, setup_context=_no_context)
int4_weight_fake_quant.register_autograd(_identity_backward_weight, setup_context=_no_context)
