"""Template of the decode sparse GEMV over packed low-bit weights: ``y = x_s @ dequant(P) (+ b)``.

The weights are the packed K-major buffer of the CPU kernel (:mod:`..cpu.packed_weights`): the
output columns are cut into *panels* of 512 bytes of codes per row, each panel stored whole,
its ``K`` rows one after the other. On a GPU that layout is what a GEMV program wants too: a
program owns a run of ``BB`` bytes (a power of two, 8..512; 128 unless set) of one panel's
rows, so the ``[BK, BB]`` tile it loads is ``BK`` rows of ``BB`` bytes, 512 bytes apart (the
whole tile one contiguous region when ``BB == 512``), and a feature that is zero for every token
skips its ``BB`` bytes: its lanes are masked off and issue no memory request. The codes of one
8-byte *chunk* are interleaved: code ``j`` of byte ``i`` (``j < C``, ``C`` codes per byte: 1
for int8, 2 for int4, 4 for ternary) is column ``8 j + i`` of the chunk's ``8 C`` columns. The
kernel therefore loads a byte tile once, contiguously, and takes code ``j`` of every byte with
a shift and a mask: ``C`` code tiles, each a ``[BK, BB]`` tile of columns ``8 j`` apart from
the next, each with its own fp32 accumulator; the columns are only sorted out when the result
is stored. No gather, no ``tl.join``.

Dequantisation happens in registers, per format:

* ``int8``: signed codes ``q`` and one fp32 scale ``s`` per column: the scale is constant over
  the sum, so the loop accumulates ``x * q`` and the result is multiplied by ``s`` once.
* ``ternary``: codes ``t + 1`` in 2 bits and one fp32 scale per column (each projection's
  absmean): as int8, the loop accumulates ``x * t``.
* ``int4``: codes ``q`` in 4 bits, and per column and group of 32 rows an fp16 scale ``d`` and
  minimum ``m``: the weight ``d * q + m`` is formed in registers. ``BK`` divides 32 and tiles
  start at multiples of ``BK``, so a tile lies in one group and loads one ``d`` and one ``m``
  vector (skipped, like the codes, when no row of the tile is live: a group of dropped
  features costs no scale traffic).

Everything else is the dense GEMV's design (:mod:`.gemv_template`): the ``[T, BK, BB]`` fp32
accumulators take plain FMAs inside the loop and are reduced over ``BK`` once, after it; a
feature is read when it is non-zero for *any* token (the union of the rows' masks); ``K`` is
split into ``SPLIT`` ranges whose partial sums a second kernel adds in a fixed order
(:mod:`.split_reduce_template`).
"""

from __future__ import annotations

import dataclasses

from ...ops.quant import INT4_GROUP
from ..cpu.packed_weights import FORMATS, PANEL_ROW_BYTES
from .split_reduce_template import render_split_reduce, render_tile_store
from .template_common import DTYPE_NAMES, Code, dtype_helpers, module_header

__all__ = ["CHUNK_BYTES", "GEMV_KERNEL", "REDUCE_KERNEL", "PackedGemvSpec", "codes_per_byte",
           "render"]

GEMV_KERNEL = "packed_gemv_kernel"
REDUCE_KERNEL = "reduce_kernel"

#: Bytes of one chunk of interleaved codes (:mod:`..cpu.packed_weights`).
CHUNK_BYTES = 8


def codes_per_byte(fmt: str) -> int:
    """Codes one byte holds in ``fmt``: 1 (int8), 2 (int4), 4 (ternary)."""
    return FORMATS[fmt] // CHUNK_BYTES


@dataclasses.dataclass(frozen=True)
class PackedGemvSpec:
    """One specialisation of the packed GEMV; every field is baked into the rendered source.

    Attributes:
        dtype: element type of ``x``, ``b`` and ``y`` (``fp32``, ``fp16``, ``bf16``).
        format: weight format, ``int8``, ``int4`` or ``ternary``.
        k: in_features (rows of the packed weight).
        n: out_features.
        padded_n: columns of the buffer (``n`` padded to whole panels).
        tokens_block: power of two ``>=`` the tokens of one launch (at most 8).
        block_k: rows per tile (int4: a divisor of 32).
        block_bytes: bytes of a panel row per program (a power of two, 8..128).
        k_split: rows per split (a multiple of ``block_k``).
        splits: number of K ranges (grid dimension 1).
        has_bias: add a bias vector.
        reduce_block: outputs per program of the split reduction.
    """

    dtype: str
    format: str
    k: int
    n: int
    padded_n: int
    tokens_block: int
    block_k: int
    block_bytes: int
    k_split: int
    splits: int
    has_bias: bool
    reduce_block: int

    def __post_init__(self) -> None:
        assert self.dtype in DTYPE_NAMES and self.format in FORMATS
        for b in (self.tokens_block, self.block_k, self.block_bytes, self.reduce_block):
            assert b >= 1 and b & (b - 1) == 0, b
        assert CHUNK_BYTES <= self.block_bytes <= PANEL_ROW_BYTES
        assert self.format != "int4" or INT4_GROUP % self.block_k == 0
        assert self.k_split % self.block_k == 0 and self.splits * self.k_split >= self.k

    @property
    def name(self) -> str:
        bias = "_bias" if self.has_bias else ""
        return (f"qs_packed_gemv_{self.format}_{self.dtype}_k{self.k}_n{self.n}_"
                f"t{self.tokens_block}_bk{self.block_k}_bb{self.block_bytes}_s{self.splits}"
                f"{bias}")


