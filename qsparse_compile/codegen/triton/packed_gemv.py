"""Decode sparse GEMV over packed int8 / int4 / ternary weights: tiling, launch, reference.

See :mod:`.packed_gemv_template` for the kernel. The weights are the buffer the CPU decode
kernel reads (:mod:`..cpu.packed_weights`: K-major panels of 512 bytes of codes per row, then
the scales), made by :func:`prepare_packed_weight` on the activations' device; one layout for
both kernels, so a group's weights are packed, and tested, one way. The formats are those of
DESIGN.md rule 10 (and rule 6 for ternary): the kernel equals the fp32 product with
:func:`~..cpu.packed_weights.dequantize`'s weights up to summation order
(:func:`packed_gemv_reference`).

The activations come sparsified (by the Triton selection kernels: ``topk_sparsify`` or
``norm_sparsify``), as for the dense GEMV (:mod:`.gemv`): a feature zero in every row of a
launch skips its packed bytes (and, for int4, a tile of such features its scales). Products and
sums in fp32, one rounding to ``x.dtype``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import torch

from ...ops.quant import INT4_GROUP
from ..cpu.packed_linear_op import check_packed_buffer, packed_layout
from ..cpu.packed_linear_op import prepare_packed_weight as cpu_packing
from ..cpu.packed_weights import FORMATS, PANEL_ROW_BYTES, PackedLayout, dequantize
from .gemv import (
    ACC_ELEMENTS,
    DEFAULT_SMS,
    MAX_TOKENS,
    REDUCE_BLOCK,
    ROW_RUN_BYTES,
    WARPS,
    device_sms,
    k_splits,
)
from .launch import kernel_module, launch
from .packed_gemv_template import (
    CHUNK_BYTES,
    GEMV_KERNEL,
    REDUCE_KERNEL,
    PackedGemvSpec,
    codes_per_byte,
    render,
)
from .template_common import dtype_info, next_pow2

__all__ = [
    "MIN_BLOCK_K",
    "PackedGemvConfig",
    "check_packed_operands",
    "packed_gemv",
    "packed_gemv_config",
    "packed_gemv_reference",
    "packed_layout",
    "prepare_packed_weight",
]

_OP = "qsparse_triton.packed_gemv"

#: Rows per tile the block heuristic keeps at least (several independent row loads in flight
#: per tile); the bytes per program shrink instead when the tokens fill the accumulators.
MIN_BLOCK_K = 16


@dataclasses.dataclass(frozen=True)
class PackedGemvConfig:
    """Tiling of one packed GEMV launch (see :func:`packed_gemv_config`).

    Attributes:
        block_k: rows per tile.
        block_bytes: bytes of a panel row per program (``block_bytes * codes`` columns).
        splits: K ranges; k_split: rows per range.
        programs: programs along the columns (grid dimension 0).
    """

    block_k: int
    block_bytes: int
    splits: int
    k_split: int
    programs: int


def _floor_pow2(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)



def packed_gemv_config(
    fmt: str, k: int, n: int, tokens: int, num_sms: int = DEFAULT_SMS, *,
    splits: int | None = None, block_k: int | None = None, block_bytes: int | None = None,
) -> PackedGemvConfig:
    """Block sizes and K split for ``[tokens, k] @ dequant(packed [k, n])`` in ``fmt``.

    Args:
        fmt: ``"int8"``, ``"int4"`` or ``"ternary"``.
        k, n: in and out features.
        tokens: rows of ``x`` in one launch (1-8).
        num_sms: streaming multiprocessors of the device.
        splits, block_k, block_bytes: overrides (tests use them to reach every path).

    A program reads 128 bytes of a panel row (``ROW_RUN_BYTES`` of the dense GEMV: the run a
    dropped feature skips; a CPU panel row holds several) unless the tokens' accumulators
    (``tokens * BK * columns`` fp32 values, within the dense GEMV's ``ACC_ELEMENTS``) would
    leave fewer than :data:`MIN_BLOCK_K` rows per tile; then the bytes per program halve until
    they do (at least one chunk). ``BK`` fills the remaining budget (at most 32 for int4: a
    tile lies in one group) and the split count follows the dense GEMV's rule
    (:func:`.gemv.k_splits`).
    """
    layout = packed_layout(fmt, k, n)
    per, tb = codes_per_byte(fmt), next_pow2(tokens)
    used = layout.used_row_bytes
    fitting = _floor_pow2(ACC_ELEMENTS // (tb * MIN_BLOCK_K * per))
    bb = block_bytes or min(ROW_RUN_BYTES, max(CHUNK_BYTES, fitting),
                            max(CHUNK_BYTES, next_pow2(used)))
    if bb & (bb - 1) or not CHUNK_BYTES <= bb <= PANEL_ROW_BYTES:
        raise ValueError(f"{_OP}: block_bytes must be a power of two in [{CHUNK_BYTES}, "
                         f"{PANEL_ROW_BYTES}], got {bb}")
    cap = INT4_GROUP if fmt == "int4" else next_pow2(k)
    bk = block_k or max(1, min(cap, _floor_pow2(ACC_ELEMENTS // (tb * bb * per))))
    if bk & (bk - 1) or (fmt == "int4" and bk > INT4_GROUP):
        raise ValueError(f"{_OP}: block_k must be a power of two (int4: at most {INT4_GROUP}, "
                         f"so that a tile lies in one group), got {bk} for {fmt!r}")
    programs = -(-used // bb)
    splits, k_split = k_splits(k, bk, programs, num_sms, splits)
    return PackedGemvConfig(bk, bb, splits, k_split, programs)


def prepare_packed_weight(weights: Sequence[torch.Tensor], fmt: str,
                          device: torch.device | str | None = None) -> torch.Tensor:
    """The packed buffer of projections reading one input, their outputs side by side, on
    ``device`` (default: the first weight's).

    Args:
        weights: the ``[out, in]`` weights (the model's own values, before any format), all
            with the same ``in_features``.
        fmt: ``"int8"``, ``"int4"`` (DESIGN.md rule 10) or ``"ternary"`` (rule 6: each weight's
            absmean scale, ``quant="bitnet"``).

    The bytes are the CPU kernel's (:func:`..cpu.packed_linear_op.prepare_packed_weight`, which
    computes the codes on the CPU exactly as the weight fake quantizers do), moved to
    ``device``: one packing, laid out as :func:`packed_layout` says for
    ``(fmt, in_features, sum(out_features))``.
    """
    device = weights[0].device if device is None and len(weights) else device
    return cpu_packing(weights, fmt).to(device)


def check_packed_operands(x: torch.Tensor, fmt: str, out_features: int, packed: torch.Tensor,
                          bias: torch.Tensor | None) -> PackedLayout:
    """Raise ``TypeError`` / ``ValueError`` naming the op unless the operands fit; return the
    layout. Runs on fake tensors too (the op's fake implementation calls it)."""
    dtype_info(x.dtype, "packed_gemv")
    if bias is not None and bias.dtype != x.dtype:
        raise TypeError(f"{_OP}: bias must have x's dtype {x.dtype}, got {bias.dtype}")
    if fmt not in FORMATS:
        raise ValueError(f"{_OP}: format {fmt!r} is not one of {', '.join(map(repr, FORMATS))}")
    if x.dim() < 1 or x.shape[-1] < 1 or out_features < 1:
        raise ValueError(f"{_OP}: needs x [..., in_features >= 1] and out_features >= 1, got x "
                         f"{tuple(x.shape)}, out_features={out_features}")
    layout = packed_layout(fmt, int(x.shape[-1]), int(out_features))
    check_packed_buffer(_OP, layout, x.shape[-1], out_features, packed, bias)
    return layout


@functools.cache
def _module(spec: PackedGemvSpec):
    return kernel_module(spec.name, lambda: render(spec))


@functools.lru_cache(maxsize=1024)
def _plan(fmt: str, k: int, n: int, tokens: int, dtype: torch.dtype, num_sms: int,
          has_bias: bool, splits: int | None, block_k: int | None, block_bytes: int | None):
    """Tiling, specialisation and kernels of one call shape, worked out once per shape."""
    cfg = packed_gemv_config(fmt, k, n, tokens, num_sms, splits=splits, block_k=block_k,
                             block_bytes=block_bytes)
    spec = PackedGemvSpec(
        dtype=dtype_info(dtype, "packed_gemv").name, format=fmt, k=k, n=n,
        padded_n=packed_layout(fmt, k, n).padded_out, tokens_block=next_pow2(tokens),
        block_k=cfg.block_k, block_bytes=cfg.block_bytes, k_split=cfg.k_split,
        splits=cfg.splits, has_bias=has_bias,
        reduce_block=min(REDUCE_BLOCK, next_pow2(tokens * n)),
    )
    module = _module(spec)
    return cfg, spec, getattr(module, GEMV_KERNEL), getattr(module, REDUCE_KERNEL, None)


def _sections(layout: PackedLayout, packed: torch.Tensor) -> list[torch.Tensor]:
    """The buffer's codes, scales (and int4 minima) as typed views, in kernel argument order."""
    codes = packed[:layout.in_features * layout.row_bytes]
    scale_dtype = torch.float16 if layout.format == "int4" else torch.float32
    end = layout.scale_offset + layout.scale_bytes
    parts = [codes.view(torch.int8) if layout.format == "int8" else codes,
             packed[layout.scale_offset:end].view(scale_dtype)]
    if layout.format == "int4":
        parts.append(packed[layout.min_offset:layout.min_offset + layout.scale_bytes]
                     .view(torch.float16))
    return parts


def packed_gemv(
    x: torch.Tensor, fmt: str, out_features: int, packed: torch.Tensor,
    bias: torch.Tensor | None = None, *, splits: int | None = None,
    block_k: int | None = None, block_bytes: int | None = None,
) -> torch.Tensor:
    """``x @ dequant(packed) + bias``, reading only the packed rows some token needs.

    Args:
        x: ``[..., K]`` sparsified activations (fp32, fp16, bf16); rows are processed
            ``MAX_TOKENS`` at a time and a feature is skipped when it is zero in every row of
            the group.
        fmt: the buffer's format, ``"int8"``, ``"int4"`` or ``"ternary"``.
        out_features: ``N``, the columns the buffer holds.
        packed: the buffer of :func:`prepare_packed_weight` for ``(fmt, K, N)``, on ``x``'s
            device.
        bias: ``[N]`` in ``x.dtype``, or None.
        splits, block_k, block_bytes: tiling overrides (default: :func:`packed_gemv_config`).

    Returns:
        ``[..., N]`` in ``x.dtype``.
    """
    layout = check_packed_operands(x, fmt, out_features, packed, bias)
    for label, t in (("packed", packed), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{_OP}: {label} is on {t.device}, x on {x.device}")
    k, n = layout.in_features, layout.out_features
    sections = _sections(layout, packed.contiguous())
    bias = bias.contiguous() if bias is not None else None
    x2 = x.reshape(math.prod(x.shape[:-1]), k)
    if k > 1 and x2.stride(1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    y = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    tiling = (splits, block_k, block_bytes)
    if rows <= MAX_TOKENS:  # the decode case: no views of x and y in a traced graph
        _launch(fmt, x2, sections, bias, y, tiling)
    else:
        for start in range(0, rows, MAX_TOKENS):
            tokens = min(MAX_TOKENS, rows - start)
            _launch(fmt, x2[start:start + tokens], sections, bias, y[start:start + tokens],
                    tiling)
    return y.reshape(*x.shape[:-1], n)


def _launch(fmt: str, x: torch.Tensor, sections: list[torch.Tensor], bias: torch.Tensor | None,
            y: torch.Tensor, tiling: tuple[int | None, int | None, int | None]) -> None:
    # the kernel is specialised on these: under torch.compile a symbolic size becomes a guard
    k, n, tokens = int(x.shape[1]), int(y.shape[1]), int(x.shape[0])
    if tokens == 0:
        return
    cfg, spec, gemv_kernel, reduce_kernel = _plan(
        fmt, k, n, tokens, x.dtype, device_sms(x.device), bias is not None, *tiling)
    b = [bias] if bias is not None else []
    grid = (cfg.programs, cfg.splits)
    if cfg.splits == 1:
        launch(gemv_kernel, grid, [x, *sections, *b, y, tokens, x.stride(0)], WARPS)
        return
    ws = torch.empty((cfg.splits, tokens, n), dtype=torch.float32, device=x.device)
    launch(gemv_kernel, grid, [x, *sections, *b, ws, tokens, x.stride(0)], WARPS)
    launch(reduce_kernel, (-(-(tokens * n) // spec.reduce_block),), [ws, *b, y, tokens], WARPS)


def packed_gemv_reference(x: torch.Tensor, fmt: str, out_features: int, packed: torch.Tensor,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """The pure-PyTorch meaning: ``x @ dequantize(packed) + bias`` in fp32, then one cast to
    ``x.dtype`` (the weights unpacked by plain indexing: :mod:`..cpu.packed_weights`)."""
    layout = packed_layout(fmt, x.shape[-1], out_features)
    w = dequantize(layout, packed.cpu()).to(x.device)
    y = x.float() @ w
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
