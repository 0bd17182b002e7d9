"""The C source of the fused "select, then sparse GEMV over packed weights" decode kernel.

One call computes ``y = sparsify(x) @ dequant(packed) + bias`` for 1..8 activation rows ``x``
(fp32 or bf16), the weights packed as :mod:`.packed_weights` lays them out (int8, int4 or
ternary codes, K-major, 8-byte chunks):

1. **Select**, rescale, (int8-quantize) and unite the rows' kept features: :mod:`.select_c`.
2. **Sparse GEMV**: each kept feature reads one contiguous row of codes; a feature no row kept
   is never read. Codes are widened to fp32 in registers (int8: sign-extend; int4: a mask and a
   shift of one zero-extended load; ternary: two-bit fields minus one) and accumulated in fp32:
   eight columns per vector, or sixteen where the host has AVX-512 (int8, int4: two chunks per
   step, regrouped into natural column order, so the accumulators are the same). A sweep folds
   up to ``rows_per_pass`` kept rows while prefetching the next sweep's; a remainder of fewer
   rows is folded in one sweep of that many (a compile-time count, kept in registers).
   The scales are applied where they factor out of the sum: int8 and ternary scale whole
   columns, so ``y = s * sum_k x_k q_k`` (once per column, at the end); int4 scales a column
   per group of 32 features, so each group's codes are summed first and folded in as
   ``d * sum_k x_k q_k + m * sum_k x_k``. That equals the product with the dequantised weights
   up to the order of the fp32 sums (DESIGN.md point 10).
   Threads split the kept rows (int4: on group boundaries), each into its own fp32 partial
   sum, added in a fixed order at the end.

A specialisation fixes the element type, the format and the number of rows.
"""

from __future__ import annotations

import dataclasses
import string

import torch

from .c_common import ELEMENT_HELPERS, PRELUDE, SUPPORTED_DTYPES
from .packed_weights import FORMATS, PANEL_ROW_BYTES
from .select_c import SELECTION
from .topk_linear_template import MAX_ROWS

__all__ = ["PackedLinearSpec", "render"]

_FORMAT_IDS = {"int8": 0, "int4": 1, "ternary": 2}


@dataclasses.dataclass(frozen=True)
class PackedLinearSpec:
    """One specialisation of the packed kernel.

    Attributes:
        dtype: element type of ``x``, ``bias`` and ``y`` (fp32 or bf16).
        format: ``"int8"``, ``"int4"`` or ``"ternary"`` (:mod:`.packed_weights`).
        rows: activation rows per call (1..8), their masks united.
        rows_per_pass: kept weight rows folded into the accumulator per sweep.
        prefetch: software-prefetch the next sweep's rows of codes.

    The accumulator tile is one panel (:mod:`.packed_weights`): ``rows x panel columns``
    fp32 (int4: twice, the running sum and the current group's): 4 KiB (int8) to 8 KiB
    (int4, ternary) per activation row.
    """

    dtype: torch.dtype
    format: str
    rows: int
    rows_per_pass: int = 8
    prefetch: bool = True

    def __post_init__(self) -> None:
        if self.dtype not in SUPPORTED_DTYPES:
            allowed = ", ".join(str(d) for d in SUPPORTED_DTYPES)
            raise TypeError(f"packed linear kernel: dtype {self.dtype} is not supported; "
                            f"allowed: {allowed}")
        if self.format not in FORMATS:
            raise ValueError(f"packed linear kernel: format {self.format!r} is not one of "
                             f"{', '.join(map(repr, FORMATS))}")
        if not 1 <= self.rows <= MAX_ROWS:
            raise ValueError(f"packed linear kernel: rows must be in [1, {MAX_ROWS}], got "
                             f"{self.rows}")
        if not 1 <= self.rows_per_pass <= 16:
            raise ValueError(f"packed linear kernel: rows_per_pass must be in [1, 16], got "
                             f"{self.rows_per_pass}")

    @property
    def name(self) -> str:
        """A C identifier that names this specialisation (also the exported symbol)."""
        return (f"qs_packed_linear_{self.format}_{SUPPORTED_DTYPES[self.dtype]}_t{self.rows}"
                f"_r{self.rows_per_pass}_p{int(self.prefetch)}")


