"""Template of the row kernel: [norm] -> top-K or N:M select -> [L2 rescale] -> [int8 fake-quant].

One template renders the three sparsify kernels of the decode path, because they differ only in
what happens before and after the selection:

* top-K sparsify / mask (``norm="none"``, ``m == 0``),
* block N:M sparsify / mask (``norm="none"``, ``m > 0``),
* fused RMSNorm or LayerNorm + select + rescale + quant (``norm="rms"`` / ``"layer"``).

Work is a 2-D tile ``[BG, BM]`` whose rows are the selection units, so the same per-tile-row
reductions select within a whole row or within a group. Top-K: each tile row is one activation
row (``BG`` rows per program, several when ``D`` is small, one when ``D`` is large) and ``BM``
columns of it. N:M: a program owns one activation row and each tile row is one group of ``m``
entries (``BM = next_pow2(m)``, the lanes past ``m`` masked off).

Selection (DESIGN.md "Kernels"), all on the integer magnitude key (the bit pattern with the sign
cleared, every NaN mapped to the largest key):

* ``bisect``: the k-th largest key is built bit by bit from the top: a candidate with one more
  bit set is accepted when at least k keys are ``>=`` it (one ``tl.sum`` per bit, 31 steps for
  fp32 and 15 for 16-bit types). Ties at that key are then kept in index order with a prefix
  count (``tl.cumsum``) up to the room left by the keys strictly above it.
* ``rank`` (small ``m``): every entry counts the entries of its group that beat it (larger key,
  or equal key at a lower index); it is kept when fewer than ``n`` do. ``m * m`` compares per
  group instead of 15-31 reductions, and no tie-break step.
* ``all``: ``k == D`` or ``n == m`` keeps everything.

When the whole row fits one tile (``chunks == 1``, the decode case for every Llama width) the
activation is read once and written once. Wider rows loop over tiles: top-K then needs one pass
over the row per key bit (the row is re-read from L2), and row statistics (norm, rescale, quant)
each take a pass before the final write; the tie-break carries its prefix count across tiles.
"""

from __future__ import annotations

import dataclasses

from .template_common import (
    DTYPE_NAMES,
    SQRT_RN,
    Code,
    div_rn,
    dtype_helpers,
    module_header,
    next_pow2,
)

__all__ = ["RowSpec", "render", "KERNEL_NAME"]

#: Name of the entry-point kernel in every rendered row module.
KERNEL_NAME = "row_kernel"

NORMS = ("none", "rms", "layer")
SELECTS = ("all", "bisect", "rank")


