"""Top-K and N:M masks by exact threshold selection over the magnitude's bit pattern.

This is the algorithm the kernels use (DESIGN.md, "Kernels"), written with ATen ops: the
magnitude of a float, read as an integer of the same width, orders exactly as the magnitude
does (the sign bit is cleared by ``abs``), so the k-th largest magnitude is an integer selection.
NaN is mapped to the largest key so it outranks every number and all NaNs tie. Ties at the k-th
key are broken toward the lower index with a prefix count.
"""

from __future__ import annotations

import torch

from .checks import check_block, check_float, check_k

_INT_OF_WIDTH = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def magnitude_key(x: torch.Tensor) -> torch.Tensor:
    """Integer key, same width as ``x``'s dtype, ordered like ``|x|`` with NaN above all."""
    int_dtype = _INT_OF_WIDTH[x.element_size()]
    key = x.abs().view(int_dtype)
    return torch.where(torch.isnan(x), torch.iinfo(int_dtype).max, key)


def select_top(key: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the ``k`` largest keys of each row, ties to the lower index."""
    dim = key.shape[-1]
    if k == dim:
        return torch.ones(key.shape, dtype=torch.bool, device=key.device)
    # k-th largest == (dim - k + 1)-th smallest
    kth = torch.kthvalue(key, dim - k + 1, dim=-1, keepdim=True).values
    above = key > kth
    tied = key == kth
    room = k - above.sum(dim=-1, keepdim=True)
    return above | (tied & (torch.cumsum(tied, dim=-1) <= room))


@torch.library.custom_op("qsparse::topk_mask", mutates_args=())
def topk_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the top-``k`` magnitudes per row (DESIGN.md point 2)."""
    check_float("topk_mask", "x", x)
    check_k("topk_mask", k, x.shape[-1])
    # contiguous, as the fake promises: a permuted input would otherwise give a permuted mask
    return select_top(magnitude_key(x), k).contiguous()


@topk_mask.register_fake
def _(x: torch.Tensor, k: int) -> torch.Tensor:
    check_float("topk_mask", "x", x)
    return torch.empty(x.shape, dtype=torch.bool, device=x.device)


@torch.library.custom_op("qsparse::block_mask", mutates_args=())
def block_mask(x: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Boolean mask keeping the top-``n`` magnitudes of every ``m`` consecutive entries."""
    check_float("block_mask", "x", x)
    check_block("block_mask", n, m, x.shape[-1])
    key = magnitude_key(x).reshape(*x.shape[:-1], x.shape[-1] // m, m)
    return select_top(key, n).reshape(x.shape).contiguous()


@block_mask.register_fake
def _(x: torch.Tensor, n: int, m: int) -> torch.Tensor:
    check_float("block_mask", "x", x)
    return torch.empty(x.shape, dtype=torch.bool, device=x.device)
