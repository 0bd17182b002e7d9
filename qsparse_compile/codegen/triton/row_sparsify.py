"""Top-K and block N:M sparsify / mask kernels (DESIGN.md points 1-5), with their references.

Each function validates its arguments like the ``qsparse::`` CPU ops (same messages), then runs
the row kernel of :mod:`.row_template`. The ``*_reference`` functions beside them are the pure
PyTorch meaning, composed from :mod:`qsparse_compile.reference`; the kernels agree with them bit
for bit on masks and on values that take no arithmetic, and to within one rounding of the
dtype where rescale or quantization computes.
"""

from __future__ import annotations

import torch

from ... import reference
from ...ops.checks import check_block, check_k
from .row_kernel import run_rows
from .template_common import dtype_info

__all__ = [
    "topk_sparsify",
    "topk_mask",
    "block_sparsify",
    "block_mask",
    "topk_sparsify_reference",
    "block_sparsify_reference",
]


def _check_x(op: str, x: torch.Tensor) -> None:
    dtype_info(x.dtype, op)  # TypeError naming the supported dtypes
    if x.dim() < 1:
        raise ValueError(f"qsparse_triton.{op}: x must have at least one dimension (features)")


def topk_sparsify(
    x: torch.Tensor, k: int, rescale: bool = False, quant: bool = False, *,
    chunk: int | None = None,
) -> torch.Tensor:
    """Keep the ``k`` largest ``|x|`` of each row (ties to the lower index, NaN first).

    Args:
        x: ``[..., D]`` fp32/fp16/bf16 activations (a Triton device, or CPU tensors under
            ``TRITON_INTERPRET=1``).
        k: entries kept per row, ``1 <= k <= D``.
        rescale: multiply each row by ``||x|| / ||x_masked||`` (fp32).
        quant: int8 absmax fake-quant of the kept (rescaled) values.
        chunk: tile width override (power of two); default by heuristic.

    Returns:
        Contiguous tensor of ``x``'s shape and dtype.
    """
    _check_x("topk_sparsify", x)
    check_k("topk_sparsify", k, x.shape[-1])
    out, _ = run_rows("topk_sparsify", x, k=k, rescale=rescale, quant=quant, chunk=chunk)
    return out


def topk_mask(x: torch.Tensor, k: int, *, chunk: int | None = None) -> torch.Tensor:
    """Boolean mask of the top-``k`` magnitudes of each row (see :func:`topk_sparsify`)."""
    _check_x("topk_mask", x)
    check_k("topk_mask", k, x.shape[-1])
    _, mask = run_rows("topk_mask", x, k=k, values=False, mask=True, chunk=chunk)
    return mask


def block_sparsify(
    x: torch.Tensor, n: int, m: int, rescale: bool = False, quant: bool = False, *,
    chunk: int | None = None, select: str | None = None,
) -> torch.Tensor:
    """Keep the ``n`` largest ``|x|`` of every ``m`` consecutive entries of each row.

    Args:
        x: ``[..., D]`` activations, ``D`` a multiple of ``m``.
        n, m: the pattern, ``1 <= n <= m``.
        rescale, quant: as for :func:`topk_sparsify` (row-wise statistics).
        chunk: groups per tile override (power of two).
        select: ``"rank"`` or ``"bisect"`` override of the in-group selection.
    """
    _check_x("block_sparsify", x)
    check_block("block_sparsify", n, m, x.shape[-1])
    out, _ = run_rows("block_sparsify", x, n=n, m=m, rescale=rescale, quant=quant,
                      chunk=chunk, select=select)
    return out


def block_mask(
    x: torch.Tensor, n: int, m: int, *, chunk: int | None = None, select: str | None = None
) -> torch.Tensor:
    """Boolean N:M mask (see :func:`block_sparsify`)."""
    _check_x("block_mask", x)
    check_block("block_mask", n, m, x.shape[-1])
    _, mask = run_rows("block_mask", x, n=n, m=m, values=False, mask=True, chunk=chunk,
                       select=select)
    return mask


@torch.no_grad()
def topk_sparsify_reference(
    x: torch.Tensor, k: int, rescale: bool = False, quant: bool = False
) -> torch.Tensor:
    """``int8?(topk_sparsify(x, k, rescale))`` from the eager oracle."""
    out = reference.topk_sparsify(x, k, "l2" if rescale else "none")
    return reference.int8_fake_quant(out) if quant else out


@torch.no_grad()
def block_sparsify_reference(
    x: torch.Tensor, n: int, m: int, rescale: bool = False, quant: bool = False
) -> torch.Tensor:
    """``int8?(block_sparsify(x, n, m, rescale))`` from the eager oracle."""
    out = reference.block_sparsify(x, n, m, "l2" if rescale else "none")
    return reference.int8_fake_quant(out) if quant else out
