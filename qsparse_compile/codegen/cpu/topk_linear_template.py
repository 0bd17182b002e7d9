"""The C source of the fused "select, then sparse GEMV" decode kernel, rendered per specialisation.

One call computes ``y = sparsify(x) @ wt + bias`` for 1..8 dense activation rows ``x``:

1. **Select**, rescale and unite the rows' kept features, as :mod:`.select_c` says (the C text
   every CPU decode kernel shares).
2. **Sparse GEMV** over the union of the rows' kept features: each kept feature reads one
   contiguous row of ``wt = W^T`` (``[in_features, out_features]``, K-major); a feature no row
   kept is never read, which is where the speed-up of a memory-bound decode step comes from.
   Accumulation is fp32. Threads split the *kept rows* (each thread streams whole weight rows,
   which the hardware prefetchers follow far better than the half rows a column split gives on
   the short rows of small models), each into its own fp32 partial sum, added up at the end.

A specialisation fixes the element type and the number of rows, so the loops over rows have
compile-time trip counts that the compiler unrolls into registers; ``k``, ``n:m`` and
``rescale`` are run-time arguments (one library serves every projection of a model).
"""

from __future__ import annotations

import dataclasses
import string

import torch

from .c_common import ELEMENT_HELPERS, PRELUDE, SUPPORTED_DTYPES
from .select_c import SELECTION

#: Most activation rows one call handles: the decode batch. Beyond ~8 independent top-K masks
#: the union covers almost every feature, and the op falls back to a dense product anyway.
MAX_ROWS = 8


@dataclasses.dataclass(frozen=True)
class TopkLinearSpec:
    """One specialisation of the kernel.

    Attributes:
        dtype: element type of ``x``, ``wt``, ``bias`` and ``y`` (``torch.float32`` or
            ``torch.bfloat16``); selection keys and accumulation are always fp32.
        rows: activation rows per call (1..``MAX_ROWS``); their masks are united, so one pass
            over the weights serves all of them.
        rows_per_pass: kept weight rows folded into the accumulator per sweep: the accumulator
            vector is loaded and stored once per this many weight rows.
        tile_floats: fp32 accumulator budget per thread (all rows together), so the partial sums
            of one column tile stay in L1 while weight rows stream past them.
        prefetch: software-prefetch the next sweep's weight rows while folding the current one.
            Kept rows are scattered, so each is a new stream for the hardware prefetcher, which
            needs a few misses to lock on; on rows of a few KiB that start-up is a large share.
    """

    dtype: torch.dtype
    rows: int
    rows_per_pass: int = 8
    tile_floats: int = 4096
    prefetch: bool = True

    def __post_init__(self) -> None:
        if self.dtype not in SUPPORTED_DTYPES:
            allowed = ", ".join(str(d) for d in SUPPORTED_DTYPES)
            raise TypeError(
                f"top-K linear kernel: dtype {self.dtype} is not supported; allowed: {allowed}"
            )
        if not 1 <= self.rows <= MAX_ROWS:
            raise ValueError(
                f"top-K linear kernel: rows must be in [1, {MAX_ROWS}], got {self.rows}"
            )
        if not 1 <= self.rows_per_pass <= 16:
            raise ValueError(
                f"top-K linear kernel: rows_per_pass must be in [1, 16], got {self.rows_per_pass}"
            )
        if self.tile_floats < 8 * self.rows:
            raise ValueError(
                f"top-K linear kernel: tile_floats must be at least 8 * rows = {8 * self.rows}, "
                f"got {self.tile_floats}"
            )

    @property
    def name(self) -> str:
        """A C identifier that names this specialisation (also the exported symbol)."""
        return (
            f"qs_topk_linear_{SUPPORTED_DTYPES[self.dtype]}_t{self.rows}"
            f"_r{self.rows_per_pass}_f{self.tile_floats}_p{int(self.prefetch)}"
        )