@dataclasses.dataclass(frozen=True)
class RowSpec:
    """One specialisation of the row kernel; every field is baked into the rendered source.

    Attributes:
        dtype: input element type name (``fp32``, ``fp16``, ``bf16``).
        out_dtype: element type of the normalised activation and of the output (differs from
            ``dtype`` only for RMSNorm with a weight of another dtype, as ``weight * h`` promotes).
        d: row width D (the last dimension).
        k: entries kept per row (top-K); ignored when ``m > 0``.
        n, m: keep ``n`` of every ``m`` consecutive entries; ``m == 0`` selects top-K.
        norm: ``"none"``, ``"rms"`` or ``"layer"``.
        w_dtype, b_dtype: element type of the norm's weight / bias, ``None`` when absent.
        eps: the norm's epsilon.
        rescale: multiply each row by ``||h|| / ||h_masked||`` (fp32 norms).
        quant: per-row absmax int8 quantize-dequantize of the (rescaled) kept values.
        write_values: store the sparsified values.
        write_mask: store the boolean mask.
        chunk: tile size: columns per tile (top-K) or groups per tile (N:M); a power of two.
        select: ``"all"``, ``"bisect"`` or ``"rank"`` (see the module docstring).
        rows: activation rows per program (top-K whose row fits one tile; else 1).
    """

    dtype: str
    out_dtype: str
    d: int
    k: int
    n: int
    m: int
    norm: str
    w_dtype: str | None
    b_dtype: str | None
    eps: float
    rescale: bool
    quant: bool
    write_values: bool
    write_mask: bool
    chunk: int
    select: str
    rows: int = 1

    def __post_init__(self) -> None:
        assert self.dtype in DTYPE_NAMES and self.out_dtype in DTYPE_NAMES
        assert self.norm in NORMS and self.select in SELECTS
        assert self.write_values or self.write_mask
        assert self.chunk >= 1 and self.chunk & (self.chunk - 1) == 0
        if self.m:
            assert 1 <= self.n <= self.m and self.d % self.m == 0
        else:
            assert 1 <= self.k <= self.d and self.select != "rank"
        if self.norm == "none":
            assert self.w_dtype is None and self.b_dtype is None
        if self.norm == "rms":
            assert self.b_dtype is None
        assert self.rows >= 1 and self.rows & (self.rows - 1) == 0
        assert self.rows == 1 or (not self.block and self.chunks == 1)

    # --- derived geometry ------------------------------------------------------------------

    @property
    def block(self) -> bool:
        return self.m > 0

    @property
    def tile(self) -> tuple[int, int]:
        """``(BG, BM)``: tile rows (groups, or activation rows for top-K) and tile columns."""
        return (self.chunk, next_pow2(self.m)) if self.block else (self.rows, self.chunk)

    @property
    def group_width(self) -> int:
        """Columns between the starts of consecutive tile rows."""
        return self.m if self.block else self.chunk

    @property
    def chunk_cols(self) -> int:
        """Columns covered by one tile."""
        return self.chunk * self.m if self.block else self.chunk

    @property
    def chunks(self) -> int:
        return -(-self.d // self.chunk_cols)

    @property
    def keep_count(self) -> int:
        """Entries kept per tile row: k for top-K, n for N:M."""
        return self.n if self.block else self.k

    @property
    def key_bits(self) -> int:
        return DTYPE_NAMES[self.out_dtype].key_bits

    @property
    def name(self) -> str:
        """A readable identifier of the specialisation (the file name's prefix)."""
        sel = f"n{self.n}m{self.m}" if self.block else f"k{self.k}"
        parts = [f"qs_row_{self.norm}", self.dtype, f"d{self.d}", sel, self.select,
                 f"c{self.chunk}", f"r{self.rows}"]
        if self.out_dtype != self.dtype:
            parts.append(f"to{self.out_dtype}")
        if self.w_dtype:
            parts.append(f"w{self.w_dtype}")
        if self.b_dtype:
            parts.append(f"b{self.b_dtype}")
        parts += [flag for flag, on in (("l2", self.rescale), ("q8", self.quant),
                                        ("vals", self.write_values), ("mask", self.write_mask))
                  if on]
        return "_".join(parts)


def _rowsum(s: RowSpec, expr: str) -> str:
    """Per-activation-row sum of a tile expression, shaped to broadcast against the tile."""
    return f"tl.sum(tl.sum({expr}, 1), 0)" if s.block else f"tl.sum({expr}, 1)[:, None]"


def _rowmax(s: RowSpec, expr: str) -> str:
    return f"tl.max(tl.max({expr}, 1), 0)" if s.block else f"tl.max({expr}, 1)[:, None]"


def _zeros(s: RowSpec, dtype: str) -> str:
    """An accumulator of per-activation-row statistics."""
    return f"tl.zeros([{1 if s.block else s.rows}, 1], dtype={dtype})"


def _render_load_x(c: Code, s: RowSpec) -> None:
    bg, bm = s.tile
    c('''
        @triton.jit
        def load_x(x_ptr, stride_x, n_rows, row0, c0):
            """Tile at column ``c0``: input bits, column, validity, activation row (int64)."""
    ''')
    with c.block():
        if s.block:
            c(f"""
                g = tl.arange(0, {bg})[:, None]
                j = tl.arange(0, {bm})[None, :]
                col = c0 + g * {s.m} + j
                valid = (j < {s.m}) & (col < {s.d})
                row = row0
            """)
        else:
            c(f"""
                row = row0 + tl.arange(0, {bg})[:, None]
                col = c0 + tl.arange(0, {bm})[None, :]
                valid = (row < n_rows) & (col < {s.d})
            """)
        c(f"return load_bits_{s.dtype}(x_ptr, row * stride_x + col, valid), col, valid, row")


def _render_transform(c: Code, s: RowSpec) -> None:
    """``transform``: input bits -> bits of the value selected on (normalised), and its key."""
    out = DTYPE_NAMES[s.out_dtype]
    c('''
        @triton.jit
        def transform(xb, col, valid, w_ptr, b_ptr, mean, rstd):
            """The activation the selection sees (bits in the output dtype) and its key."""
    ''')
    with c.block():
        if s.norm == "none":
            c("hb = xb")
        elif s.norm == "rms":
            # HF Llama: w * (x32 * rsqrt(mean(x32^2) + eps)).to(dtype), the product in the
            # promoted dtype (exact in fp32 for 16-bit operands, then one rounding)
            c(f"hb = {s.dtype}_of_f32(f32_of_{s.dtype}(xb) * rstd)")
            if s.w_dtype:
                c(f"wf = f32_of_{s.w_dtype}(load_bits_{s.w_dtype}(w_ptr, col, valid))",
                  f"hb = {s.out_dtype}_of_f32(wf * f32_of_{s.dtype}(hb))")
        else:
            c(f"hf = (f32_of_{s.dtype}(xb) - mean) * rstd")
            if s.w_dtype:
                c(f"hf = hf * f32_of_{s.w_dtype}(load_bits_{s.w_dtype}(w_ptr, col, valid))")
            if s.b_dtype:
                c(f"hf = hf + f32_of_{s.b_dtype}(load_bits_{s.b_dtype}(b_ptr, col, valid))")
            c(f"hb = {s.out_dtype}_of_f32(hf)")
        c(f'''
            # |h| as an integer; every NaN becomes the largest key so NaNs rank first and tie
            mag = hb & {hex(out.abs_mask)}
            key = tl.where(mag > {hex(out.inf_bits)}, {hex(out.abs_mask)}, mag)
            key = tl.where(valid, key, -1)
            return hb, key


        ''')


def _render_select_tile(c: Code, s: RowSpec) -> None:
    """``select_tile``: the keep mask of a tile whose rows are complete selection units."""
    bg, bm = s.tile
    c('''
        @triton.jit
        def select_tile(key, valid):
            """Keep mask when each tile row holds a whole group (or the whole row)."""
    ''')
    with c.block():
        if s.select == "all":
            c("return valid")
        elif s.select == "rank":
            c(f'''
                ki = key[:, :, None]
                kj = key[:, None, :]
                i = tl.arange(0, {bm})[None, :, None]
                j = tl.arange(0, {bm})[None, None, :]
                # entry i loses to j when j's key is larger, or equal with j at a lower index
                beaten = tl.sum(((kj > ki) | ((kj == ki) & (j < i))).to(tl.int32), 2)
                return valid & (beaten < {s.keep_count})
            ''')
        else:
            c(f'''
                thr = tl.zeros([{bg}], dtype=tl.int32)
                for i in tl.static_range({s.key_bits}):
                    cand = thr | (1 << ({s.key_bits - 1} - i))
                    count = tl.sum((key >= cand[:, None]).to(tl.int32), 1)
                    thr = tl.where(count >= {s.keep_count}, cand, thr)
                # thr is now the k-th largest key of each tile row
                above = key > thr[:, None]
                tied = key == thr[:, None]
                room = {s.keep_count} - tl.sum(above.to(tl.int32), 1)
                rank = tl.cumsum(tied.to(tl.int32), 1)
                return above | (tied & (rank <= room[:, None]))
            ''')
    c("", "")


def _render_finish(c: Code, s: RowSpec) -> None:
    """``rescaled`` and ``quantize``: the arithmetic after the mask, on bits."""
    o = s.out_dtype
    c('''
        @triton.jit
        def rescaled(hb, keep, factor):
            """Kept bits, times the row's L2 factor (fp32, one rounding) when rescaling."""
            vb = tl.where(keep, hb, 0)
    ''')
    with c.block():
        if s.rescale:
            c(f"vb = {o}_of_f32(f32_of_{o}(vb) * factor)")
        c("return vb", "", "")
    if s.quant:
        c(f'''
            @triton.jit
            def quantize(vb, gamma):
                """int8 absmax fake-quant of bits ``vb`` with the row's ``gamma`` (DESIGN.md 5)."""
                t = {div_rn("127.0 * f32_of_" + o + "(vb)", "gamma")}
                # torch.round: half to even. t - floor(t) is exact for |t| <= 2^23.
                fl = tl.floor(t)
                frac = t - fl
                odd = (fl - 2.0 * tl.floor(fl * 0.5)) != 0.0
                q = fl + tl.where((frac > 0.5) | ((frac == 0.5) & odd), 1.0, 0.0)
                # rounding to zero keeps t's sign, as rint does: round(-0.4) is -0.0
                signed_zero = ((t.to(tl.int32, bitcast=True) >> 31) << 31).to(tl.float32,
                                                                              bitcast=True)
                q = tl.where(q == 0.0, signed_zero, q)
                # clamp with compares, which keep NaN (min/max may drop it on a GPU)
                q = tl.where(q > 127.0, 127.0, q)
                q = tl.where(q < -128.0, -128.0, q)
                return {o}_of_f32({div_rn("q * gamma", "127.0")})


            @triton.jit
            def quant_scale(amax, any_nan):
                """gamma = max(amax, 1e-5), NaN when any value of the row is NaN (as amax)."""
                gamma = tl.where(amax < 1e-5, 1e-5, amax)
                nan = (amax.to(tl.int32, bitcast=True) | 0x7FC00000).to(tl.float32, bitcast=True)
                return tl.where(any_nan, nan, gamma)


        ''')


def _render_kernel(c: Code, s: RowSpec) -> None:
    o = s.out_dtype
    params = ["x_ptr"]
    params += ["w_ptr"] if s.w_dtype else []
    params += ["b_ptr"] if s.b_dtype else []
    params += ["out_ptr"] if s.write_values else []
    params += ["mask_ptr"] if s.write_mask else []
    params += ["stride_x", "n_rows"]
    w_arg = "w_ptr" if s.w_dtype else "None"
    b_arg = "b_ptr" if s.b_dtype else "None"
    looped = s.chunks > 1
    row_topk = looped and not s.block and s.select == "bisect"
    load = "load_x(x_ptr, stride_x, n_rows, row0, {})"
    tile_loop = f"for c0 in range(0, {s.d}, {s.chunk_cols}):"

    c(f"@triton.jit\ndef {KERNEL_NAME}({', '.join(params)}):")
    with c.block():
        c(f'''
            """x [n_rows, {s.d}] (row stride ``stride_x``, unit column stride) -> contiguous
            outputs [n_rows, {s.d}]; program i owns rows [{s.rows} i, {s.rows} (i + 1))."""
            row0 = tl.program_id(0).to(tl.int64) * {s.rows}
            mean = 0.0
            rstd = 0.0
        ''')

        # --- norm statistics (fp32) ---------------------------------------------------------
        def stats(body: str, acc: str) -> None:
            if looped:
                c(f"{acc} = {_zeros(s, 'tl.float32')}", tile_loop)
                with c.block():
                    c(f"xb, col, valid, row = {load.format('c0')}",
                      f"xf = f32_of_{s.dtype}(xb)",
                      f"{acc} += {_rowsum(s, body)}")
            else:
                c(f"{acc} = {_rowsum(s, body)}")

        if not looped:
            c(f"xb, col, valid, row = {load.format('0')}", f"xf = f32_of_{s.dtype}(xb)")
        d = f"{float(s.d)!r}"
        if s.norm == "rms":
            stats("xf * xf", "sum_sq")
            c(f"mean_sq = {div_rn('sum_sq', d)}",
              f"rstd = {div_rn('1.0', f'{SQRT_RN}(mean_sq + {float(s.eps)!r})')}")
        elif s.norm == "layer":
            stats("xf", "total")
            c(f"mean = {div_rn('total', d)}")
            stats("tl.where(valid, (xf - mean) * (xf - mean), 0.0)", "sum_dev")
            c(f"var = {div_rn('sum_dev', d)}",
              f"rstd = {div_rn('1.0', f'{SQRT_RN}(var + {float(s.eps)!r})')}")
        transform = f"transform(xb, col, valid, {w_arg}, {b_arg}, mean, rstd)"

        # --- selection across tiles (top-K over a row wider than one tile) --------------------
        if row_topk:
            c(f'''
                # k-th largest key of the whole row, one pass over the row per key bit
                thr = tl.zeros([1], dtype=tl.int32)
                for i in tl.static_range({s.key_bits}):
                    cand = thr | (1 << ({s.key_bits - 1} - i))
                    count = tl.zeros([1], dtype=tl.int32)
                    {tile_loop}
                        xb, col, valid, row = {load.format('c0')}
                        hb, key = {transform}
                        count += tl.sum((key >= cand[:, None]).to(tl.int32), 1)
                    thr = tl.where(count >= {s.k}, cand, thr)
                n_above = tl.zeros([1], dtype=tl.int32)
                {tile_loop}
                    xb, col, valid, row = {load.format('c0')}
                    hb, key = {transform}
                    n_above += tl.sum((key > thr[:, None]).to(tl.int32), 1)
                room = {s.k} - n_above
            ''')

        def tile_keep() -> None:
            """Emit ``keep`` for the current tile (``hb``/``key`` defined); advances ``carry``."""
            if row_topk:
                c('''
                    above = key > thr[:, None]
                    tied = (key == thr[:, None]).to(tl.int32)
                    rank = tl.cumsum(tied, 1) + carry[:, None]
                    keep = above | ((tied != 0) & (rank <= room[:, None]))
                    carry += tl.sum(tied, 1)
                ''')
            else:
                c("keep = select_tile(key, valid)")

        def each_tile(*inits: str) -> None:
            """Accumulator set-up, then (multi-tile rows) open the loop over tiles."""
            c(*inits)
            if looped:
                if row_topk:
                    c("carry = tl.zeros([1], dtype=tl.int32)")
                c(tile_loop)
                c.indent()
                c(f"xb, col, valid, row = {load.format('c0')}", f"hb, key = {transform}")
                tile_keep()

        def end_tile() -> None:
            if looped:
                c.dedent()

        if not looped:
            # the whole row is in registers: select once, every phase below reuses it
            c(f"hb, key = {transform}")
            tile_keep()

        # --- rescale factor -----------------------------------------------------------------
        if s.rescale:
            each_tile(f"sum_full = {_zeros(s, 'tl.float32')}",
                      f"sum_kept = {_zeros(s, 'tl.float32')}")
            c(f"hf = f32_of_{o}(hb)",
              f"sum_full += {_rowsum(s, 'tl.where(valid, hf * hf, 0.0)')}",
              f"sum_kept += {_rowsum(s, 'tl.where(keep, hf * hf, 0.0)')}")
            end_tile()
            ratio = div_rn(f"{SQRT_RN}(sum_full)", f"{SQRT_RN}(sum_kept)")
            c(f"factor = tl.where(sum_kept > 0.0, {ratio}, 1.0)")
        else:
            c("factor = 1.0")

        # --- quantization scale --------------------------------------------------------------
        if s.quant:
            each_tile(f"amax = {_zeros(s, 'tl.float32')}", f"n_nan = {_zeros(s, 'tl.int32')}")
            c(f"vf = f32_of_{o}(rescaled(hb, keep, factor))",
              f"amax = tl.maximum(amax, {_rowmax(s, 'tl.where(valid, tl.abs(vf), 0.0)')})",
              f"n_nan += {_rowsum(s, '(valid & (vf != vf)).to(tl.int32)')}")
            end_tile()
            c("gamma = quant_scale(amax, n_nan > 0)")

        # --- write ---------------------------------------------------------------------------
        each_tile()
        c(f"offs = row * {s.d} + col")
        if s.write_mask:
            c("tl.store(mask_ptr + offs, keep, mask=valid)")
        if s.write_values:
            c("vb = rescaled(hb, keep, factor)")
            if s.quant:
                c("vb = quantize(vb, gamma)")
            c(f"store_bits_{o}(out_ptr, offs, vb, valid)")
        end_tile()


def render(spec: RowSpec) -> str:
    """The Python source of the module implementing ``spec`` (entry point ``row_kernel``)."""
    c = Code()
    c(module_header(f"Rendered row kernel {spec.name} (see qsparse_compile.codegen.triton."
                    f"row_template)."))
    c("", "")
    names = [spec.dtype, spec.out_dtype]
    names += [n for n in (spec.w_dtype, spec.b_dtype) if n]
    c(dtype_helpers(*names))
    c("", "")
    for piece in (_render_load_x, _render_transform, _render_select_tile, _render_finish,
                  _render_kernel):
        piece(c, spec)
        c("", "")
    return c.text()