def render(spec: PackedGemvSpec) -> str:
    """The Python source of the packed GEMV module for ``spec`` (and its split reduction)."""
    s = spec
    dt = DTYPE_NAMES[s.dtype]
    per = codes_per_byte(s.format)
    bits = 8 // per
    panel_cols = PANEL_ROW_BYTES * per
    c = Code()
    c(module_header(f"Rendered packed sparse GEMV {s.name} (see qsparse_compile.codegen."
                    f"triton.packed_gemv_template)."), "", "")
    c(dtype_helpers(s.dtype), "", "")
    params = ["x_ptr", "codes_ptr", "scale_ptr"] + (["min_ptr"] if s.format == "int4" else [])
    params += (["b_ptr"] if s.has_bias else []) + ["y_ptr", "tokens", "stride_xt"]
    c(f"@triton.jit\ndef {GEMV_KERNEL}({', '.join(params)}):")
    with c.block():
        target = ("y [tokens, N]" if s.splits == 1
                  else "fp32 partial sums ws [SPLIT, tokens, N] (y_ptr)")
        c(f'''
            """x [tokens, {s.k}] @ dequant({s.format} codes [{s.k}, {s.padded_n}]) -> {target}."""
            pid_n = tl.program_id(0)
            pid_k = tl.program_id(1)
            byte0 = pid_n * {s.block_bytes}
            panel = byte0 // {PANEL_ROW_BYTES}
            b = byte0 % {PANEL_ROW_BYTES} + tl.arange(0, {s.block_bytes})
            # code j of byte b is column 8 j + b % 8 of the chunk b // 8 (module docstring)
            col0 = panel * {panel_cols} + (b // {CHUNK_BYTES}) * {CHUNK_BYTES * per} + \\
                b % {CHUNK_BYTES}
            panel_start = panel.to(tl.int64) * {s.k * PANEL_ROW_BYTES}
            t = tl.arange(0, {s.tokens_block})
            t_ok = t < tokens
        ''')
        for j in range(per):
            c(f"acc{j} = tl.zeros([{s.tokens_block}, {s.block_k}, {s.block_bytes}], "
              f"dtype=tl.float32)")
        c(f'''
            k_lo = pid_k * {s.k_split}
            for k0 in range(0, {s.k_split}, {s.block_k}):
                feats = k_lo + k0 + tl.arange(0, {s.block_k})
                feat_ok = feats < {s.k}
                xb = load_bits_{s.dtype}(x_ptr, t[:, None] * stride_xt + feats[None, :],
                                      t_ok[:, None] & feat_ok[None, :])
                # a feature is read when any token needs it; -0.0 counts as zero (bits)
                live = tl.max((xb & {hex(dt.abs_mask)}).to(tl.int32), 0) != 0
                xf = f32_of_{s.dtype}(xb)[:, :, None]
                rows = panel_start + feats.to(tl.int64)[:, None] * {PANEL_ROW_BYTES}
                code = tl.load(codes_ptr + rows + b[None, :], mask=live[:, None],
                               other=0).to(tl.int32)
        ''')
        with c.block():
            if s.format == "int4":
                c(f'''
                    # the tile lies in one group: one d and one m per column, none when the
                    # group's rows in the tile are all dropped (an integer bound, not a scalar
                    # bool: the interpreter cannot mask with a broadcast scalar bool)
                    scale_cols = tl.max(live.to(tl.int32), 0) * {s.padded_n}
                    group_start = ((k_lo + k0) // {INT4_GROUP}).to(tl.int64) * {s.padded_n}
                ''')
            for j in range(per):
                shifted = "code" if j == 0 else f"(code >> {bits * j})"
                if s.format == "int8":
                    c(f"acc{j} += xf * code.to(tl.float32)[None, :, :]")
                elif s.format == "ternary":
                    c(f"acc{j} += xf * (({shifted} & 3) - 1).to(tl.float32)[None, :, :]")
                else:
                    c(f'''
                        cols = col0 + {CHUNK_BYTES * j}
                        want = cols < scale_cols
                        d = tl.load(scale_ptr + group_start + cols, mask=want, other=0.0)
                        m = tl.load(min_ptr + group_start + cols, mask=want, other=0.0)
                        w = ({shifted} & 15).to(tl.float32) * d.to(tl.float32)[None, :] + \\
                            m.to(tl.float32)[None, :]
                        acc{j} += xf * w[None, :, :]
                    ''')
        for j in range(per):
            c(f'''
                cols = col0 + {CHUNK_BYTES * j}
                col_ok = cols < {s.n}
                y = tl.sum(acc{j}, 1)
            ''')
            if s.format != "int4":  # the per-column scale, out of the sum
                c(f"y = y * tl.load(scale_ptr + cols, mask=cols < {s.padded_n}, "
                  f"other=0.0)[None, :]")
            c("ok = t_ok[:, None] & col_ok[None, :]")
            render_tile_store(c, s.dtype, s.n, s.splits, s.has_bias)
    c("", "")

    if s.splits > 1:
        render_split_reduce(c, REDUCE_KERNEL, s.dtype, s.n, s.splits, s.has_bias,
                            s.reduce_block)
    return c.text()
