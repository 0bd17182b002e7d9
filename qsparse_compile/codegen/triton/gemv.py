"""Decode sparse GEMV wrapper: heuristics, weight layout, launch, and the pure-PyTorch reference.

See :mod:`.gemv_template` for the kernel design. ``weight_t`` is ``W^T`` contiguous
(``[in_features, out_features]``), prepared once per layer with :func:`prepare_weight`.

Numerics: products and sums in fp32, one rounding to the output dtype, as
:func:`sparse_gemv_reference` computes. The one deliberate difference from a dense product: a
feature that is zero for every token contributes nothing even if its weight row holds inf or NaN
(a dense product would give ``0 * inf = NaN``).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch

from ..gemv_operands import check_gemv_operands
from .gemv_template import GEMV_KERNEL, REDUCE_KERNEL, GemvSpec, render
from .launch import kernel_module, launch
from .template_common import DTYPES, dtype_info, next_pow2

__all__ = [
    "MAX_TOKENS",
    "GemvConfig",
    "device_sms",
    "gemv_config",
    "k_splits",
    "prepare_weight",
    "sparse_gemv",
    "sparse_gemv_reference",
]

_OP = "sparse_gemv"

#: Tokens per launch: the decode regime; more rows are processed in groups of this many.
MAX_TOKENS = 8

#: fp32 accumulator elements per program (``T * BK * BN``): 64 registers per thread at 4 warps,
#: leaving room for the weight tile and addresses without spilling.
ACC_ELEMENTS = 8192

#: Bytes of one row of a column block: a 128-byte line per skipped or read feature, the
#: granularity at which DRAM traffic is saved.
ROW_RUN_BYTES = 128

#: Each K split loops over at least this many tiles, so its load pipeline fills.
MIN_TILES_PER_SPLIT = 4

#: Programs per SM the K split aims for (latency hiding needs several loads in flight per SM).
PROGRAMS_PER_SM = 2

#: SM count assumed when the device cannot be asked (the interpreter): an H100 SXM.
DEFAULT_SMS = 132

WARPS = 4
REDUCE_BLOCK = 1024


@dataclasses.dataclass(frozen=True)
class GemvConfig:
    """Tiling of one GEMV launch (see :func:`gemv_config`)."""

    block_k: int
    block_n: int
    splits: int
    k_split: int


def gemv_config(
    k: int, n: int, tokens: int, dtype: torch.dtype, num_sms: int = DEFAULT_SMS,
    *, splits: int | None = None, block_k: int | None = None, block_n: int | None = None,
) -> GemvConfig:
    """Block sizes and K split for ``[tokens, k] @ [k, n]``, as functions of the shape.

    Args:
        k, n: in and out features.
        tokens: rows of ``x`` in one launch (1-8).
        dtype: element type (its size sets the column block).
        num_sms: streaming multiprocessors of the device.
        splits, block_k, block_n: overrides (tests use them to reach every path).

    ``BN`` spans ``ROW_RUN_BYTES`` of a weight row (64 columns for 16-bit types, 32 for fp32);
    ``BK`` fills the fp32 accumulator budget ``ACC_ELEMENTS`` for the token count; the split
    count brings the grid to ``PROGRAMS_PER_SM * num_sms`` programs while every split keeps at
    least ``MIN_TILES_PER_SPLIT`` tiles of work.
    """
    tb = next_pow2(tokens)
    elem = getattr(dtype, "itemsize", None) or torch.empty((), dtype=dtype).element_size()
    bn = block_n or max(16, min(next_pow2(n), ROW_RUN_BYTES // elem))
    bk = block_k or max(1, min(next_pow2(k), max(16, ACC_ELEMENTS // (tb * bn))))
    splits, k_split = k_splits(k, bk, -(-n // bn), num_sms, splits)
    return GemvConfig(bk, bn, splits, k_split)


def k_splits(k: int, block_k: int, col_blocks: int, num_sms: int = DEFAULT_SMS,
             splits: int | None = None) -> tuple[int, int]:
    """``(splits, k_split)``: how many K ranges a GEMV's ``k`` rows are cut into, and the rows
    of each (a multiple of ``block_k``; the last range may be shorter).

    Enough ranges to bring the grid (``col_blocks`` programs per range) to
    ``PROGRAMS_PER_SM * num_sms`` programs, while every range keeps at least
    ``MIN_TILES_PER_SPLIT`` tiles of ``block_k`` rows; ``splits`` overrides the count (clamped
    to one range per tile). No range is empty.
    """
    tiles = -(-k // block_k)
    if splits is None:
        want = -(-(PROGRAMS_PER_SM * num_sms) // col_blocks)
        splits = max(1, min(want, tiles // MIN_TILES_PER_SPLIT))
    splits = max(1, min(splits, tiles))
    k_split = -(-tiles // splits) * block_k
    return -(-k // k_split), k_split


def prepare_weight(weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``W^T`` contiguous (``[in_features, out_features]``) on ``weight``'s device, detached.

    Args:
        weight: ``[out_features, in_features]`` as stored by ``torch.nn.Linear``.
        dtype: element type for the kernel (fp32, fp16, bf16); default ``weight.dtype``.
    """
    dtype = weight.dtype if dtype is None else dtype
    dtype_info(dtype, "prepare_weight")
    if weight.dim() != 2:
        raise ValueError(
            f"qsparse_triton.prepare_weight: expected a 2-D weight [out_features, in_features], "
            f"got shape {tuple(weight.shape)}"
        )
    return weight.detach().to(dtype).t().contiguous()


