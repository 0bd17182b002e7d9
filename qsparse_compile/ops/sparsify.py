"""Top-K and block N:M sparsify ops, with the optional L2 rescale and straight-through backward.

Forward (DESIGN.md points 2-4): kept entries keep their exact value; with ``rescale`` each row is
multiplied by ``||x|| / ||x_masked||`` (float32 arithmetic, one rounding back to the dtype).
Backward (point 7): the upstream gradient passes unchanged (``ste=True``) or masked
(``ste=False``); the rescale factor multiplies it as a constant. The mask is recomputed in the
backward pass rather than saved: a bool mask per activation would cost as much memory as the
activation itself in bf16, and the backward needs it only for ``ste=False`` or ``rescale``.
"""

from __future__ import annotations

import torch

from .checks import check_block, check_float, check_k
from .mask import block_mask, topk_mask


def rescale_factor(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-row float32 ``||x|| / ||x * mask||``; 1 where the masked row is all zero."""
    full = torch.linalg.vector_norm(x.float(), dim=-1, keepdim=True)
    kept = torch.linalg.vector_norm(torch.where(mask, x, 0).float(), dim=-1, keepdim=True)
    return torch.where(kept > 0, full / kept, torch.ones_like(kept))


def apply_mask(x: torch.Tensor, mask: torch.Tensor, rescale: bool) -> torch.Tensor:
    """Zero the masked-out entries; rescale rows to their original L2 norm if asked."""
    out = torch.where(mask, x, 0)
    if rescale:
        out = (out.float() * rescale_factor(x, mask)).to(x.dtype)
    return out


# --- top-K -------------------------------------------------------------------------------


@torch.library.custom_op("qsparse::topk_sparsify", mutates_args=())
def topk_sparsify(x: torch.Tensor, k: int, rescale: bool, ste: bool) -> torch.Tensor:
    """Keep the ``k`` largest magnitudes of each row of ``x``; zero the rest."""
    check_float("topk_sparsify", "x", x)
    check_k("topk_sparsify", k, x.shape[-1])
    return apply_mask(x, topk_mask(x, k), rescale).contiguous()


@topk_sparsify.register_fake
def _(x: torch.Tensor, k: int, rescale: bool, ste: bool) -> torch.Tensor:
    check_float("topk_sparsify", "x", x)
    return x.new_empty(x.shape)  # contiguous whatever x's layout, like the real output


def _topk_setup(ctx, inputs, output) -> None:
    x, k, rescale, ste = inputs
    ctx.k, ctx.rescale, ctx.ste = k, rescale, ste
    ctx.save_for_backward(x if (rescale or not ste) else None)


def _topk_backward(ctx, grad):
    if ctx.ste and not ctx.rescale:
        return grad, None, None, None
    (x,) = ctx.saved_tensors
    mask = torch.ops.qsparse.topk_mask(x, ctx.k)
    return _grad(grad, x, mask, ctx.rescale, ctx.ste), None, None, None


topk_sparsify.register_autograd(_topk_backward, setup_context=_topk_setup)


# --- block N:M ---------------------------------------------------------------------------


@torch.library.custom_op("qsparse::block_sparsify", mutates_args=())
def block_sparsify(x: torch.Tensor, n: int, m: int, rescale: bool, ste: bool) -> torch.Tensor:
    """Keep the ``n`` largest magnitudes in every group of ``m`` consecutive entries."""
    check_float("block_sparsify", "x", x)
    check_block("block_sparsify", n, m, x.shape[-1])
    return apply_mask(x, block_mask(x, n, m), rescale).contiguous()


@block_sparsify.register_fake
def _(x: torch.Tensor, n: int, m: int, rescale: bool, ste: bool) -> torch.Tensor:
    check_float("block_sparsify", "x", x)
    return x.new_empty(x.shape)  # contiguous whatever x's layout, like the real output


def _block_setup(ctx, inputs, output) -> None:
    x, n, m, rescale, ste = inputs
    ctx.n, ctx.m, ctx.rescale, ctx.ste = n, m, rescale, ste
    ctx.save_for_backward(x if (rescale or not ste) else None)


def _block_backward(ctx, grad):
    if ctx.ste and not ctx.rescale:
        return grad, None, None, None, None
    (x,) = ctx.saved_tensors
    mask = torch.ops.qsparse.block_mask(x, ctx.n, ctx.m)
    return _grad(grad, x, mask, ctx.rescale, ctx.ste), None, None, None, None


block_sparsify.register_autograd(_block_backward, setup_context=_block_setup)


def _grad(grad: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, rescale: bool,
          ste: bool) -> torch.Tensor:
    if rescale:
        grad = (grad.float() * rescale_factor(x, mask)).to(grad.dtype)
    if not ste:
        grad = torch.where(mask, grad, 0)
    return grad