_TEMPLATE = string.Template(
    r"""/* qsparse cpu_packed_linear: ${format} weights, ${dtype_name} activations, ${rows} row(s),
 * ${rows_per_pass} weight rows per sweep, prefetch ${prefetch}.
 * Rendered from a template; do not edit.
 *
 * y[t, :] = bias + sum_k sparsify(x[t, :])[k] * dequant(row k of the packed codes)
 */
${prelude}
#define ROWS ${rows}
#define ROWS_PER_PASS ${rows_per_pass}
#define ELEM_IS_BF16 ${elem_is_bf16}
#define PREFETCH ${prefetch}
#define FMT ${format_id}
#define FMT_INT8 0
#define FMT_INT4 1
#define FMT_TERNARY 2
/* Columns one 8-byte chunk of codes holds. */
#define CHUNK ${chunk}
#define GROUP ${group}
/* A panel: PANEL_ROW bytes of codes per row, PANEL_COLS columns; the accumulator tile. */
#define PANEL_ROW ${panel_row}
#define PANEL_COLS ${panel_cols}
#define TILE_COLS PANEL_COLS
/* Below this many bytes of codes per thread, waking a second thread costs more than it saves
 * (24 KiB: SmolLM2's 576 x 576 int4 projection at 50% splits, 27.5 -> 21.1 us per call). */
#define MIN_BYTES_PER_THREAD (24 * 1024)
/* Software prefetches fill L2, not L1: the rows of codes come from DRAM, and fetching them
 * into L1 ties up its few miss buffers, which the loads in flight need (measured on SmolLM2's
 * shapes, 2 threads of an AVX-512 EPYC, against L1: int4 -14%, int8 -11%, head -8..-32%). */
#define PF_HINT _MM_HINT_T1
/* The integer path fetches the rows, scales and minima of the group PF_AHEAD on (3 measured
 * 6% faster than 1 once the scales are fetched too: each group's scales are a new stream). */
#define PF_AHEAD 3
#define PF_SCALES 1

${element_helpers}
static inline float round_elem(float f) { return to_f32(from_f32(f)); }

${selection}

/* ---- codes -> fp32 ----------------------------------------------------------------------- */

/* Column j (0 <= j < PANEL_COLS) of a panel's row of codes, as the number the scales
 * multiply. */
static inline float code_at(const uint8_t* row, int64_t j) {
    const uint8_t b = row[(j / CHUNK) * 8 + (j % 8)];
#if FMT == FMT_INT8
    return (float)(int8_t)b;
#elif FMT == FMT_INT4
    return (float)((j % 16) < 8 ? (b & 15) : (b >> 4));
#else
    return (float)((b >> (2 * ((j % 32) / 8))) & 3) - 1.0f;
#endif
}

#if QS_SIMD
/* The v-th vector of 8 columns (v < CHUNK / 8) of the chunk at src. */
static inline __m256 chunk_vec(const uint8_t* src, int v) {
    const __m128i raw = _mm_loadl_epi64((const __m128i*)src);
#if FMT == FMT_INT8
    (void)v;
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw));
#elif FMT == FMT_INT4
    const __m256i b = _mm256_cvtepu8_epi32(raw);
    const __m256i q = v == 0 ? _mm256_and_si256(b, _mm256_set1_epi32(15))
                             : _mm256_srli_epi32(b, 4);
    return _mm256_cvtepi32_ps(q);
#else
    const __m256i b = _mm256_cvtepu8_epi32(raw);
    const __m256i q = _mm256_and_si256(_mm256_srlv_epi32(b, _mm256_set1_epi32(2 * v)),
                                       _mm256_set1_epi32(3));
    return _mm256_sub_ps(_mm256_cvtepi32_ps(q), _mm256_set1_ps(1.0f));
#endif
}
#endif

/* AVX-512 (int8, int4): two chunks (16 bytes of codes) per step, 16 columns per vector, the
 * columns in their natural order, so the accumulator tile is the same as the AVX2 path's. */
#if QS_SIMD && defined(__AVX512F__) && FMT != FMT_TERNARY
#define QS_WIDE 1
/* Columns one step of two chunks covers. */
#define WIDE_COLS (2 * CHUNK)
#define WIDE_VECS (WIDE_COLS / 16)
/* The 16-byte step at src as WIDE_VECS vectors of 16 columns. */
static inline void wide_vecs(const uint8_t* src, __m512* w) {
    const __m128i raw = _mm_loadu_si128((const __m128i*)src);
#if FMT == FMT_INT8
    w[0] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(raw));
#else
    /* chunk c's low nibbles are its columns 0-7, its high nibbles 8-15: regroup the two
     * chunks' halves into columns 0-15 and 16-31 */
    const __m128i mask = _mm_set1_epi8(15);
    const __m128i lo = _mm_and_si128(raw, mask);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
    w[0] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi64(lo, hi)));
    w[1] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_unpackhi_epi64(lo, hi)));
#endif
}
#else
#define QS_WIDE 0
#endif

/* ---- sparse GEMV ------------------------------------------------------------------------- */

/* Fold nr rows of one panel's codes into acc[ROWS][PANEL_COLS], columns [0, cols) (a multiple
 * of CHUNK: the last panel's padding is neither read nor computed). next (nr_next entries) are
 * the rows of the following sweep, prefetched meanwhile. */
static inline __attribute__((always_inline)) void fold_rows(
    float* restrict acc, const int32_t* restrict rows, const float* restrict vals, const int nr,
    const int32_t* restrict next, const int nr_next, const uint8_t* restrict panel,
    const int64_t cols) {
    const uint8_t* src[ROWS_PER_PASS];
    for (int r = 0; r < nr; ++r) src[r] = panel + (int64_t)rows[r] * PANEL_ROW;
#if PREFETCH
    const uint8_t* pre[ROWS_PER_PASS];
    for (int r = 0; r < nr_next; ++r) pre[r] = panel + (int64_t)next[r] * PANEL_ROW;
#else
    (void)next;
    (void)nr_next;
#endif
#if QS_SIMD
    int64_t j0 = 0;
#if QS_WIDE
    {
        __m512 xw[ROWS_PER_PASS * ROWS];
        for (int r = 0; r < nr; ++r)
            for (int t = 0; t < ROWS; ++t) xw[r * ROWS + t] = _mm512_set1_ps(vals[r * ROWS + t]);
        for (; j0 + WIDE_COLS <= cols; j0 += WIDE_COLS) {
            const int64_t byte = j0 / CHUNK * 8;
#if PREFETCH
            if (byte % 64 == 0)
                for (int r = 0; r < nr_next; ++r) _mm_prefetch((const char*)(pre[r] + byte),
                                                              PF_HINT);
#endif
            __m512 wv[ROWS_PER_PASS][WIDE_VECS];
            for (int r = 0; r < nr; ++r) wide_vecs(src[r] + byte, wv[r]);
            for (int t = 0; t < ROWS; ++t)
                for (int v = 0; v < WIDE_VECS; ++v) {
                    float* a_ptr = acc + t * TILE_COLS + j0 + 16 * v;
                    __m512 a = _mm512_load_ps(a_ptr);
                    for (int r = 0; r < nr; ++r) a = _mm512_fmadd_ps(xw[r * ROWS + t], wv[r][v], a);
                    _mm512_store_ps(a_ptr, a);
                }
        }
    }
#endif
    __m256 xv[ROWS_PER_PASS * ROWS];
    for (int r = 0; r < nr; ++r)
        for (int t = 0; t < ROWS; ++t) xv[r * ROWS + t] = _mm256_set1_ps(vals[r * ROWS + t]);
    for (int64_t j = j0; j < cols; j += CHUNK) {
        const int64_t byte = j / CHUNK * 8;
#if PREFETCH
        if (byte % 64 == 0)
            for (int r = 0; r < nr_next; ++r) _mm_prefetch((const char*)(pre[r] + byte),
                                                          PF_HINT);
#endif
        for (int v = 0; v < CHUNK / 8; ++v) {
            __m256 wv[ROWS_PER_PASS];
            for (int r = 0; r < nr; ++r) wv[r] = chunk_vec(src[r] + byte, v);
            for (int t = 0; t < ROWS; ++t) {
                float* a_ptr = acc + t * TILE_COLS + j + 8 * v;
                __m256 a = _mm256_load_ps(a_ptr);
                for (int r = 0; r < nr; ++r) a = _mm256_fmadd_ps(xv[r * ROWS + t], wv[r], a);
                _mm256_store_ps(a_ptr, a);
            }
        }
    }
#else
    for (int64_t j = 0; j < cols; ++j)
        for (int r = 0; r < nr; ++r) {
            const float q = code_at(src[r], j);
            for (int t = 0; t < ROWS; ++t) acc[t * TILE_COLS + j] += vals[r * ROWS + t] * q;
        }
#endif
}

/* Kept rows [i0, i1) of one panel into acc, in sweeps of ROWS_PER_PASS; each sweep prefetches
 * the rows of the next, up to row iend (int4 folds a group at a time: the next group's first
 * rows are fetched while this group's last sweep runs, not after it). */
static inline void fold_range(float* acc, const int32_t* rows, const float* vals, int64_t i0,
                              int64_t i1, int64_t iend, const uint8_t* panel, int64_t cols) {
    int64_t i = i0;
    for (; i + ROWS_PER_PASS <= i1; i += ROWS_PER_PASS) {
        const int64_t left = iend - (i + ROWS_PER_PASS);
        const int nr_next = left < ROWS_PER_PASS ? (int)left : ROWS_PER_PASS;
        fold_rows(acc, rows + i, vals + i * ROWS, ROWS_PER_PASS, rows + i + ROWS_PER_PASS,
                  nr_next, panel, cols);
    }
    const int64_t after = iend - i1;
    const int nr_after = after < ROWS_PER_PASS ? (int)after : ROWS_PER_PASS;
    /* the last < ROWS_PER_PASS rows in one sweep, its row count a constant per case so that
     * the inlined fold keeps them in registers (int4 folds each group's rows apart: one row
     * at a time, a group's remainder would cost a load and a store per multiply-add) */
    switch ((int)(i1 - i)) {
${tail_cases}
    default: break;
    }
}

#if FMT == FMT_INT4
#if QS_SIMD && defined(__F16C__)
#define QS_F16C 1
#else
#define QS_F16C 0
#endif

static inline float half_to_f32(uint16_t h) {
#if QS_F16C
    return _cvtsh_ss(h);
#else
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 31u, m = h & 1023u;
    union { uint32_t u; float f; } c;
    if (e == 0) {  /* zero or subnormal: m * 2^-24 */
        c.f = (float)m * 5.9604644775390625e-8f;
        c.u |= sign;
    } else if (e == 31) {
        c.u = sign | 0x7f800000u | (m << 13);
    } else {
        c.u = sign | ((e + 112u) << 23) | (m << 13);
    }
    return c.f;
#endif
}

/* acc[t][j] += d[j] * gacc[t][j] + m[j] * xsum[t] over the panel's columns [0, cols). */
static inline void fold_group(float* restrict acc, const float* restrict gacc,
                              const uint16_t* restrict d, const uint16_t* restrict m,
                              const float* restrict xsum, const int64_t cols) {
    int64_t j = 0;
#if QS_WIDE
    for (; j + 16 <= cols; j += 16) {
        const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(d + j)));
        const __m512 mv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(m + j)));
        for (int t = 0; t < ROWS; ++t) {
            float* a_ptr = acc + t * TILE_COLS + j;
            __m512 a = _mm512_load_ps(a_ptr);
            a = _mm512_fmadd_ps(dv, _mm512_load_ps(gacc + t * TILE_COLS + j), a);
            a = _mm512_fmadd_ps(mv, _mm512_set1_ps(xsum[t]), a);
            _mm512_store_ps(a_ptr, a);
        }
    }
#endif
#if QS_F16C
    for (; j + 8 <= cols; j += 8) {
        const __m256 dv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(d + j)));
        const __m256 mv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(m + j)));
        for (int t = 0; t < ROWS; ++t) {
            float* a_ptr = acc + t * TILE_COLS + j;
            __m256 a = _mm256_load_ps(a_ptr);
            a = _mm256_fmadd_ps(dv, _mm256_load_ps(gacc + t * TILE_COLS + j), a);
            a = _mm256_fmadd_ps(mv, _mm256_set1_ps(xsum[t]), a);
            _mm256_store_ps(a_ptr, a);
        }
    }
#endif
    for (; j < cols; ++j) {
        const float dj = half_to_f32(d[j]), mj = half_to_f32(m[j]);
        for (int t = 0; t < ROWS; ++t)
            acc[t * TILE_COLS + j] += dj * gacc[t * TILE_COLS + j] + mj * xsum[t];
    }
}
#endif

/* ---- int4 codes x int8 activations: integer dot products --------------------------------
 * With quant, the kept values are q_t * s_t (integer q, the row's s = g / 127), so a group's
 * sum_k x_k (d q_k' + m) is s_t (d sum_k q_k q_k' + m sum_k q_k): an exact integer sum
 * (|sum| <= 32 * 15 * 128 < 2^24) scaled once. AVX-512 VNNI multiplies four unsigned codes by
 * four signed activations and adds them into one int32 lane (vpdpbusd); the codes of four kept
 * features are interleaved per column by one two-register byte permute (VBMI) and a nibble
 * shift, so the 16 lanes of a vector are 16 consecutive columns. Used for fp32 rows
 * (bf16 rows round q * s to bf16, which is no longer q times the row's scale) whose scales are
 * finite (an infinite or NaN row takes the float path, whose rounding it must reproduce), for
 * up to 4 rows (16 int32 accumulators of 64 columns in registers). */
#if QS_WIDE && FMT == FMT_INT4 && defined(__AVX512VBMI__) && defined(__AVX512VNNI__) \
    && !ELEM_IS_BF16 && ROWS <= 4
#define QS_VNNI 1
/* Columns one step of the integer path covers: four vectors of 16. */
#define VNNI_COLS 64
/* Byte 4j + r of permute c: row r's code of column 16c + j, as a byte of X = rows 0|1 or
 * Y = rows 2|3 (32 bytes of each row): column j's chunk c, byte j % 8, the low nibble for
 * j < 8 and the high one for j >= 8 (bytes 32..63: words 16..31 are shifted by 4). */
static const uint8_t VNNI_PERMUTE[4][64] __attribute__((aligned(64))) = {
${vnni_permute}
};

/* acc[t][0, cols) += d * sum q q' + m * sum q, group by group, for one panel. */
static void vnni_panel(float* restrict acc, const int32_t* restrict rows,
                       const int8_t* restrict codes, const int64_t* gstart,
                       const int32_t* restrict qsum, int64_t g0, int64_t g1,
                       const uint8_t* panel, const uint16_t* dq, const uint16_t* mq,
                       int64_t Np, int64_t cols, const uint8_t* next_panel,
                       int64_t next_cols) {
    __m512i perm[4];
    for (int c = 0; c < 4; ++c) perm[c] = _mm512_load_si512((const void*)VNNI_PERMUTE[c]);
    const __m512i low4 = _mm512_set1_epi8(15);
    const int64_t steps = (cols + VNNI_COLS - 1) / VNNI_COLS;  /* padding columns are zeros */
    for (int64_t g = g0; g < g1; ++g) {
        const int64_t i0 = gstart[g], i1 = gstart[g + 1];
        if (i0 == i1) continue;
        const int quads = (int)((i1 - i0 + 3) / 4);
        const uint8_t* src[GROUP / 4][4];
        int32_t act[GROUP / 4][ROWS];  /* four int8 activations per row, as one dword */
        for (int qd = 0; qd < quads; ++qd)
            for (int t = 0; t < ROWS; ++t) act[qd][t] = 0;
        for (int64_t i = i0; i < i0 + 4 * quads; ++i) {
            const int qd = (int)((i - i0) / 4), r = (int)((i - i0) % 4);
            const int64_t at = i < i1 ? i : i0;  /* a quad's missing features: activation 0 */
            src[qd][r] = panel + (int64_t)rows[at] * PANEL_ROW;
            if (i < i1)
                for (int t = 0; t < ROWS; ++t)
                    act[qd][t] |= (int32_t)((uint32_t)(uint8_t)codes[i * ROWS + t] << (8 * r));
        }
        const uint16_t* dg = dq + g * Np;
        const uint16_t* mg = mq + g * Np;
        /* the rows, scales and minima of the group PF_AHEAD groups on (in this panel, else
         * in the next one) are prefetched line by line as this group's steps advance */
        const int64_t ahead = g + PF_AHEAD < g1 ? g + PF_AHEAD : g0 + (g + PF_AHEAD - g1);
        const int in_next = g + PF_AHEAD >= g1;
        const uint8_t* pf_panel = in_next ? next_panel : panel;
        const int64_t pf_cols = in_next ? next_cols : cols;
        const int64_t pf_c = in_next ? PANEL_COLS : 0;  /* its columns, from this panel's */
        const int64_t n0 = ahead < g1 ? gstart[ahead] : 0,
                      n1 = pf_panel && ahead < g1 ? gstart[ahead + 1] : n0;
        for (int64_t s = 0; s < steps; ++s) {
            const int64_t byte = s * (VNNI_COLS / 2), j0 = s * VNNI_COLS;
#if PREFETCH
            if (j0 < pf_cols) {
                if (byte % 64 == 0)
                    for (int64_t i = n0; i < n1; ++i)
                        _mm_prefetch((const char*)(pf_panel + (int64_t)rows[i] * PANEL_ROW
                                                   + byte), PF_HINT);
                if (n1 > n0 && PF_SCALES) {
                    const uint16_t* pd = dq + ahead * Np + pf_c + j0;
                    const uint16_t* pm = mq + ahead * Np + pf_c + j0;
                    _mm_prefetch((const char*)pd, PF_HINT);
                    _mm_prefetch((const char*)(pd + 32), PF_HINT);
                    _mm_prefetch((const char*)pm, PF_HINT);
                    _mm_prefetch((const char*)(pm + 32), PF_HINT);
                }
            }
#endif
            __m512i isum[ROWS][4];
            for (int t = 0; t < ROWS; ++t)
                for (int c = 0; c < 4; ++c) isum[t][c] = _mm512_setzero_si512();
            for (int qd = 0; qd < quads; ++qd) {
                const __m512i X = _mm512_inserti64x4(
                    _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)(src[qd][0] + byte))),
                    _mm256_loadu_si256((const __m256i*)(src[qd][1] + byte)), 1);
                const __m512i Y = _mm512_inserti64x4(
                    _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)(src[qd][2] + byte))),
                    _mm256_loadu_si256((const __m256i*)(src[qd][3] + byte)), 1);
                for (int c = 0; c < 4; ++c) {
                    __m512i v = _mm512_permutex2var_epi8(X, perm[c], Y);
                    v = _mm512_and_si512(_mm512_mask_srli_epi16(v, 0xFFFF0000u, v, 4), low4);
                    for (int t = 0; t < ROWS; ++t)
                        isum[t][c] = _mm512_dpbusd_epi32(isum[t][c], v,
                                                         _mm512_set1_epi32(act[qd][t]));
                }
            }
            for (int c = 0; c < 4; ++c) {
                const int64_t j = j0 + 16 * c;
                const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(dg + j)));
                const __m512 mv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(mg + j)));
                for (int t = 0; t < ROWS; ++t) {
                    float* a_ptr = acc + t * TILE_COLS + j;
                    __m512 a = _mm512_load_ps(a_ptr);
                    a = _mm512_fmadd_ps(dv, _mm512_cvtepi32_ps(isum[t][c]), a);
                    a = _mm512_fmadd_ps(mv, _mm512_set1_ps((float)qsum[g * ROWS + t]), a);
                    _mm512_store_ps(a_ptr, a);
                }
            }
        }
    }
}
#else
#define QS_VNNI 0
#endif

/* One thread's share, kept rows [i0, i1) (int4: whole groups [g0, g1), their rows starting at
 * gstart[g]), over the used columns (the first N, in whole chunks), panel by panel, into
 * part[ROWS][Np] (fp32). */
static void gemv_share(const int32_t* rows, const float* vals, int64_t i0, int64_t i1,
                       const int64_t* gstart, const float* xsum, int64_t g0, int64_t g1,
                       const int8_t* qcodes, const int32_t* qsum,
                       const uint8_t* codes, int64_t panel_bytes, const uint16_t* dq,
                       const uint16_t* mq, int64_t N, int64_t Np, float* part) {
    float acc[ROWS * TILE_COLS] __attribute__((aligned(64)));
#if FMT == FMT_INT4
    float gacc[ROWS * TILE_COLS] __attribute__((aligned(64)));
    (void)i0;
    (void)i1;
#else
    (void)gstart;
    (void)xsum;
    (void)g0;
    (void)g1;
    (void)dq;
    (void)mq;
#endif
#if !QS_VNNI
    (void)qcodes;
    (void)qsum;
#endif
    const int64_t used = (N + CHUNK - 1) / CHUNK * CHUNK;
    for (int64_t c0 = 0; c0 < used; c0 += PANEL_COLS) {
        const uint8_t* panel = codes + (c0 / PANEL_COLS) * panel_bytes;
        const int64_t cols = used - c0 < PANEL_COLS ? used - c0 : PANEL_COLS;
        memset(acc, 0, sizeof(acc));
#if QS_VNNI
        if (qcodes) {  /* int8 activations: integer sums (the caller checked the scales) */
            const int64_t c1 = c0 + PANEL_COLS;
            vnni_panel(acc, rows, qcodes, gstart, qsum, g0, g1, panel, dq + c0, mq + c0, Np,
                       cols, c1 < used ? panel + panel_bytes : NULL,
                       c1 < used ? (used - c1 < PANEL_COLS ? used - c1 : PANEL_COLS) : 0);
        } else
#endif
#if FMT == FMT_INT4
        for (int64_t g = g0; g < g1; ++g) {
            if (gstart[g] == gstart[g + 1]) continue;  /* no row kept a feature of it */
            for (int t = 0; t < ROWS; ++t)
                memset(gacc + t * TILE_COLS, 0, sizeof(float) * (size_t)cols);
            fold_range(gacc, rows, vals, gstart[g], gstart[g + 1], gstart[g1], panel, cols);
            fold_group(acc, gacc, dq + g * Np + c0, mq + g * Np + c0, xsum + g * ROWS, cols);
        }
#else
        fold_range(acc, rows, vals, i0, i1, i1, panel, cols);
#endif
        for (int t = 0; t < ROWS; ++t) memcpy(part + t * Np + c0, acc + t * TILE_COLS,
                                              sizeof(float) * (size_t)cols);
    }
}

/* y[t, j0:j1] = bias + scale * (the threads' partial sums, added in thread order): int8 and
 * ternary scale each column (col_scale), int4's scales are inside the sums, and the integer
 * path's sums are in units of the row's int8 codes (qscale[t], NULL otherwise). The same
 * operations in the same order as one loop per element (0 + p0 + p1 + ...), in blocks of 256
 * columns so that each step is a vector loop. */
static void finish_columns(const float* restrict part, int64_t team, int64_t Np,
                           const float* restrict col_scale, const float* qscale,
                           const elem_t* restrict bias, elem_t* restrict y, int64_t ldy,
                           int64_t j0, int64_t j1) {
    float tmp[256] __attribute__((aligned(64)));
#if FMT == FMT_INT4
    (void)col_scale;
#endif
    for (int t = 0; t < ROWS; ++t)
        for (int64_t c = j0; c < j1; c += 256) {
            const int64_t w = j1 - c < 256 ? j1 - c : 256;
            const float* p0 = part + (int64_t)t * Np + c;
            for (int64_t j = 0; j < w; ++j) tmp[j] = 0.0f + p0[j];
            for (int64_t p = 1; p < team; ++p) {
                const float* src = part + (p * ROWS + t) * Np + c;
                for (int64_t j = 0; j < w; ++j) tmp[j] += src[j];
            }
#if FMT != FMT_INT4
            for (int64_t j = 0; j < w; ++j) tmp[j] *= col_scale[c + j];
#else
            if (qscale) {
                const float q = qscale[t];
                for (int64_t j = 0; j < w; ++j) tmp[j] *= q;
            }
#endif
            if (bias)
                for (int64_t j = 0; j < w; ++j) tmp[j] += to_f32(bias[c + j]);
            elem_t* yt = y + t * ldy + c;
            for (int64_t j = 0; j < w; ++j) yt[j] = from_f32(tmp[j]);
        }
}

/* Entry point. Returns the number of rows of codes read (features kept by some row), -1 if
 * the scratch buffers could not be allocated.
 *   x, x_stride_t, x_stride_k, D   ROWS x D activations (element (t, i) at
 *                                  x[t * x_stride_t + i * x_stride_k])
 *   k; n, m; rescale; quant        selection as in select_c (quant: int8 activations)
 *   packed                         the buffer of packed_weights: codes from byte 0, panel
 *                                  after panel (panel_bytes each); scales at scale_off; int4
 *                                  minima at min_off
 *   N, Np                          output columns, and columns per row of codes (padded)
 *   bias                           N values or NULL
 *   y                              ROWS x N output, row t at y + t * ldy
 *   nthreads                       the most threads to use
 */
int64_t ${name}(const elem_t* x, int64_t x_stride_t, int64_t x_stride_k, int64_t D,
                 int64_t k, int64_t n, int64_t m, int64_t rescale, int64_t quant,
                 const uint8_t* packed, int64_t panel_bytes, int64_t scale_off, int64_t min_off,
                 int64_t N, int64_t Np, const elem_t* bias, elem_t* y, int64_t ldy,
                 int64_t nthreads) {
    /* 1. select (rescale, quantize) each row, then unite the kept features */
    const kept_t kept = select_rows(x, x_stride_t, x_stride_k, D, k, n, m, rescale, quant);
    if (kept.nnz < 0) return -1;
    const int64_t nnz = kept.nnz;
    const int32_t* rows = kept.rows;
    const float* vals = kept.vals;

    /* int4: where each group's kept rows start, and each row's sum of kept values per group */
    const int64_t groups = (D + GROUP - 1) / GROUP;
    int64_t* gstart = NULL;
    float* xsum = NULL;
    /* the integer path: the kept features' int8 codes, NULL where the float path runs */
    const int8_t* qcodes = NULL;
    int32_t* qsum = NULL;
#if QS_VNNI
    if (quant) {
        qcodes = kept.codes;
        for (int t = 0; t < ROWS; ++t)
            if (!__builtin_isfinite(kept.qscale[t])) qcodes = NULL;
    }
#endif
#if FMT == FMT_INT4
    gstart = (int64_t*)grow(&scratch_extra, sizeof(int64_t) * (size_t)(groups + 1)
                            + (sizeof(float) + sizeof(int32_t)) * (size_t)(groups * ROWS));
    if (!gstart) return -1;
    xsum = (float*)(gstart + groups + 1);
    qsum = (int32_t*)(xsum + groups * ROWS);
    {
        int64_t i = 0;
        for (int64_t g = 0; g < groups; ++g) {
            gstart[g] = i;
            float s[ROWS] = {0};
            int32_t si[ROWS] = {0};
            for (; i < nnz && rows[i] < (g + 1) * GROUP; ++i)
                for (int t = 0; t < ROWS; ++t) {
                    s[t] += vals[i * ROWS + t];
                    if (qcodes) si[t] += qcodes[i * ROWS + t];
                }
            for (int t = 0; t < ROWS; ++t) {
                xsum[g * ROWS + t] = s[t];
                qsum[g * ROWS + t] = si[t];
            }
        }
        gstart[groups] = nnz;
    }
#endif

    /* 2a. threads split the kept rows (int4: the groups); each sums into its own partial */
    int64_t team = nthreads;
    const int64_t bytes = nnz * ((N + CHUNK - 1) / CHUNK) * 8;  /* codes read */
    if (team > bytes / MIN_BYTES_PER_THREAD) team = bytes / MIN_BYTES_PER_THREAD;
    if (team > nnz / ROWS_PER_PASS) team = nnz / ROWS_PER_PASS;
    if (FMT == FMT_INT4 && team > groups) team = groups;
    if (team < 1) team = 1;
    float* part = (float*)grow(&scratch_part, sizeof(float) * (size_t)(team * ROWS * Np + 1));
    if (!part) return -1;
    const uint16_t* dq = (const uint16_t*)(packed + scale_off);
    const uint16_t* mq = (const uint16_t*)(packed + min_off);
#ifdef _OPENMP
#pragma omp parallel num_threads((int)team) if (team > 1)
#endif
    {
#ifdef _OPENMP
        const int64_t tid = omp_get_thread_num(), size = omp_get_num_threads();
#else
        const int64_t tid = 0, size = 1;
#endif
        const int64_t sweeps = (nnz + ROWS_PER_PASS - 1) / ROWS_PER_PASS;
        int64_t i0 = sweeps * tid / size * ROWS_PER_PASS;
        int64_t i1 = sweeps * (tid + 1) / size * ROWS_PER_PASS;
        i0 = i0 < nnz ? i0 : nnz;
        i1 = i1 < nnz ? i1 : nnz;
        /* int4: a group goes to the share its first kept row falls in */
        int64_t g0 = 0, g1 = groups;
        if (FMT == FMT_INT4 && size > 1) {
            const int64_t lo = nnz * tid / size, hi = nnz * (tid + 1) / size;
            while (g0 < groups && gstart[g0] < lo) ++g0;
            g1 = g0;
            while (g1 < groups && gstart[g1] < hi) ++g1;
            if (tid == size - 1) g1 = groups;
        }
        gemv_share(rows, vals, i0, i1, gstart, xsum, g0, g1, qcodes, qsum, packed, panel_bytes,
                   dq, mq, N, Np, part + tid * ROWS * Np);
        /* 2b. once every partial is there, each thread finishes its share of the columns
         * (the partials of the size threads OpenMP gave, which may be fewer than team) */
#ifdef _OPENMP
#pragma omp barrier
#endif
        const int64_t j0 = N * tid / size / 16 * 16;
        const int64_t j1 = tid == size - 1 ? N : N * (tid + 1) / size / 16 * 16;
        /* the integer path's sums are in units of the rows' int8 codes */
        finish_columns(part, size, Np, (const float*)(packed + scale_off),
                       qcodes ? kept.qscale : NULL, bias, y, ldy, j0, j1);
    }
    return nnz;
}
"""
)


