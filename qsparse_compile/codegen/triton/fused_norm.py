"""Fused RMSNorm / LayerNorm + top-K (or N:M) + L2 rescale + int8 fake-quant, one kernel.

What a pre-norm transformer computes in front of q/k/v and gate/up: ``int8?(sparsify(norm(x)))``.
The row kernel (:mod:`.row_template`) computes the norm's statistics in fp32, the normalised
activation exactly as the unfused graph rounds it, selects, rescales and quantizes in registers,
and writes the result: one read and one write of the activation when the row fits one tile.

Norms, as :func:`norm_sparsify_reference` (and ``qsparse::norm_sparsify``) define them:

* ``"rms"``: ``w * (x32 * rsqrt(mean(x32^2) + eps)).to(dtype)`` (HF Llama), the product in
  ``promote(dtype, w.dtype)``;
* ``"layer"``: ``F.layer_norm(x, (D,), w, b, eps)`` with fp32 statistics, one rounding.

The kernel's ``rsqrt`` is the correctly rounded ``1 / sqrt`` and its sums run in a different
order than PyTorch's, so the normalised value can differ from the reference by one rounding of
the dtype; the mask is then the exact top-K of the kernel's own normalised row, which may
differ from the reference's only between entries whose magnitudes are that close.
"""

from __future__ import annotations

import torch

from ... import reference
from ...ops.checks import check_block, check_k
from .row_kernel import run_rows
from .template_common import dtype_info

__all__ = ["NORMS", "fused_norm_applies", "norm_sparsify", "norm_sparsify_reference"]

NORMS = ("rms", "layer")
_OP = "norm_sparsify"

#: Element types the row kernels take (``template_common.DTYPES``; kept here so deciding
#: whether the kernel applies does not import Triton).
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def fused_norm_applies(x: torch.Tensor, norm: str, weight: torch.Tensor | None,
                       bias: torch.Tensor | None) -> bool:
    """Whether the fused kernel computes ``qsparse::norm_sparsify`` for these inputs (tensors
    or their fake values): supported dtypes, ``[D]`` parameters, no RMSNorm bias, and a
    LayerNorm's parameters in ``x``'s dtype."""
    if x.dtype not in _KERNEL_DTYPES or x.dim() < 1 or norm not in NORMS:
        return False
    if any(t is not None and (t.dtype not in _KERNEL_DTYPES or tuple(t.shape) != (x.shape[-1],))
           for t in (weight, bias)):
        return False
    if norm == "rms":
        return bias is None
    return all(t is None or t.dtype == x.dtype for t in (weight, bias))


def _check(x: torch.Tensor, norm: str, weight: torch.Tensor | None,
           bias: torch.Tensor | None, k: int, n: int, m: int) -> torch.dtype:
    """Validate; return the output dtype."""
    dtype_info(x.dtype, _OP)
    if norm not in NORMS:
        raise ValueError(f"qsparse_triton.{_OP}: norm must be one of {NORMS}, got {norm!r}")
    if x.dim() < 1:
        raise ValueError(f"qsparse_triton.{_OP}: x must have at least one dimension (features)")
    d = x.shape[-1]
    for label, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            dtype_info(t.dtype, _OP)
            if tuple(t.shape) != (d,):
                raise ValueError(
                    f"qsparse_triton.{_OP}: {label} must have shape ({d},), got {tuple(t.shape)}"
                )
    if norm == "rms" and bias is not None:
        raise ValueError(f"qsparse_triton.{_OP}: norm='rms' takes no bias, got one")
    if norm == "layer" and any(t is not None and t.dtype != x.dtype for t in (weight, bias)):
        raise TypeError(
            f"qsparse_triton.{_OP}: norm='layer' needs weight and bias in x's dtype "
            f"({x.dtype}), got {None if weight is None else weight.dtype} and "
            f"{None if bias is None else bias.dtype}"
        )
    if m:
        check_block(_OP, n, m, d)
    else:
        check_k(_OP, k, d)
    if weight is None:
        return x.dtype
    return torch.promote_types(x.dtype, weight.dtype)


def norm_sparsify(
    x: torch.Tensor, norm: str, weight: torch.Tensor | None, bias: torch.Tensor | None,
    eps: float, k: int, n: int = 0, m: int = 0, rescale: bool = False, quant: bool = False,
    *, return_mask: bool = False, chunk: int | None = None, select: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``int8?(sparsify(norm(x)))`` in one kernel.

    Args:
        x: ``[..., D]`` fp32/fp16/bf16 activations.
        norm: ``"rms"`` or ``"layer"``.
        weight: ``[D]`` norm weight or ``None``.
        bias: ``[D]`` LayerNorm bias or ``None``.
        eps: the norm's epsilon.
        k: entries kept per row (top-K), used when ``m == 0``.
        n, m: keep ``n`` of every ``m`` consecutive entries when ``m > 0``.
        rescale: L2 rescale of each row after masking.
        quant: int8 absmax fake-quant of the kept values.
        return_mask: also return the boolean mask (written by the same kernel).
        chunk, select: tiling overrides (see :func:`.row_kernel.run_rows`).

    Returns:
        The ``[..., D]`` result in ``promote(x.dtype, weight.dtype)``, and the mask if asked.
    """
    out_dtype = _check(x, norm, weight, bias, k, n, m)
    out, mask = run_rows(
        _OP, x, k=k, n=n, m=m, norm=norm, weight=weight, bias=bias, eps=eps,
        rescale=rescale, quant=quant, mask=return_mask, out_dtype=out_dtype, chunk=chunk,
        select=select,
    )
    return (out, mask) if return_mask else out


@torch.no_grad()
def norm_sparsify_reference(
    x: torch.Tensor, norm: str, weight: torch.Tensor | None, bias: torch.Tensor | None,
    eps: float, k: int, n: int = 0, m: int = 0, rescale: bool = False, quant: bool = False,
) -> torch.Tensor:
    """The eager oracle composed with the norm (:func:`qsparse_compile.reference.norm_sparsify`)."""
    return reference.norm_sparsify(x, norm, weight, bias, eps, k, n, m, rescale, quant, True)


@torch.no_grad()
def normalise_reference(x: torch.Tensor, norm: str, weight: torch.Tensor | None,
                        bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """The norm alone, as the reference computes it (what the selection looks at)."""
    if norm == "rms":
        return reference.rms_norm(x, weight, eps)
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, eps)
