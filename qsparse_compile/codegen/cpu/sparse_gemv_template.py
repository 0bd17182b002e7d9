"""The C source of the activation-sparse GEMV, rendered per specialisation.

One specialisation fixes the element type (fp32 or bf16), the number of tokens ``T`` (1..8) and
the two tiling parameters, so every loop over tokens and over the rows of a pass has a
compile-time trip count that the compiler unrolls and keeps in registers.

The kernel computes ``y[t, :] = bias + sum_k x[t, k] * wt[k, :]`` with ``wt = W^T`` stored
K-major (``[in_features, out_features]``): a feature ``k`` that is zero in every token is skipped,
and skipping it skips one contiguous row of ``wt``; that is where the speed-up of a memory-bound
decode step comes from. Accumulation is fp32 whatever the element type.
"""

from __future__ import annotations

import dataclasses
import string

import torch

from .c_common import ELEMENT_HELPERS, PRELUDE, SUPPORTED_DTYPES

#: Largest number of tokens (rows of ``x``) one kernel call handles; more rows are processed in
#: chunks. Beyond ~8 independent top-K masks the union covers almost every feature anyway.
MAX_TOKENS = 8


@dataclasses.dataclass(frozen=True)
class GemvSpec:
    """One specialisation of the kernel.

    Attributes:
        dtype: element type of ``x``, ``wt``, ``bias`` and ``y`` (``torch.float32`` or
            ``torch.bfloat16``); accumulation is always fp32.
        tokens: number of rows of ``x`` the kernel processes together (1..``MAX_TOKENS``); their
            masks are united, so one pass over the weights serves all of them.
        rows_per_pass: nonzero weight rows folded into the accumulator tile per sweep; more rows
            per sweep means fewer loads and stores of the accumulator per weight byte.
        tile_floats: fp32 accumulator budget per thread (all tokens together); the tile's
            width in columns is ``tile_floats // tokens``, so it sets how long the contiguous
            run read from each weight row is, while the accumulator stays in L1/L2.
        acc_skew: extra floats between two tokens' accumulator rows, so that the rows do not
            sit a multiple of 4 KiB apart (loads and stores that alias modulo 4 KiB stall).
    """

    dtype: torch.dtype
    tokens: int
    rows_per_pass: int
    tile_floats: int
    acc_skew: int = 16

    def __post_init__(self) -> None:
        if self.dtype not in SUPPORTED_DTYPES:
            allowed = ", ".join(str(d) for d in SUPPORTED_DTYPES)
            raise TypeError(
                f"sparse GEMV kernel: dtype {self.dtype} is not supported; allowed: {allowed}"
            )
        if not 1 <= self.tokens <= MAX_TOKENS:
            raise ValueError(
                f"sparse GEMV kernel: tokens must be in [1, {MAX_TOKENS}], got {self.tokens}"
            )
        if not 1 <= self.rows_per_pass <= 16:
            raise ValueError(
                f"sparse GEMV kernel: rows_per_pass must be in [1, 16], got {self.rows_per_pass}"
            )
        if self.acc_skew < 0 or self.acc_skew % 8:
            raise ValueError(
                f"sparse GEMV kernel: acc_skew must be a non-negative multiple of 8 (the vector "
                f"width, so accumulator rows stay 32-byte aligned), got {self.acc_skew}"
            )
        if self.tile_floats < 8 * self.tokens:
            raise ValueError(
                f"sparse GEMV kernel: tile_floats must be at least 8 * tokens = {8 * self.tokens}, "
                f"got {self.tile_floats}"
            )

    @property
    def name(self) -> str:
        """A C identifier that names this specialisation (also the exported symbol)."""
        return (
            f"qs_sparse_gemv_{SUPPORTED_DTYPES[self.dtype]}_t{self.tokens}"
            f"_r{self.rows_per_pass}_f{self.tile_floats}_s{self.acc_skew}"
        )


