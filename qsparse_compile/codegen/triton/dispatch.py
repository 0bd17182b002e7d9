"""Route the CUDA forward of the ``qsparse::`` mask and sparsify ops to the Triton kernels.

:func:`register_cuda_kernels` registers CUDA implementations (``torch.library.register_kernel``)
for ``qsparse::topk_sparsify``, ``qsparse::block_sparsify``, ``qsparse::topk_mask``,
``qsparse::block_mask`` and ``qsparse::norm_sparsify`` (the fused norm + top-K/N:M + rescale +
int8 kernel of :mod:`.fused_norm`). The ops keep their fakes and their straight-through autograd
(the backward recomputes the mask through ``qsparse::*_mask``, which then also runs on the
kernel), so graphs, Inductor and ``torch.export`` still see the ordinary ``qsparse`` ops. The
``qsparse`` backend calls it when it compiles a graph whose weights are on CUDA.
Call it only where CUDA and Triton are available; it refuses otherwise, and nothing in the
package calls it on import.

float64 has no Triton kernel: those calls keep the ATen implementation of the ops, as do
``norm_sparsify`` calls the fused kernel does not take (a LayerNorm whose weight or bias has
another dtype than ``x``).
"""

from __future__ import annotations

import torch

from ...ops import checks
from ...ops import mask as aten_mask
from ...ops import sparsify as aten_sparsify
from ...ops.norm_sparsify import _check as check_norm_sparsify  # the op's own messages
from ...ops.norm_sparsify import compose as compose_norm_sparsify
from . import fused_norm
from . import row_sparsify as kernels
from .template_common import DTYPES

__all__ = ["IMPLEMENTATIONS", "fused_norm_applies", "register_cuda_kernels", "registered"]

_registered = False


def _topk_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    checks.check_float("topk_mask", "x", x)
    checks.check_k("topk_mask", k, x.shape[-1])
    if x.dtype not in DTYPES:
        return aten_mask.select_top(aten_mask.magnitude_key(x), k).contiguous()
    return kernels.topk_mask(x, k)


def _block_mask(x: torch.Tensor, n: int, m: int) -> torch.Tensor:
    checks.check_float("block_mask", "x", x)
    checks.check_block("block_mask", n, m, x.shape[-1])
    if x.dtype not in DTYPES:
        key = aten_mask.magnitude_key(x).reshape(*x.shape[:-1], x.shape[-1] // m, m)
        return aten_mask.select_top(key, n).reshape(x.shape).contiguous()
    return kernels.block_mask(x, n, m)


def _topk_sparsify(x: torch.Tensor, k: int, rescale: bool, ste: bool) -> torch.Tensor:
    # ``ste`` only changes the backward pass, which the op's autograd formula handles
    checks.check_float("topk_sparsify", "x", x)
    checks.check_k("topk_sparsify", k, x.shape[-1])
    if x.dtype not in DTYPES:
        return aten_sparsify.apply_mask(x, _topk_mask(x, k), rescale).contiguous()
    return kernels.topk_sparsify(x, k, rescale)


def _block_sparsify(x: torch.Tensor, n: int, m: int, rescale: bool, ste: bool) -> torch.Tensor:
    checks.check_float("block_sparsify", "x", x)
    checks.check_block("block_sparsify", n, m, x.shape[-1])
    if x.dtype not in DTYPES:
        return aten_sparsify.apply_mask(x, _block_mask(x, n, m), rescale).contiguous()
    return kernels.block_sparsify(x, n, m, rescale)


def fused_norm_applies(x: torch.Tensor, norm: str, weight: torch.Tensor | None,
                       bias: torch.Tensor | None) -> bool:
    """Whether the fused Triton kernel computes ``qsparse::norm_sparsify`` for these inputs."""
    if x.dtype not in DTYPES or x.dim() < 1 or norm not in fused_norm.NORMS:
        return False
    if any(t is not None and (t.dtype not in DTYPES or tuple(t.shape) != (x.shape[-1],))
           for t in (weight, bias)):
        return False
    if norm == "rms":
        return bias is None
    return all(t is None or t.dtype == x.dtype for t in (weight, bias))


def _norm_sparsify(x: torch.Tensor, norm: str, weight: torch.Tensor | None,
                   bias: torch.Tensor | None, eps: float, k: int, n: int, m: int,
                   rescale: bool, quant: bool, ste: bool) -> torch.Tensor:
    # the op's own checks and messages first; ``ste`` only changes the backward pass
    check_norm_sparsify(x, norm, k, n, m, real=True)
    if not fused_norm_applies(x, norm, weight, bias):
        return compose_norm_sparsify(x, norm, weight, bias, eps, k, n, m, rescale, quant)
    return fused_norm.norm_sparsify(x, norm, weight, bias, eps, k, n, m, rescale, quant)


#: op -> its CUDA implementation (exposed so tests can run them on the CPU interpreter).
IMPLEMENTATIONS = {
    "qsparse::topk_mask": _topk_mask,
    "qsparse::block_mask": _block_mask,
    "qsparse::topk_sparsify": _topk_sparsify,
    "qsparse::block_sparsify": _block_sparsify,
    "qsparse::norm_sparsify": _norm_sparsify,
}


def registered() -> bool:
    """Whether :func:`register_cuda_kernels` has run in this process."""
    return _registered


def register_cuda_kernels() -> None:
    """Make the Triton kernels the CUDA implementations of the ``qsparse::`` mask/sparsify ops.

    Idempotent. Raises ``RuntimeError`` when CUDA is not available (the kernels would never run,
    and on a CPU-only machine the ops must keep their CPU implementations).
    """
    global _registered
    if _registered:
        return
    if not torch.cuda.is_available():
        raise RuntimeError(
            "qsparse_compile.codegen.triton.dispatch.register_cuda_kernels: no CUDA device is "
            "available; the Triton kernels only replace the CUDA implementations of the "
            "qsparse ops"
        )
    # the qsparse ops exist: importing ``...ops`` above registered them
    for qualname, impl in IMPLEMENTATIONS.items():
        torch.library.register_kernel(qualname, "cuda", impl)
    _registered = True
