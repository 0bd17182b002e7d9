"""Block-size heuristics, specialisation and launch of the row kernel (:mod:`.row_template`).

The public entry points are in :mod:`.row_sparsify` (top-K, N:M) and :mod:`.fused_norm` (fused);
they all end in :func:`run_rows`, which flattens the input to ``[rows, D]``, picks the tile by
:func:`row_config`, renders (once) the kernel for the specialisation and launches one program per
row (or per few rows, when they are short).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch

from .launch import kernel_module, launch
from .row_template import KERNEL_NAME, RowSpec, render
from .template_common import dtype_info, next_pow2

__all__ = ["RowConfig", "row_config", "run_rows", "MAX_TILE", "RANK_MAX_M"]

#: Largest tile (elements) a program holds in registers. 16384 covers a whole row of every
#: Llama-family width up to 11008 (next power of two: 16384), so the decode path reads the
#: activation once; at 16 warps that is 32 elements per thread (key and value, int32 each).
MAX_TILE = 16384

#: Tile width of the multi-pass path for rows wider than MAX_TILE: small enough that a tile's key
#: and value stay in registers at 8 warps, large enough that each pass streams long runs.
LOOPED_TILE = 4096

#: Groups of at most this width select by pairwise rank (m*m compares) instead of bisection
#: (15 or 31 reductions): for 2:4 that is 16 compares against 15-31 reductions.
RANK_MAX_M = 8

#: Top-K rows narrower than this many elements share a program (``SHARED_TILE // BM`` rows):
#: one program per token would leave most lanes of a small tile idle and launch many programs
#: for short rows; rows at least this wide (every LLM width) get a program each, which keeps
#: the decode case (1-8 rows) spread over as many SMs as there are rows.
SHARED_TILE = 2048

#: Elements per thread the warp count aims at: enough independent work per thread to hide
#: latency, few enough to stay in registers.
ELEMENTS_PER_THREAD = 16


@dataclasses.dataclass(frozen=True)
class RowConfig:
    """Tiling: ``chunk`` (columns, or groups for N:M), selection method, warps, rows/program."""

    chunk: int
    select: str
    num_warps: int
    rows: int = 1


def row_config(d: int, n: int, m: int, k: int) -> RowConfig:
    """The tiling heuristic, a function of the row width and the selection only.

    Args:
        d: row width D.
        n, m: the N:M pattern (``m == 0`` for top-K).
        k: entries kept per row for top-K.

    Top-K: the whole row in one tile when ``next_pow2(D) <= MAX_TILE`` (one read, one write),
    otherwise tiles of ``LOOPED_TILE`` columns; rows narrower than ``SHARED_TILE`` share a
    program. N:M: ``BM = next_pow2(m)`` lanes per group and as many whole groups per tile as fit
    ``MAX_TILE`` elements of the selection's working set (``BM * BM`` for rank, ``BM`` for
    bisection). Warps: one per ``32 * ELEMENTS_PER_THREAD`` tile elements, between 1 and 16.
    """
    rows = 1
    if m:
        bm = next_pow2(m)
        select = "all" if n == m else ("rank" if m <= RANK_MAX_M else "bisect")
        per_group = bm * bm if select == "rank" else bm
        chunk = max(1, min(next_pow2(d // m), MAX_TILE // per_group))
        elements = chunk * per_group
    else:
        select = "all" if k == d else "bisect"
        chunk = next_pow2(d) if next_pow2(d) <= MAX_TILE else LOOPED_TILE
        if chunk >= d:
            rows = max(1, SHARED_TILE // chunk)
        elements = chunk * rows
    warps = max(1, min(16, elements // (32 * ELEMENTS_PER_THREAD)))
    return RowConfig(chunk, select, 1 << (warps.bit_length() - 1), rows)


@functools.cache
def _kernel(spec: RowSpec):
    return getattr(kernel_module(spec.name, lambda: render(spec)), KERNEL_NAME)


@functools.lru_cache(maxsize=1024)
def _plan(op: str, dtype: torch.dtype, out_dtype: torch.dtype, d: int, k: int, n: int, m: int,
          norm: str, w_dtype: torch.dtype | None, b_dtype: torch.dtype | None, eps: float,
          rescale: bool, quant: bool, values: bool, mask: bool, chunk: int | None,
          select: str | None) -> tuple[RowSpec, RowConfig, object]:
    """Specialisation, tiling and kernel of one call signature, worked out once per signature."""
    config = row_config(d, n, m, k)
    if chunk is not None or select is not None:
        chunk = chunk or config.chunk
        rows = config.rows if not m and chunk >= d else 1
        config = dataclasses.replace(config, chunk=chunk, select=select or config.select,
                                     rows=min(rows, config.rows))

    def name(t: torch.dtype | None) -> str | None:
        return dtype_info(t, op).name if t is not None else None

    spec = RowSpec(
        dtype=name(dtype), out_dtype=name(out_dtype), d=d, k=0 if m else k, n=n, m=m,
        norm=norm, w_dtype=name(w_dtype), b_dtype=name(b_dtype), eps=eps, rescale=rescale,
        quant=quant, write_values=values, write_mask=mask, chunk=config.chunk,
        select=config.select, rows=config.rows,
    )
    return spec, config, _kernel(spec)


def run_rows(
    op: str,
    x: torch.Tensor,
    *,
    k: int = 0,
    n: int = 0,
    m: int = 0,
    norm: str = "none",
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 0.0,
    rescale: bool = False,
    quant: bool = False,
    values: bool = True,
    mask: bool = False,
    out_dtype: torch.dtype | None = None,
    chunk: int | None = None,
    select: str | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Run the row kernel over every row of ``x`` (arguments already validated by the caller).

    Args:
        op: the calling op's name, for error messages.
        x: ``[..., D]`` activations (fp32, fp16 or bf16) on the kernel's device.
        k, n, m: top-K count, or the N:M pattern when ``m > 0``.
        norm, weight, bias, eps: the norm fused in front (``"none"``, ``"rms"``, ``"layer"``).
        rescale, quant: L2 rescale and int8 fake-quant of the kept values.
        values, mask: which outputs to produce.
        out_dtype: dtype of the normalised activation and output (default ``x.dtype``).
        chunk, select: override the heuristic tiling (tests use them to reach the multi-tile
            and bisection paths on small shapes).

    Returns:
        ``(values, mask)``, each ``[..., D]`` contiguous or ``None`` when not requested.
    """
    out_dtype = out_dtype or x.dtype
    d = int(x.shape[-1])  # baked into the kernel: a symbolic width becomes a guard
    spec, config, kernel = _plan(
        op, x.dtype, out_dtype, d, k, n, m, norm,
        weight.dtype if weight is not None else None, bias.dtype if bias is not None else None,
        float(eps) if norm != "none" else 0.0, rescale and values, quant and values, values,
        mask, chunk, select,
    )
    x2 = x.reshape(math.prod(x.shape[:-1]), d)  # (-1, d) is ambiguous when d == 0
    if d > 1 and x2.stride(1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device) if values else None
    keep = torch.empty(x.shape, dtype=torch.bool, device=x.device) if mask else None
    if rows == 0 or d == 0:
        return out, keep
    args: list[object] = [x2]
    args += [weight.contiguous()] if weight is not None else []
    args += [bias.contiguous()] if bias is not None else []
    args += [out] if out is not None else []
    args += [keep] if keep is not None else []
    args += [x2.stride(0), rows]
    launch(kernel, (-(-rows // spec.rows),), args, config.num_warps)
    return out, keep
