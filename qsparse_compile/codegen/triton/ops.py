"""The Triton kernels as ``torch.library`` ops: ``torch.ops.qsparse_triton.*``.

Registered with ``torch.library.triton_op`` (launches through ``wrap_triton``) where PyTorch has
it (2.6+), so Inductor traces into the kernel launches and ``torch.export`` records the op;
older PyTorch, and the CPU interpreter (see :data:`.launch.USE_TRITON_OP`), get plain
``custom_op``s with the same schemas. Every op has a fake (meta)
implementation for tracing. No autograd is registered here: these are inference kernels; the
differentiable ops are ``torch.ops.qsparse.*``; a graph on the Triton path has its nodes
retargeted to these after autograd (``qsparse_compile.passes.triton_lowering``).

==============================================================  ==============================
op                                                              kernel
==============================================================  ==============================
``topk_sparsify(x, k, rescale, quant)``                         row kernel, top-K
``topk_mask(x, k)``                                             row kernel, mask only
``block_sparsify(x, n, m, rescale, quant)``                     row kernel, N:M
``block_mask(x, n, m)``                                         row kernel, N:M mask only
``norm_sparsify(x, norm, weight, bias, eps, k, n, m, rescale,   row kernel with RMSNorm or
quant)``                                                        LayerNorm fused in front
``sparse_gemv(x, weight_t, bias)``                              decode GEMV, K-major weight
``packed_gemv(x, fmt, out_features, packed, bias)``             decode GEMV, packed int8 /
                                                                int4 / ternary weight
==============================================================  ==============================
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import fused_norm as _norm
from . import gemv as _gemv
from . import packed_gemv as _packed_gemv
from . import row_sparsify as _sparsify
from .launch import USE_TRITON_OP, traceable

__all__ = [
    "NAMESPACE",
    "topk_sparsify",
    "topk_mask",
    "block_sparsify",
    "block_mask",
    "norm_sparsify",
    "sparse_gemv",
    "packed_gemv",
]

NAMESPACE = "qsparse_triton"


def _define(name: str, fake: Callable) -> Callable[[Callable], Callable]:
    """Decorator: register ``fn`` as ``qsparse_triton::name`` with the fake ``fake``."""

    def register(fn: Callable) -> Callable:
        qualname = f"{NAMESPACE}::{name}"
        if USE_TRITON_OP:
            op = torch.library.triton_op(qualname, fn, mutates_args=())
        else:
            op = torch.library.custom_op(qualname, fn, mutates_args=())
        op.register_fake(fake)
        return op

    return register


def _like(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return torch.empty(x.shape, dtype=dtype or x.dtype, device=x.device)


# --- top-K -----------------------------------------------------------------------------------


def _topk_sparsify_fake(x: torch.Tensor, k: int, rescale: bool, quant: bool) -> torch.Tensor:
    return _like(x)


@_define("topk_sparsify", _topk_sparsify_fake)
def topk_sparsify(x: torch.Tensor, k: int, rescale: bool, quant: bool) -> torch.Tensor:
    """Top-``k`` of each row, optional L2 rescale and int8 fake-quant (contiguous output)."""
    with traceable():
        return _sparsify.topk_sparsify(x, k, rescale, quant)


def _topk_mask_fake(x: torch.Tensor, k: int) -> torch.Tensor:
    return _like(x, torch.bool)


@_define("topk_mask", _topk_mask_fake)
def topk_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean top-``k`` mask of each row."""
    with traceable():
        return _sparsify.topk_mask(x, k)


# --- N:M -------------------------------------------------------------------------------------


def _block_sparsify_fake(x: torch.Tensor, n: int, m: int, rescale: bool,
                         quant: bool) -> torch.Tensor:
    return _like(x)


@_define("block_sparsify", _block_sparsify_fake)
def block_sparsify(x: torch.Tensor, n: int, m: int, rescale: bool, quant: bool) -> torch.Tensor:
    """Keep ``n`` of every ``m`` consecutive entries; optional rescale and fake-quant."""
    with traceable():
        return _sparsify.block_sparsify(x, n, m, rescale, quant)


def _block_mask_fake(x: torch.Tensor, n: int, m: int) -> torch.Tensor:
    return _like(x, torch.bool)


@_define("block_mask", _block_mask_fake)
def block_mask(x: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Boolean N:M mask."""
    with traceable():
        return _sparsify.block_mask(x, n, m)


# --- fused norm ------------------------------------------------------------------------------


def _norm_sparsify_fake(x: torch.Tensor, norm: str, weight: torch.Tensor | None,
                        bias: torch.Tensor | None, eps: float, k: int, n: int, m: int,
                        rescale: bool, quant: bool) -> torch.Tensor:
    dtype = x.dtype if weight is None else torch.promote_types(x.dtype, weight.dtype)
    return _like(x, dtype)


@_define("norm_sparsify", _norm_sparsify_fake)
def norm_sparsify(x: torch.Tensor, norm: str, weight: torch.Tensor | None,
                  bias: torch.Tensor | None, eps: float, k: int, n: int, m: int,
                  rescale: bool, quant: bool) -> torch.Tensor:
    """``int8?(sparsify(norm(x)))`` fused; ``m == 0`` selects top-``k``, else ``n:m``."""
    with traceable():
        return _norm.norm_sparsify(x, norm, weight, bias, eps, k, n, m, rescale, quant)


# --- decode GEMV -----------------------------------------------------------------------------


def _sparse_gemv_fake(x: torch.Tensor, weight_t: torch.Tensor,
                      bias: torch.Tensor | None) -> torch.Tensor:
    return torch.empty((*x.shape[:-1], weight_t.shape[1]), dtype=x.dtype, device=x.device)


@_define("sparse_gemv", _sparse_gemv_fake)
def sparse_gemv(x: torch.Tensor, weight_t: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight_t + bias`` skipping the rows of ``weight_t`` (``W^T``) no token needs."""
    with traceable():
        return _gemv.sparse_gemv(x, weight_t, bias)


def _packed_gemv_fake(x: torch.Tensor, fmt: str, out_features: int, packed: torch.Tensor,
                      bias: torch.Tensor | None) -> torch.Tensor:
    _packed_gemv.check_packed_operands(x, fmt, out_features, packed, bias)
    return torch.empty((*x.shape[:-1], out_features), dtype=x.dtype, device=x.device)


@_define("packed_gemv", _packed_gemv_fake)
def packed_gemv(x: torch.Tensor, fmt: str, out_features: int, packed: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ dequant(packed) + bias`` over int8 / int4 / ternary weights packed K-major
    (:func:`.packed_gemv.prepare_packed_weight`), skipping the rows no token needs."""
    with traceable():
        return _packed_gemv.packed_gemv(x, fmt, out_features, packed, bias)