def _check(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None) -> None:
    dtype_info(x.dtype, _OP)
    check_gemv_operands(f"qsparse_triton.{_OP}", x, weight_t, bias, DTYPES, "prepare_weight")


def device_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (``DEFAULT_SMS`` where it cannot be asked)."""
    # tracing with fake CUDA tensors on a machine without CUDA still gets a tiling
    if device.type == "cuda" and torch.cuda.is_available():
        return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    return DEFAULT_SMS


@functools.cache
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.cache
def _module(spec: GemvSpec):
    return kernel_module(spec.name, lambda: render(spec))


def sparse_gemv(
    x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None = None, *,
    splits: int | None = None, block_k: int | None = None, block_n: int | None = None,
) -> torch.Tensor:
    """``x @ weight_t + bias``, reading only the rows of ``weight_t`` some token needs.

    Args:
        x: ``[..., K]`` sparsified activations; rows are processed ``MAX_TOKENS`` at a time and
            a feature is skipped when it is zero in every row of the group.
        weight_t: ``[K, N]`` (``W^T``, see :func:`prepare_weight`); made contiguous if needed.
        bias: ``[N]`` or ``None``.
        splits, block_k, block_n: tiling overrides (default: :func:`gemv_config`).

    Returns:
        ``[..., N]`` in ``x.dtype``.
    """
    _check(x, weight_t, bias)
    k, n = weight_t.shape
    weight_t = weight_t.contiguous()
    bias = bias.contiguous() if bias is not None else None
    x2 = x.reshape(math.prod(x.shape[:-1]), k)  # (-1, k) is ambiguous when k == 0
    if k > 1 and x2.stride(1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    y = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    if rows <= MAX_TOKENS:  # the decode case: no views of x and y in a traced graph
        _launch(x2, weight_t, bias, y, splits, block_k, block_n)
    else:
        for start in range(0, rows, MAX_TOKENS):
            tokens = min(MAX_TOKENS, rows - start)
            _launch(x2[start:start + tokens], weight_t, bias, y[start:start + tokens], splits,
                    block_k, block_n)
    return y.reshape(*x.shape[:-1], n)


def _launch(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None,
            y: torch.Tensor, splits: int | None, block_k: int | None,
            block_n: int | None) -> None:
    # the kernel is specialised on these: under torch.compile a symbolic size becomes a guard
    k, n = int(weight_t.shape[0]), int(weight_t.shape[1])
    tokens = int(x.shape[0])
    if n == 0 or tokens == 0:
        return
    if k == 0:  # an empty sum: the bias alone
        if bias is None:
            y.zero_()
        else:
            y.copy_(bias.expand(tokens, n))
        return
    cfg, spec, gemv_kernel, reduce_kernel = _plan(
        k, n, tokens, x.dtype, device_sms(x.device), bias is not None, splits, block_k, block_n)
    b = [bias] if bias is not None else []
    grid = (-(-n // cfg.block_n), cfg.splits)
    if cfg.splits == 1:
        launch(gemv_kernel, grid, [x, weight_t, *b, y, tokens, x.stride(0)], WARPS)
        return
    ws = torch.empty((cfg.splits, tokens, n), dtype=torch.float32, device=x.device)
    launch(gemv_kernel, grid, [x, weight_t, *b, ws, tokens, x.stride(0)], WARPS)
    launch(reduce_kernel, (-(-(tokens * n) // spec.reduce_block),), [ws, *b, y, tokens], WARPS)


@functools.lru_cache(maxsize=1024)
def _plan(k: int, n: int, tokens: int, dtype: torch.dtype, num_sms: int, has_bias: bool,
          splits: int | None, block_k: int | None, block_n: int | None):
    """Tiling, specialisation and kernels of one call shape, worked out once per shape."""
    cfg = gemv_config(k, n, tokens, dtype, num_sms, splits=splits, block_k=block_k,
                      block_n=block_n)
    spec = GemvSpec(
        dtype=dtype_info(dtype, _OP).name, k=k, n=n, tokens_block=next_pow2(tokens),
        block_k=cfg.block_k, block_n=cfg.block_n, k_split=cfg.k_split, splits=cfg.splits,
        has_bias=has_bias, reduce_block=min(REDUCE_BLOCK, next_pow2(tokens * n)),
    )
    module = _module(spec)
    return cfg, spec, getattr(module, GEMV_KERNEL), getattr(module, REDUCE_KERNEL, None)


def sparse_gemv_reference(
    x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The pure-PyTorch meaning: ``x @ weight_t + bias`` in fp32, then one cast to ``x.dtype``."""
    y = x.float() @ weight_t.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
