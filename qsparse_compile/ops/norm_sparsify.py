"""Fused normalisation + sparsify (+ rescale, + int8 fake-quant): one op for what a pre-norm
transformer computes before its q/k/v or gate/up projections.

``qsparse::norm_sparsify`` equals, by definition, ``int8?(sparsify(norm(x)))`` with

* ``norm="rms"``: ``w * (x32 * rsqrt(mean(x32^2) + eps)).to(dtype)`` (as Llama computes it);
* ``norm="layer"``: ``F.layer_norm(x, (D,), w, b, eps)``;
* ``sparsify``: top-K with ``k`` (``m == 0``) or block ``n:m`` (``m > 0``), optional L2 rescale.

The backward pass is straight-through for the sparsifier and quantizer (DESIGN.md point 7) and
the exact norm gradient, written out so no autograd graph is built inside the op. On CPU this
composes the unfused ops; device back ends replace it with one kernel that reads and writes the
activation once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import check_block, check_float, check_k
from .mask import block_mask, topk_mask
from .sparsify import apply_mask, rescale_factor

NORMS = ("rms", "layer")


def _check(x: torch.Tensor, norm: str, k: int, n: int, m: int, real: bool) -> None:
    check_float("norm_sparsify", "x", x)
    if norm not in NORMS:
        raise ValueError(f"qsparse.norm_sparsify: norm must be one of {NORMS}, got {norm!r}")
    if real:
        if m:
            check_block("norm_sparsify", n, m, x.shape[-1])
        else:
            check_k("norm_sparsify", k, x.shape[-1])


def normalise(x: torch.Tensor, norm: str, weight: torch.Tensor | None,
              bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """The norm alone, computed exactly as the unfused graph does."""
    if norm == "layer":
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    xf = x.float()
    out = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return out if weight is None else weight * out


def _mask(h: torch.Tensor, k: int, n: int, m: int) -> torch.Tensor:
    return block_mask(h, n, m) if m else topk_mask(h, k)


def compose(x: torch.Tensor, norm: str, weight: torch.Tensor | None,
            bias: torch.Tensor | None, eps: float, k: int, n: int, m: int, rescale: bool,
            quant: bool) -> torch.Tensor:
    """The op's forward composed of the unfused ops, on any device (arguments unchecked).

    Device kernels registered for the op fall back to it where they do not apply.
    """
    h = normalise(x, norm, weight, bias, eps)
    out = apply_mask(h, _mask(h, k, n, m), rescale)
    if quant:
        out = torch.ops.qsparse.int8_fake_quant(out)
    return out.contiguous()


@torch.library.custom_op("qsparse::norm_sparsify", mutates_args=())
def norm_sparsify(x: torch.Tensor, norm: str, weight: torch.Tensor | None,
                  bias: torch.Tensor | None, eps: float, k: int, n: int, m: int,
                  rescale: bool, quant: bool, ste: bool) -> torch.Tensor:
    """``int8?(sparsify(norm(x)))``: see the module docstring for each argument."""
    _check(x, norm, k, n, m, real=True)
    return compose(x, norm, weight, bias, eps, k, n, m, rescale, quant)


@norm_sparsify.register_fake
def _(x, norm, weight, bias, eps, k, n, m, rescale, quant, ste):
    _check(x, norm, k, n, m, real=False)
    # as the real op computes it: the RMS chain multiplies by the weight in the promoted
    # dtype; F.layer_norm returns x's dtype
    dtype = torch.promote_types(x.dtype, weight.dtype) if weight is not None and \
        norm == "rms" else x.dtype
    return x.new_empty(x.shape, dtype=dtype)


def _setup(ctx, inputs, output) -> None:
    x, norm, weight, bias, eps, k, n, m, rescale, quant, ste = inputs
    ctx.norm, ctx.eps, ctx.k, ctx.n, ctx.m = norm, eps, k, n, m
    ctx.rescale, ctx.ste = rescale, ste
    ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
    ctx.save_for_backward(x, weight, bias)


def _rms_backward(grad_h: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None,
                  eps: float):
    xf = x.float()
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    normed = xf * r
    grad_w = None
    gn = grad_h.float()
    if weight is not None:
        grad_w = (gn * normed.to(x.dtype).float()).reshape(-1, x.shape[-1]).sum(0)
        gn = gn * weight.float()
    grad_x = r * (gn - normed * (gn * normed).mean(-1, keepdim=True))
    return grad_x, grad_w, None


def _layer_backward(grad_h, x, weight, bias, eps):
    xf = x.float()
    mu = xf.mean(-1, keepdim=True)
    r = torch.rsqrt((xf - mu).pow(2).mean(-1, keepdim=True) + eps)
    normed = (xf - mu) * r
    gn = grad_h.float()
    flat = gn.reshape(-1, x.shape[-1])
    grad_w = (flat * normed.reshape(-1, x.shape[-1])).sum(0) if weight is not None else None
    grad_b = flat.sum(0) if bias is not None else None
    if weight is not None:
        gn = gn * weight.float()
    grad_x = r * (gn - gn.mean(-1, keepdim=True)
                  - normed * (gn * normed).mean(-1, keepdim=True))
    return grad_x, grad_w, grad_b


def _backward(ctx, grad):
    x, weight, bias = ctx.saved_tensors
    if ctx.rescale or not ctx.ste:
        h = normalise(x, ctx.norm, weight, bias, ctx.eps)
        mask = _mask(h, ctx.k, ctx.n, ctx.m)
        if ctx.rescale:
            grad = (grad.float() * rescale_factor(h, mask)).to(grad.dtype)
        if not ctx.ste:
            grad = torch.where(mask, grad, 0)
    if ctx.norm == "rms":
        gx, gw, gb = _rms_backward(grad, x, weight, ctx.eps)
    else:
        gx, gw, gb = _layer_backward(grad, x, weight, bias, ctx.eps)
    gx = gx.to(x.dtype)
    gw = gw.to(weight.dtype) if gw is not None else None
    gb = gb.to(bias.dtype) if gb is not None else None
    return gx, None, gw, gb, None, None, None, None, None, None, None


norm_sparsify.register_autograd(_backward, setup_context=_setup)