_TEMPLATE = string.Template(
    r"""/* qsparse cpu_sparse_gemv: ${dtype_name}, ${tokens} token(s), ${rows_per_pass} rows per
 * pass, ${tile_floats}-float accumulator tile. Rendered from a template; do not edit.
 *
 * y[t, n] = bias[n] + sum_k x[t, k] * wt[k, n]   for t < TOKENS, n < N
 *
 * Only the rows k of wt with x[t, k] != 0 for some t are read. Threads split the OUTPUT columns,
 * so each owns its slice of y and needs no atomics or reductions.
 */
${prelude}
#define TOKENS ${tokens}
#define ROWS_PER_PASS ${rows_per_pass}
#define ELEM_IS_BF16 ${elem_is_bf16}
/* Columns per accumulator tile and token: a multiple of the 8-float vector width. */
#define TILE_COLS ((${tile_floats} / TOKENS) / 8 * 8)
/* Floats between two tokens' accumulator rows: the skew keeps them off 4 KiB multiples. */
#define ACC_STRIDE (TILE_COLS + ${acc_skew})
/* Below this many weight bytes to read, forking the thread team costs more than it saves. */
#define MIN_BYTES_PER_THREAD (64 * 1024)

${element_helpers}
/* Fold NR weight rows into the accumulator tile acc[TOKENS][ACC_STRIDE] (columns c0 .. c0+w).
 * Each weight vector is loaded (and widened) once and used for every token; the accumulator is
 * loaded and stored once per NR rows, not once per row. */
static inline __attribute__((always_inline)) void fold_rows(
    float* restrict acc, const int32_t* restrict rows, const float* restrict vals, const int nr,
    const elem_t* restrict wt, int64_t ldw, int64_t c0, int64_t w) {
    const elem_t* src[ROWS_PER_PASS];
    for (int r = 0; r < nr; ++r) src[r] = wt + (int64_t)rows[r] * ldw + c0;
    int64_t j = 0;
#if QS_SIMD
    __m256 v[ROWS_PER_PASS * TOKENS];
    for (int r = 0; r < nr; ++r)
        for (int t = 0; t < TOKENS; ++t) v[r * TOKENS + t] = _mm256_set1_ps(vals[r * TOKENS + t]);
    for (; j + 8 <= w; j += 8) {
        __m256 wv[ROWS_PER_PASS];
        for (int r = 0; r < nr; ++r) wv[r] = load8(src[r] + j);
        for (int t = 0; t < TOKENS; ++t) {
            float* a_ptr = acc + t * ACC_STRIDE + j;
            __m256 a = _mm256_load_ps(a_ptr);
            for (int r = 0; r < nr; ++r) a = _mm256_fmadd_ps(v[r * TOKENS + t], wv[r], a);
            _mm256_store_ps(a_ptr, a);
        }
    }
#endif
    for (; j < w; ++j)
        for (int r = 0; r < nr; ++r) {
            const float wj = to_f32(src[r][j]);
            for (int t = 0; t < TOKENS; ++t)
                acc[t * ACC_STRIDE + j] += vals[r * TOKENS + t] * wj;
        }
}

/* One thread's share: output columns [n0, n1), in tiles small enough to stay in L1. */
static void gemv_columns(const int32_t* rows, const float* vals, int64_t nnz,
                         const elem_t* wt, int64_t ldw, const elem_t* bias,
                         elem_t* y, int64_t ldy, int64_t n0, int64_t n1) {
    float acc[TOKENS * ACC_STRIDE] __attribute__((aligned(64)));
    const int64_t width = n1 - n0;
    if (width <= 0) return;
    /* equal tiles (rounded to the vector width) rather than full tiles and a ragged last one */
    const int64_t ntiles = (width + TILE_COLS - 1) / TILE_COLS;
    const int64_t tile = ((width + ntiles - 1) / ntiles + 7) / 8 * 8;
    for (int64_t c0 = n0; c0 < n1; c0 += tile) {
        const int64_t w = (n1 - c0) < tile ? (n1 - c0) : tile;
        for (int t = 0; t < TOKENS; ++t)
            for (int64_t j = 0; j < w; ++j)
                acc[t * ACC_STRIDE + j] = bias ? to_f32(bias[c0 + j]) : 0.0f;
        int64_t i = 0;
        for (; i + ROWS_PER_PASS <= nnz; i += ROWS_PER_PASS)
            fold_rows(acc, rows + i, vals + i * TOKENS, ROWS_PER_PASS, wt, ldw, c0, w);
        for (; i < nnz; ++i) fold_rows(acc, rows + i, vals + i * TOKENS, 1, wt, ldw, c0, w);
        for (int t = 0; t < TOKENS; ++t)
            for (int64_t j = 0; j < w; ++j)
                y[t * ldy + c0 + j] = from_f32(acc[t * ACC_STRIDE + j]);
    }
}

/* Entry point. Returns the number of weight rows read (features nonzero in some token), or -1
 * if the index buffers could not be allocated.
 *   x      TOKENS x K activations, element (t, k) at x[t * x_stride_t + k * x_stride_k]
 *   wt     K x N weights (W^T), row k at wt + k * ldw, contiguous within a row
 *   bias   N values or NULL
 *   y      TOKENS x N output, row t at y + t * ldy, contiguous within a row
 *   nthreads  the most threads to use (the caller passes torch.get_num_threads())
 */
int64_t ${name}(const elem_t* x, int64_t x_stride_t, int64_t x_stride_k, int64_t K,
                 const elem_t* wt, int64_t ldw, int64_t N, const elem_t* bias,
                 elem_t* y, int64_t ldy, int64_t nthreads) {
    /* Gather first: the list of rows to read and their values, packed token-minor so a pass
     * reads its values from one cache line. This is O(K * TOKENS) against O(nnz * N) for the
     * product, so it runs on one thread. */
    int32_t* rows = (int32_t*)malloc(sizeof(int32_t) * (size_t)(K + 1));
    float* vals = (float*)malloc(sizeof(float) * (size_t)(K + 1) * TOKENS);
    if (!rows || !vals) {
        free(rows);
        free(vals);
        return -1;
    }
    int64_t nnz = 0;
    for (int64_t k = 0; k < K; ++k) {
        float v[TOKENS];
        int any = 0;
        for (int t = 0; t < TOKENS; ++t) {
            v[t] = to_f32(x[t * x_stride_t + k * x_stride_k]);
            any |= (v[t] != 0.0f);  /* NaN != 0: a NaN activation is kept and propagates */
        }
        if (any) {
            rows[nnz] = (int32_t)k;
            memcpy(vals + nnz * TOKENS, v, sizeof(v));
            ++nnz;
        }
    }

    /* Threads own whole cache lines of each weight row and of y, never sharing one. */
    const int64_t grain = 64 / (int64_t)sizeof(elem_t);
    const int64_t chunks = (N + grain - 1) / grain;
    int64_t team = nthreads < chunks ? nthreads : chunks;
    const int64_t bytes = nnz * N * (int64_t)sizeof(elem_t);
    if (team > bytes / MIN_BYTES_PER_THREAD) team = bytes / MIN_BYTES_PER_THREAD;
    if (team < 1) team = 1;
#ifdef _OPENMP
#pragma omp parallel num_threads((int)team) if (team > 1)
#endif
    {
#ifdef _OPENMP
        const int64_t tid = omp_get_thread_num(), size = omp_get_num_threads();
#else
        const int64_t tid = 0, size = 1;
#endif
        const int64_t first = chunks * tid / size, last = chunks * (tid + 1) / size;
        const int64_t n1 = last * grain < N ? last * grain : N;
        gemv_columns(rows, vals, nnz, wt, ldw, bias, y, ldy, first * grain, n1);
    }
    free(rows);
    free(vals);
    return nnz;
}
"""
)


def render(spec: GemvSpec) -> str:
    """The C source of ``spec``; its entry point is the function named ``spec.name``."""
    return _TEMPLATE.substitute(
        prelude=PRELUDE,
        element_helpers=ELEMENT_HELPERS,
        name=spec.name,
        dtype_name=SUPPORTED_DTYPES[spec.dtype],
        tokens=spec.tokens,
        rows_per_pass=spec.rows_per_pass,
        tile_floats=spec.tile_floats,
        elem_is_bf16=int(spec.dtype == torch.bfloat16),
        acc_skew=spec.acc_skew,
    )
