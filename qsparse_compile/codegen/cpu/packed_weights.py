"""Packed K-major weights for the CPU decode kernel: int8, int4 and ternary, in one byte buffer.

A projection group's weights are stored transposed, ``[in_features D, out_features N]``, so that
an activation the selection drops skips a contiguous run of packed bytes (DESIGN.md,
"Decode"), and in *panels*: the columns are cut into panels of 512 bytes of codes per row
(1024 int4 columns, 512 int8, 2048 ternary), and each panel is stored whole, its ``D`` rows one
after the other, before the next panel. The kernel works panel by panel, so it streams one
contiguous region of ``D x 512`` bytes with holes where rows were dropped, instead of
``D`` short runs a full row apart (on a wide matrix such as the output head, 576 x 49152,
those runs are 24 KiB apart: every one a new page and a new prefetch stream, which measured
several times slower). A dropped row skips eight whole cache lines, so the bytes skipped are
bytes not fetched. The width was measured on SmolLM2-135M's 120 decode calls in sequence (each
with its own weight, so the weights come from DRAM, as in a decode step; 2 threads, 50%): per
call int4 95 / 61-74 / 68 / 119 us and int8 77 / 48-60 / 48 / 67 us at 128 / 512 / 1024 /
2048 bytes: short rows leave too few bytes in flight per kept feature, long ones a tile that
no longer fits the first-level cache. Columns are padded to ``Np``, a whole number of
panels; padded columns hold zeros and are never written out. Within a panel's row the codes
come in 8-byte *chunks*:

* ``int8``: 8 columns, one signed byte each (``-127..127``); one fp32 scale per column.
* ``int4``: 16 columns: byte ``i`` holds column ``i`` in its low nibble and column ``8 + i`` in
  its high nibble (so one widening load and a mask / a shift give two vectors of 8); codes
  ``0..15``; per column and group of 32 rows (input features; the last group may be shorter)
  a scale ``d`` and a minimum ``m`` in fp16, the value being ``d * q + m`` (GGUF Q4_1's
  grouping and storage).
* ``ternary``: 32 columns: byte ``i`` holds, in bits ``2j .. 2j+1``, column ``8j + i`` as
  ``t + 1`` (``t`` in ``{-1, 0, 1}``); one fp32 scale per column (a group of several
  projections has one scale per projection, repeated over its columns).

Buffer: the codes (panel after panel, each ``D`` rows of :data:`PANEL_ROW_BYTES`), then the
scales (``[groups, Np]`` / ``[Np]``, column-major as the output), then (int4) the minima, each
section starting on a 64-byte boundary; :class:`PackedLayout` gives the offsets. :func:`pack`
builds the buffer from codes and scales, :func:`dequantize` reads the values back: the
reference the kernel is tested against.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from ...ops.quant import INT4_GROUP

__all__ = ["FORMATS", "PANEL_ROW_BYTES", "PackedLayout", "dequantize", "pack", "quantize"]

#: Packed formats and the columns one 8-byte chunk holds.
FORMATS = {"int8": 8, "int4": 16, "ternary": 32}

#: Bytes of codes per row of a panel: eight cache lines (see the module doc).
PANEL_ROW_BYTES = 512


def _align64(n: int) -> int:
    return (n + 63) // 64 * 64


@dataclasses.dataclass(frozen=True)
class PackedLayout:
    """Where everything lies in the packed buffer of a ``[D, N]`` weight of ``format``."""

    format: str
    in_features: int
    out_features: int

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"packed weights: format {self.format!r} is not one of "
                             f"{', '.join(map(repr, FORMATS))}")
        if self.in_features < 1 or self.out_features < 1:
            raise ValueError(f"packed weights: need a non-empty weight, got in_features="
                             f"{self.in_features}, out_features={self.out_features}")

    @property
    def panel_cols(self) -> int:
        """Columns per panel (:data:`PANEL_ROW_BYTES` of codes per row)."""
        return PANEL_ROW_BYTES * FORMATS[self.format] // 8

    @property
    def padded_out(self) -> int:
        """``Np``: columns, padded to a whole number of panels."""
        return -(-self.out_features // self.panel_cols) * self.panel_cols

    @property
    def row_bytes(self) -> int:
        """Bytes of one row of codes over all panels."""
        return self.padded_out * 8 // FORMATS[self.format]

    @property
    def panel_bytes(self) -> int:
        """Bytes of one panel: ``D`` rows of :data:`PANEL_ROW_BYTES`."""
        return self.in_features * PANEL_ROW_BYTES

    @property
    def groups(self) -> int:
        """int4 groups of rows (input features); 1 for the other formats."""
        return -(-self.in_features // INT4_GROUP) if self.format == "int4" else 1

    @property
    def scale_offset(self) -> int:
        return _align64(self.in_features * self.row_bytes)

    @property
    def scale_bytes(self) -> int:
        # int4: fp16 per group and column; int8 / ternary: fp32 per column
        return 2 * self.groups * self.padded_out if self.format == "int4" else \
            4 * self.padded_out

    @property
    def min_offset(self) -> int:
        return _align64(self.scale_offset + self.scale_bytes)

    @property
    def nbytes(self) -> int:
        """Size of the whole buffer."""
        end = self.min_offset + (self.scale_bytes if self.format == "int4" else 0)
        return _align64(end)

    @property
    def used_cols(self) -> int:
        """Columns a call reads: the first ``N``, in whole 8-byte chunks (the last panel's
        padding beyond them is neither read nor computed)."""
        chunk = FORMATS[self.format]
        return -(-self.out_features // chunk) * chunk

    @functools.cached_property
    def kernel_offsets(self) -> tuple[int, int, int, int]:
        """``(panel_bytes, scale_offset, min_offset, padded_out)``, what the kernels take,
        computed once: read on every decode call, the properties would cost microseconds."""
        return self.panel_bytes, self.scale_offset, self.min_offset, self.padded_out

    @property
    def used_row_bytes(self) -> int:
        """Bytes of codes a call reads per kept input feature (all panels)."""
        return self.used_cols * 8 // FORMATS[self.format]

    def read_bytes(self, kept_rows: int) -> int:
        """Bytes a call that keeps ``kept_rows`` input features streams (scales included)."""
        if self.format == "int4":  # d and m, fp16, per group and used column
            scales = 2 * 2 * self.groups * self.used_cols
        else:
            scales = 4 * self.out_features
        return kept_rows * self.used_row_bytes + scales


def quantize(weight_t: torch.Tensor, fmt: str,
             column_scales: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """Codes and scales of a K-major ``[D, N]`` weight in ``fmt`` (DESIGN.md point 10).

    Returns ``(codes, scales)`` for int8 (``codes`` int8, ``scales`` fp32 ``[N]``) and ternary
    (``codes`` in ``{-1, 0, 1}``; ``column_scales`` must give each column's scale, the absmean
    of the projection it belongs to), ``(codes, d, m)`` for int4 (``codes`` ``0..15``, ``d`` and
    ``m`` fp16 ``[groups, N]``). The values are exactly those of the ``qsparse`` fake
    quantizers on the ``[out, in]`` weights.
    """
    wt = weight_t.detach().float()
    if fmt == "int8":
        s = torch.clamp_min(wt.abs().amax(dim=0), 1e-8) / 127.0
        return torch.clamp(torch.round(wt / s), -127, 127).to(torch.int8), s
    if fmt == "ternary":
        if column_scales is None:
            raise ValueError("quantize: format 'ternary' needs column_scales (each column's "
                             "absmean scale)")
        a = column_scales.float()
        return torch.clamp(torch.round(wt / a), -1, 1).to(torch.int8), a
    if fmt != "int4":
        raise ValueError(f"quantize: format {fmt!r} is not one of {', '.join(map(repr, FORMATS))}")
    D, N = wt.shape
    codes = torch.empty(D, N, dtype=torch.uint8)
    groups = -(-D // INT4_GROUP)
    d16 = torch.empty(groups, N, dtype=torch.float16)
    m16 = torch.empty(groups, N, dtype=torch.float16)
    for g in range(groups):
        block = wt[g * INT4_GROUP:(g + 1) * INT4_GROUP]
        low = block.amin(dim=0)
        d = ((block.amax(dim=0) - low) / 15.0).half()
        m = low.half()
        if not (torch.isfinite(d).all() and torch.isfinite(m).all()):
            raise ValueError(f"quantize: int4 scales of rows {g * INT4_GROUP}.. are not finite "
                             f"in float16 (weights beyond +-65504, or NaN)")
        q = torch.clamp(torch.round((block - m.float()) / d.float()), 0, 15)
        codes[g * INT4_GROUP:(g + 1) * INT4_GROUP] = torch.where(d == 0, 0.0, q).to(torch.uint8)
        d16[g], m16[g] = d, m
    return codes, d16, m16


def _chunks(codes: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
    """``[D, Np / C, C]`` unsigned codes, padded columns zero (ternary: ``t + 1``, padded 1)."""
    D, N = codes.shape
    per = FORMATS[layout.format]
    out = torch.zeros(D, layout.padded_out, dtype=torch.int32)
    if layout.format == "ternary":
        out += 1
    out[:, :N] = codes.to(torch.int32) + (1 if layout.format == "ternary" else 0)
    return out.view(D, layout.padded_out // per, per)


def pack(layout: PackedLayout, codes: torch.Tensor, scales: torch.Tensor,
         minima: torch.Tensor | None = None) -> torch.Tensor:
    """The packed buffer (``uint8 [layout.nbytes]``) of ``codes`` (``[D, N]``) and scales."""
    D, N = layout.in_features, layout.out_features
    if tuple(codes.shape) != (D, N):
        raise ValueError(f"pack: codes of shape {tuple(codes.shape)} for a layout of "
                         f"[{D}, {N}]")
    buf = torch.zeros(layout.nbytes, dtype=torch.uint8)
    chunks = _chunks(codes, layout)
    if layout.format == "int8":
        rows = chunks.reshape(D, -1).to(torch.int8).view(torch.uint8)
    elif layout.format == "int4":
        rows = (chunks[..., :8] | (chunks[..., 8:] << 4)).reshape(D, -1).to(torch.uint8)
    else:
        c = chunks.view(D, -1, 4, 8)  # column 8j + i -> (j, i)
        rows = (c[:, :, 0] | (c[:, :, 1] << 2) | (c[:, :, 2] << 4) | (c[:, :, 3] << 6))
        rows = rows.reshape(D, -1).to(torch.uint8)
    panels = layout.padded_out // layout.panel_cols
    buf[:D * layout.row_bytes] = rows.view(D, panels, PANEL_ROW_BYTES).transpose(0, 1).reshape(-1)
    Np = layout.padded_out
    if layout.format == "int4":
        if minima is None:
            raise ValueError("pack: format 'int4' needs minima")
        for offset, values in ((layout.scale_offset, scales), (layout.min_offset, minima)):
            padded = torch.zeros(layout.groups, Np, dtype=torch.float16)
            padded[:, :N] = values
            buf[offset:offset + layout.scale_bytes] = padded.reshape(-1).view(torch.uint8)
    else:
        padded = torch.zeros(Np, dtype=torch.float32)
        padded[:N] = scales
        buf[layout.scale_offset:layout.scale_offset + layout.scale_bytes] = padded.view(
            torch.uint8)
    return buf


def dequantize(layout: PackedLayout, buf: torch.Tensor) -> torch.Tensor:
    """The fp32 ``[D, N]`` values the packed buffer holds (unpacked by plain indexing)."""
    D, N, Np = layout.in_features, layout.out_features, layout.padded_out
    per = FORMATS[layout.format]
    panels = Np // layout.panel_cols
    raw = buf[:D * layout.row_bytes].view(panels, D, PANEL_ROW_BYTES).transpose(0, 1)
    raw = raw.reshape(D, Np // per, 8)
    if layout.format == "int8":
        codes = raw.view(torch.int8).to(torch.float32).reshape(D, Np)
    elif layout.format == "int4":
        r = raw.to(torch.int32)
        codes = torch.cat([r & 15, r >> 4], dim=-1).reshape(D, Np).float()
    else:
        r = raw.to(torch.int32)
        codes = torch.cat([(r >> (2 * j)) & 3 for j in range(4)], dim=-1).reshape(D, Np)
        codes = codes.float() - 1.0
    sb = layout.scale_bytes
    if layout.format == "int4":
        d = buf[layout.scale_offset:layout.scale_offset + sb].view(torch.float16).float()
        m = buf[layout.min_offset:layout.min_offset + sb].view(torch.float16).float()
        group = torch.arange(D) // INT4_GROUP
        d, m = d.view(-1, Np)[group], m.view(-1, Np)[group]
        values = d * codes + m
    else:
        s = buf[layout.scale_offset:layout.scale_offset + sb].view(torch.float32)
        values = codes * s
    return values[:, :N].contiguous()
