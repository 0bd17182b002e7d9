"""The eager reference: Q-Sparse's exact semantics (DESIGN.md) in plain, readable PyTorch.

This module is the oracle every op, kernel and pass is compared against. It uses no custom ops
and favours clarity over speed: the top-K mask comes from a stable sort, not from the
threshold selection the ops and kernels use, so agreeing with it is evidence, not tautology.

Everything acts on the last dimension (a row is one token's features).
"""

from __future__ import annotations

import contextlib

import torch

from . import plan as plan_module
from .config import ProjectionPlan, QSparseConfig
from .modules import ProjectionModule, projection_modules
from .plan import resolve_plan

__all__ = [
    "topk_mask",
    "block_mask",
    "l2_rescale_factor",
    "topk_sparsify",
    "block_sparsify",
    "int8_fake_quant",
    "ternary_fake_quant",
    "sparsify_input",
    "projection",
    "reference_model",
    "rms_norm",
    "norm_sparsify",
    "REFERENCE_OPS",
]


def topk_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask keeping the ``k`` largest ``|x|`` of each row.

    Ties at the k-th magnitude go to the lower index: a stable descending sort keeps equal
    magnitudes in index order. ``torch.sort`` orders NaN above every number, so NaNs are kept.
    """
    order = torch.sort(x.abs(), dim=-1, descending=True, stable=True).indices
    mask = torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    return mask.scatter(-1, order[..., :k], True)


def block_mask(x: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Boolean mask keeping the ``n`` largest ``|x|`` in each group of ``m`` consecutive entries."""
    groups = x.reshape(*x.shape[:-1], x.shape[-1] // m, m)
    return topk_mask(groups, n).reshape(x.shape)


def l2_rescale_factor(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-row float32 factor ``||x|| / ||x * mask||`` (1 where the masked row is all zero)."""
    full = torch.linalg.vector_norm(x.float(), dim=-1, keepdim=True)
    kept = torch.linalg.vector_norm(torch.where(mask, x, 0).float(), dim=-1, keepdim=True)
    return torch.where(kept > 0, full / kept, torch.ones_like(kept))


class _StraightThrough(torch.autograd.Function):
    """Forward: ``value``. Backward: the upstream gradient, optionally scaled and masked.

    This is DESIGN.md point 7: the mask (and any quantizer) is transparent to the gradient;
    ``grad_scale`` (the rescale factor) multiplies it as a constant; ``grad_mask`` is the
    ``ste=False`` ablation.
    """

    @staticmethod
    def forward(ctx, x, value, grad_scale, grad_mask):  # noqa: D102
        ctx.save_for_backward(grad_scale, grad_mask)
        return value

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        scale, mask = ctx.saved_tensors
        if scale is not None:
            grad = (grad.float() * scale).to(grad.dtype)
        if mask is not None:
            grad = torch.where(mask, grad, 0)
        return grad, None, None, None


def _apply_mask(x: torch.Tensor, mask: torch.Tensor, rescale: str, ste: bool) -> torch.Tensor:
    value = torch.where(mask, x, 0)
    scale = None
    if rescale == "l2":
        scale = l2_rescale_factor(x, mask)
        value = (value.float() * scale).to(x.dtype)
    return _StraightThrough.apply(x, value.detach(), scale, None if ste else mask)


def topk_sparsify(
    x: torch.Tensor, k: int, rescale: str = "none", ste: bool = True
) -> torch.Tensor:
    """Keep the top-``k`` magnitudes of each row (exact values), zero the rest."""
    return _apply_mask(x, topk_mask(x.detach(), k), rescale, ste)


def block_sparsify(
    x: torch.Tensor, n: int, m: int, rescale: str = "none", ste: bool = True
) -> torch.Tensor:
    """Keep the top-``n`` magnitudes of every group of ``m`` consecutive entries."""
    return _apply_mask(x, block_mask(x.detach(), n, m), rescale, ste)


def int8_fake_quant(x: torch.Tensor) -> torch.Tensor:
    """Per-row absmax int8 quantize-dequantize, straight-through in the backward pass."""
    xf = x.detach().float()
    gamma = xf.abs().amax(dim=-1, keepdim=True).clamp_min(1e-5)
    q = torch.clamp(torch.round(127.0 * xf / gamma), -128, 127)
    return _StraightThrough.apply(x, (q * gamma / 127.0).to(x.dtype), None, None)


def ternary_fake_quant(w: torch.Tensor) -> torch.Tensor:
    """Per-tensor absmean ternary weights ``{-a, 0, a}``, straight-through (BitNet b1.58)."""
    wf = w.detach().float()
    alpha = wf.abs().mean().clamp_min(1e-5)
    q = torch.clamp(torch.round(wf / alpha), -1, 1)
    return _StraightThrough.apply(w, (q * alpha).to(w.dtype), None, None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Llama's RMSNorm: ``w * (x32 * rsqrt(mean(x32^2) + eps)).to(dtype)``."""
    xf = x.float()
    out = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return out if weight is None else weight * out


def norm_sparsify(x: torch.Tensor, norm: str, weight: torch.Tensor | None,
                  bias: torch.Tensor | None, eps: float, k: int, n: int, m: int,
                  rescale: bool, quant: bool, ste: bool) -> torch.Tensor:
    """What ``qsparse::norm_sparsify`` fuses: ``int8?(sparsify(norm(x)))``, unfused.

    ``m == 0`` selects top-``k``; otherwise block ``n:m``. Gradients flow through the norm by
    autograd and straight through the sparsifier and quantizer.
    """
    if norm == "rms":
        h = rms_norm(x, weight, eps)
    else:
        h = torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    mode = "l2" if rescale else "none"
    out = block_sparsify(h, n, m, mode, ste) if m else topk_sparsify(h, k, mode, ste)
    return int8_fake_quant(out) if quant else out


class _ReferenceOps:
    """The oracle's elementary operations, for :mod:`qsparse_compile.plan`."""

    @staticmethod
    def topk(x, k, rescale, ste):
        return topk_sparsify(x, k, "l2" if rescale else "none", ste)

    @staticmethod
    def block(x, n, m, rescale, ste):
        return block_sparsify(x, n, m, "l2" if rescale else "none", ste)

    relu = staticmethod(torch.relu)
    int8 = staticmethod(int8_fake_quant)
    ternary = staticmethod(ternary_fake_quant)
    linear = staticmethod(torch.nn.functional.linear)


#: The oracle's operations (sort-based masks, autograd.Function straight-through).
REFERENCE_OPS = _ReferenceOps()


def sparsify_input(x: torch.Tensor, plan: ProjectionPlan, config: QSparseConfig) -> torch.Tensor:
    """A projection's input as the model sees it: sparsified by ``plan``, then quantized."""
    return plan_module.sparsify_input(x, plan, config, REFERENCE_OPS, x.shape[-1])


def projection(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    plan: ProjectionPlan,
    config: QSparseConfig,
) -> torch.Tensor:
    """``y = sparsify(x) W^T + b`` as specified; ternary weights when ``quant="bitnet"``."""
    return plan_module.project(x, weight, bias, plan, config, REFERENCE_OPS, x.shape[-1])


@contextlib.contextmanager
def reference_model(model: torch.nn.Module, config: QSparseConfig | None = None, **options):
    """Within the block, ``model`` computes every projection through this module's oracle.

    Forward hooks replace the output of each ``nn.Linear`` (and ``Conv1D``-style module with a
    ``[in, out]`` weight) with :func:`projection` under the config's plan for its module path,
    so the eager model is the reference a compiled model must match, forward and backward.
    Block patterns that do not divide a projection's width leave it dense, as the pass does.
    """
    config = QSparseConfig.from_options(config, **options)
    handles = []

    def hook(plan, proj: ProjectionModule):
        def run(module, inputs, output):
            return projection(inputs[0], proj.weight_out_in(), proj.bias, plan, config)
        return run

    for proj in projection_modules(model):
        # block patterns that do not divide the width leave it dense, as the pass does
        plan = resolve_plan(proj.path, proj.in_features, config, warn=False).plan
        handles.append(proj.module.register_forward_hook(hook(plan, proj)))
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()