def _vnni_permute() -> str:
    """The four byte-permute index vectors of the integer path (see the C text)."""
    lines = []
    for c in range(4):
        idx = [32 * r + 8 * c + j % 8 for j in range(16) for r in range(4)]
        lines.append("    {" + ", ".join(map(str, idx)) + "},")
    return "\n".join(lines)


def render(spec: PackedLinearSpec) -> str:
    """The C source of ``spec``; its entry point is the function named ``spec.name``."""
    from ...ops.quant import INT4_GROUP

    return _TEMPLATE.substitute(
        prelude=PRELUDE,
        element_helpers=ELEMENT_HELPERS,
        selection=SELECTION,
        name=spec.name,
        format=spec.format,
        format_id=_FORMAT_IDS[spec.format],
        chunk=FORMATS[spec.format],
        group=INT4_GROUP,
        dtype_name=SUPPORTED_DTYPES[spec.dtype],
        rows=spec.rows,
        rows_per_pass=spec.rows_per_pass,
        panel_row=PANEL_ROW_BYTES,
        panel_cols=PANEL_ROW_BYTES * FORMATS[spec.format] // 8,
        prefetch=int(spec.prefetch),
        vnni_permute=_vnni_permute(),
        elem_is_bf16=int(spec.dtype == torch.bfloat16),
        tail_cases="\n".join(
            f"    case {r}: fold_rows(acc, rows + i, vals + i * ROWS, {r}, rows + i1, nr_after, "
            "panel, cols); break;" for r in range(1, spec.rows_per_pass)),
    )