_TEMPLATE = string.Template(
    r"""/* qsparse cpu_topk_linear: ${dtype_name}, ${rows} row(s), ${rows_per_pass} weight rows per
 * sweep, ${tile_floats}-float accumulator tile, prefetch ${prefetch}. Rendered from a template;
 * do not edit.
 *
 * y[t, :] = bias + sum_k sparsify(x[t, :])[k] * wt[k, :]      for t < ROWS
 */
${prelude}
#define ROWS ${rows}
#define ROWS_PER_PASS ${rows_per_pass}
#define ELEM_IS_BF16 ${elem_is_bf16}
#define PREFETCH ${prefetch}
/* Columns per accumulator tile and row: a multiple of the 8-float vector width. */
#define TILE_COLS ((${tile_floats} / ROWS) / 8 * 8)
/* Below this many weight bytes per thread, waking a second thread costs more than it saves. */
#define MIN_BYTES_PER_THREAD (96 * 1024)
/* Software prefetches fill L2, not L1: the weight rows come from DRAM, and fetching them into
 * L1 ties up its few miss buffers, which the loads in flight need (measured on SmolLM2's
 * shapes, 2 threads of an AVX-512 EPYC: -18% for the projections, -12% for the head). */
#define PF_HINT _MM_HINT_T1
${element_helpers}
/* The value the reference's sparsified activation holds: rounded to the element type. */
static inline float round_elem(float f) { return to_f32(from_f32(f)); }

${selection}

/* ---- sparse GEMV ------------------------------------------------------------------------- */

/* Fold nr weight rows into acc[ROWS][TILE_COLS] (columns c0 .. c0 + w). Each weight vector is
 * loaded (and widened) once and used for every activation row; the accumulator is loaded and
 * stored once per nr weight rows. next (nr_next entries) are the rows of the following sweep,
 * prefetched at the same columns so their first lines arrive while this sweep computes. */
static inline __attribute__((always_inline)) void fold_rows(
    float* restrict acc, const int32_t* restrict rows, const float* restrict vals, const int nr,
    const int32_t* restrict next, const int nr_next,
    const elem_t* restrict wt, int64_t ldw, int64_t c0, int64_t w) {
    const elem_t* src[ROWS_PER_PASS];
    for (int r = 0; r < nr; ++r) src[r] = wt + (int64_t)rows[r] * ldw + c0;
#if PREFETCH
    const elem_t* pre[ROWS_PER_PASS];
    for (int r = 0; r < nr_next; ++r) pre[r] = wt + (int64_t)next[r] * ldw + c0;
#else
    (void)next;
    (void)nr_next;
#endif
    int64_t j = 0;
#if QS_SIMD
    __m256 v[ROWS_PER_PASS * ROWS];
    for (int r = 0; r < nr; ++r)
        for (int t = 0; t < ROWS; ++t) v[r * ROWS + t] = _mm256_set1_ps(vals[r * ROWS + t]);
    for (; j + 8 <= w; j += 8) {
#if PREFETCH
        /* one prefetch per 64-byte line of every next row */
        if ((j * (int64_t)sizeof(elem_t)) % 64 == 0)
            for (int r = 0; r < nr_next; ++r) _mm_prefetch((const char*)(pre[r] + j), PF_HINT);
#endif
        __m256 wv[ROWS_PER_PASS];
        for (int r = 0; r < nr; ++r) wv[r] = load8(src[r] + j);
        for (int t = 0; t < ROWS; ++t) {
            float* a_ptr = acc + t * TILE_COLS + j;
            __m256 a = _mm256_load_ps(a_ptr);
            for (int r = 0; r < nr; ++r) a = _mm256_fmadd_ps(v[r * ROWS + t], wv[r], a);
            _mm256_store_ps(a_ptr, a);
        }
    }
#endif
    for (; j < w; ++j)
        for (int r = 0; r < nr; ++r) {
            const float wj = to_f32(src[r][j]);
            for (int t = 0; t < ROWS; ++t) acc[t * TILE_COLS + j] += vals[r * ROWS + t] * wj;
        }
}

/* One thread's share: the kept rows [i0, i1) over all N columns, tile by tile, summed into
 * part[ROWS][N] (fp32). */
static void gemv_rows(const int32_t* rows, const float* vals, int64_t i0, int64_t i1,
                      const elem_t* wt, int64_t ldw, int64_t N, float* part) {
    float acc[ROWS * TILE_COLS] __attribute__((aligned(64)));
    for (int64_t c0 = 0; c0 < N; c0 += TILE_COLS) {
        const int64_t w = (N - c0) < TILE_COLS ? (N - c0) : TILE_COLS;
        memset(acc, 0, sizeof(acc));
        int64_t i = i0;
        for (; i + ROWS_PER_PASS <= i1; i += ROWS_PER_PASS) {
            const int64_t left = i1 - (i + ROWS_PER_PASS);
            const int nr_next = left < ROWS_PER_PASS ? (int)left : ROWS_PER_PASS;
            fold_rows(acc, rows + i, vals + i * ROWS, ROWS_PER_PASS, rows + i + ROWS_PER_PASS,
                      nr_next, wt, ldw, c0, w);
        }
        for (; i < i1; ++i) fold_rows(acc, rows + i, vals + i * ROWS, 1, rows, 0, wt, ldw, c0, w);
        for (int t = 0; t < ROWS; ++t) memcpy(part + t * N + c0, acc + t * TILE_COLS,
                                              sizeof(float) * (size_t)w);
    }
}

/* y[t, j0:j1] = bias + the threads' partial sums, added in thread order: the result does not
 * depend on timing. The same operations in the same order as one loop per element, in blocks
 * of 256 columns so that each step is a vector loop. */
static void finish_columns(const float* restrict part, int64_t team, int64_t N,
                           const elem_t* restrict bias, elem_t* restrict y, int64_t ldy,
                           int64_t j0, int64_t j1) {
    float tmp[256] __attribute__((aligned(64)));
    for (int t = 0; t < ROWS; ++t)
        for (int64_t c = j0; c < j1; c += 256) {
            const int64_t w = j1 - c < 256 ? j1 - c : 256;
            if (bias)
                for (int64_t j = 0; j < w; ++j) tmp[j] = to_f32(bias[c + j]);
            else
                for (int64_t j = 0; j < w; ++j) tmp[j] = 0.0f;
            for (int64_t p = 0; p < team; ++p) {
                const float* src = part + (p * ROWS + t) * N + c;
                for (int64_t j = 0; j < w; ++j) tmp[j] += src[j];
            }
            elem_t* yt = y + t * ldy + c;
            for (int64_t j = 0; j < w; ++j) yt[j] = from_f32(tmp[j]);
        }
}

/* Entry point. Returns the number of weight rows read (features kept by some row), -1 if the
 * scratch buffers could not be allocated.
 *   x        ROWS x D activations, element (t, i) at x[t * x_stride_t + i * x_stride_k]
 *   k        top-K count (1 <= k <= D), used when m == 0
 *   n, m     block pattern (keep n of every m; 1 <= n <= m, m divides D) when m > 0
 *   rescale  nonzero: multiply each row's kept values by ||x|| / ||x_kept||
 *   wt       D x N weights (W^T), row i at wt + i * ldw, contiguous within a row
 *   bias     N values or NULL
 *   y        ROWS x N output, row t at y + t * ldy, contiguous within a row
 *   nthreads the most threads to use (the caller passes torch.get_num_threads())
 */
int64_t ${name}(const elem_t* x, int64_t x_stride_t, int64_t x_stride_k, int64_t D,
                 int64_t k, int64_t n, int64_t m, int64_t rescale,
                 const elem_t* wt, int64_t ldw, int64_t N, const elem_t* bias,
                 elem_t* y, int64_t ldy, int64_t nthreads) {
    /* 1. select (and rescale) each row, then unite the kept features */
    const kept_t kept = select_rows(x, x_stride_t, x_stride_k, D, k, n, m, rescale, 0);
    if (kept.nnz < 0) return -1;
    const int64_t nnz = kept.nnz;
    const int32_t* rows = kept.rows;
    const float* vals = kept.vals;

    /* 2a. threads split the kept rows; each sums into its own fp32 partial result */
    int64_t team = nthreads;
    const int64_t bytes = nnz * N * (int64_t)sizeof(elem_t);
    if (team > bytes / MIN_BYTES_PER_THREAD) team = bytes / MIN_BYTES_PER_THREAD;
    if (team > nnz / ROWS_PER_PASS) team = nnz / ROWS_PER_PASS;
    if (team < 1) team = 1;
    float* part = (float*)grow(&scratch_part, sizeof(float) * (size_t)(team * ROWS * N + 1));
    if (!part) return -1;
#ifdef _OPENMP
#pragma omp parallel num_threads((int)team) if (team > 1)
#endif
    {
#ifdef _OPENMP
        const int64_t tid = omp_get_thread_num(), size = omp_get_num_threads();
#else
        const int64_t tid = 0, size = 1;
#endif
        /* split on whole sweeps, so only the last share has a ragged tail */
        const int64_t sweeps = (nnz + ROWS_PER_PASS - 1) / ROWS_PER_PASS;
        int64_t i0 = sweeps * tid / size * ROWS_PER_PASS;
        int64_t i1 = sweeps * (tid + 1) / size * ROWS_PER_PASS;
        i0 = i0 < nnz ? i0 : nnz;
        i1 = i1 < nnz ? i1 : nnz;
        gemv_rows(rows, vals, i0, i1, wt, ldw, N, part + tid * ROWS * N);
        /* 2b. once every partial is there, each thread finishes its share of the columns
         * (the partials of the size threads OpenMP gave, which may be fewer than team) */
#ifdef _OPENMP
#pragma omp barrier
#endif
        const int64_t j0 = N * tid / size / 16 * 16;
        const int64_t j1 = tid == size - 1 ? N : N * (tid + 1) / size / 16 * 16;
        finish_columns(part, size, N, bias, y, ldy, j0, j1);
    }
    return nnz;
}
"""
)


def render(spec: TopkLinearSpec) -> str:
    """The C source of ``spec``; its entry point is the function named ``spec.name``."""
    return _TEMPLATE.substitute(
        prelude=PRELUDE,
        element_helpers=ELEMENT_HELPERS,
        name=spec.name,
        dtype_name=SUPPORTED_DTYPES[spec.dtype],
        rows=spec.rows,
        rows_per_pass=spec.rows_per_pass,
        tile_floats=spec.tile_floats,
        prefetch=int(spec.prefetch),
        elem_is_bf16=int(spec.dtype == torch.bfloat16),
        selection=SELECTION,
    )
