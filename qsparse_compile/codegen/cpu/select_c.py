"""C text of the row selection the CPU decode kernels share: top-K / N:M, rescale, int8, union.

Both fused decode kernels (:mod:`.topk_linear_template` over fp32/bf16 weights,
:mod:`.packed_linear_template` over packed int8/int4/ternary weights) begin the same way, and
this text is that beginning, rendered into each:

1. **Select** (per row, one thread): the ``k`` largest ``|x|`` (top-K) or the ``n`` largest of
   every ``m`` consecutive entries (block N:M), exactly as DESIGN.md says. ``|x|`` is compared
   as an integer key (the magnitude's bit pattern, every NaN mapped to one key above +inf), so
   the k-th largest key is found by a radix select: an 11-bit histogram over the key's top bits
   narrows the candidates to one bin, two 10-bit passes (or a sort once few are left) finish it.
   A final pass in index order keeps keys above the threshold and the first ``take`` keys equal
   to it, which is the lower-index tie-break. Blocks of up to 32 entries rank each entry against
   its group directly (``m^2`` compares that vectorise), longer blocks use the radix select.
   ``k == D`` keeps the whole row (a projection whose input is not sparsified).
2. **Rescale** (optional): multiply the kept values by ``||x|| / ||x_kept||`` (1 when the kept
   norm is 0 or NaN, as the reference's ``where(kept > 0, ...)`` does); bf16 rows are rounded to
   bf16 after this, as the reference rounds the sparsified activation before the product.
3. **Quantize** (optional, ``quant="int8"``/``"bitnet"``): per row ``g = max(max|x|, 1e-5)``,
   ``q = clamp(round(127 x / g), -128, 127)``, value ``q g / 127``, the same float operations in
   the same order as the reference (a NaN in the row makes the whole row NaN, as there);
   the integer codes and ``g / 127`` are kept as well, for a kernel that sums integer products.
4. **Union**: the features some row kept, in index order, with the rows' values packed
   row-minor; only those weight rows are read by the GEMV that follows.

The text needs ``ROWS``, ``elem_t``, ``to_f32`` and ``round_elem`` defined before it.
"""

from __future__ import annotations

#: Blocks of at most this many entries are selected by direct ranking (``m^2`` compares).
RANK_BLOCK_MAX = 32

SELECTION = r"""
#define RANK_BLOCK_MAX """ + str(RANK_BLOCK_MAX) + r"""
/* Candidates left after a radix pass at or below this count are sorted instead. */
#define SMALL_SELECT 48
/* The magnitude key of every NaN: one above +inf (0x7f800000), so NaNs outrank all numbers
 * and tie with each other. */
#define NAN_KEY 0x7f800001u

static inline uint32_t magnitude_key(float v) {
    union { float f; uint32_t u; } c;
    c.f = v;
    const uint32_t a = c.u & 0x7fffffffu;
    return a > 0x7f800000u ? NAN_KEY : a;
}

/* ---- scratch: per calling thread, grown on demand, never shrunk ----------------------------
 * ctypes releases the GIL, so two Python threads may run a kernel at once: the buffers are
 * thread-local. Growing them only when a larger shape arrives keeps malloc (and, for big
 * buffers, mmap + page faults) out of the steady decode loop. */
typedef struct {
    void* ptr;
    size_t size;
} buffer_t;

static _Thread_local buffer_t scratch_keys, scratch_cand, scratch_xs, scratch_rows,
    scratch_vals, scratch_codes, scratch_part, scratch_extra;

static void* grow(buffer_t* b, size_t bytes) {
    if (bytes > b->size) {
        void* p = NULL;
        bytes = (bytes + 63) / 64 * 64;
        if (posix_memalign(&p, 64, bytes) != 0) return NULL;
        free(b->ptr);
        b->ptr = p;
        b->size = bytes;
    }
    return b->ptr;
}

typedef struct {
    uint32_t key;  /* the k-th largest key */
    int64_t take;  /* how many entries equal to it are kept, the lowest indices first */
} threshold_t;

static void sort_desc(uint32_t* a, int64_t n) {
    for (int64_t i = 1; i < n; ++i) {
        const uint32_t v = a[i];
        int64_t j = i - 1;
        while (j >= 0 && a[j] < v) {
            a[j + 1] = a[j];
            --j;
        }
        a[j + 1] = v;
    }
}

/* The k-th largest of keys[0, n), 1 <= k <= n, by radix select on 11 + 10 + 10 bits (keys are
 * at most 31 bits wide: the sign is cleared). cand holds n keys of scratch. */
static threshold_t kth_largest(const uint32_t* keys, int64_t n, int64_t k, uint32_t* cand) {
    static const int shift[3] = {20, 10, 0};
    static const uint32_t bins[3] = {2048, 1024, 1024};
    int32_t hist[2048];
    const uint32_t* src = keys;
    for (int level = 0; level < 3; ++level) {
        if (n <= SMALL_SELECT) {
            if (src != cand) memcpy(cand, src, sizeof(uint32_t) * (size_t)n);
            sort_desc(cand, n);
            threshold_t t = {cand[k - 1], 0};
            for (int64_t i = 0; i < k; ++i) t.take += (cand[i] == t.key);
            return t;
        }
        const int s = shift[level];
        const uint32_t mask = bins[level] - 1;
        uint32_t hi = 0;  /* the highest bin in use: the scan down starts there */
        memset(hist, 0, sizeof(int32_t) * bins[level]);
        for (int64_t i = 0; i < n; ++i) {
            const uint32_t d = (src[i] >> s) & mask;
            hist[d]++;
            hi = d > hi ? d : hi;
        }
        /* the bin b holding the k-th largest: fewer than k above it, at least k from it up */
        int64_t above = 0;
        uint32_t b = hi;
        while (above + hist[b] < k) above += hist[b--];
        k -= above;
        int64_t m = 0;
        for (int64_t i = 0; i < n; ++i)
            if (((src[i] >> s) & mask) == b) cand[m++] = src[i];
        src = cand;
        n = m;
    }
    /* all 31 bits fixed: every candidate equals the threshold */
    threshold_t t = {cand[0], k};
    return t;
}

/* Keep the k largest |v| of v[0, n) (in place: dropped entries become 0). */
static void select_topk(float* v, int64_t n, int64_t k, uint32_t* keys, uint32_t* cand) {
    if (k >= n) return;
    for (int64_t i = 0; i < n; ++i) keys[i] = magnitude_key(v[i]);
    const threshold_t t = kth_largest(keys, n, k, cand);
    int64_t taken = 0;
    for (int64_t i = 0; i < n; ++i) {
        const uint32_t key = keys[i];
        int keep = key > t.key;
        if (key == t.key && taken < t.take) {
            keep = 1;
            ++taken;
        }
        if (!keep) v[i] = 0.0f;
    }
}

/* Keep the nk largest |v| of a group of m <= RANK_BLOCK_MAX entries: an entry's rank is the
 * number of entries that beat it (a larger key, or an equal key at a lower index). */
static void select_block_rank(float* v, int64_t m, int64_t nk, uint32_t* keys) {
    for (int64_t i = 0; i < m; ++i) keys[i] = magnitude_key(v[i]);
    for (int64_t i = 0; i < m; ++i) {
        const uint32_t ki = keys[i];
        int32_t rank = 0;
        for (int64_t j = 0; j < m; ++j) rank += (keys[j] > ki) | ((keys[j] == ki) & (j < i));
        if (rank >= nk) v[i] = 0.0f;
    }
}

/* Per-row int8 quantize-dequantize of the kept values (DESIGN.md point 5); codes[i] (if not
 * NULL) receives each integer q (0 where the row is NaN), the return value is g / 127. */
static float quantize_int8(float* v, int64_t D, int8_t* codes) {
    float amax = 0.0f;
    int nan = 0;
    for (int64_t i = 0; i < D; ++i) {
        const float a = __builtin_fabsf(v[i]);
        nan |= a != a;
        amax = a > amax ? a : amax;
    }
    const float g = nan ? __builtin_nanf("") : (amax > 1e-5f ? amax : 1e-5f);
    for (int64_t i = 0; i < D; ++i) {
        float q = __builtin_nearbyintf(127.0f * v[i] / g);  /* half to even, as torch.round */
        q = q < -128.0f ? -128.0f : (q > 127.0f ? 127.0f : q);  /* NaN stays NaN */
        v[i] = round_elem(q * g / 127.0f);
        if (codes) codes[i] = q == q ? (int8_t)q : 0;
    }
    return g / 127.0f;
}

/* The selected rows' kept features: rows[0, nnz) in index order, vals[i * ROWS + t] row t's
 * value of feature rows[i]. */
typedef struct {
    int64_t nnz;       /* features kept by some row; -1: scratch could not be allocated */
    const int32_t* rows;
    const float* vals;
    /* quant only: the integer codes q (codes[i * ROWS + t], vals = q * qscale[t] up to the
     * rounding of that product) and each row's g / 127; NULL / unset otherwise */
    const int8_t* codes;
    float qscale[ROWS];
} kept_t;

/* Steps 1-4 for ROWS rows of x (element (t, i) at x[t * x_stride_t + i * x_stride_k]). */
static kept_t select_rows(const elem_t* x, int64_t x_stride_t, int64_t x_stride_k, int64_t D,
                          int64_t k, int64_t n, int64_t m, int64_t rescale, int64_t quant) {
    kept_t out = {-1, NULL, NULL, NULL, {0}};
    uint32_t* keys = (uint32_t*)grow(&scratch_keys, sizeof(uint32_t) * (size_t)(D + 1));
    uint32_t* cand = (uint32_t*)grow(&scratch_cand, sizeof(uint32_t) * (size_t)(D + 1));
    float* xs = (float*)grow(&scratch_xs, sizeof(float) * (size_t)(D + 1) * ROWS);
    int32_t* rows = (int32_t*)grow(&scratch_rows, sizeof(int32_t) * (size_t)(D + 1));
    float* vals = (float*)grow(&scratch_vals, sizeof(float) * (size_t)(D + 1) * ROWS);
    /* quant: the rows' codes (D per row), then the kept features' codes (row-minor) */
    int8_t* qx = quant ? (int8_t*)grow(&scratch_codes, (size_t)(D + 1) * ROWS * 2) : NULL;
    if (!keys || !cand || !xs || !rows || !vals || (quant && !qx)) return out;
    int8_t* qkept = quant ? qx + (int64_t)(D + 1) * ROWS : NULL;

    for (int t = 0; t < ROWS; ++t) {
        float* v = xs + (int64_t)t * D;
        const elem_t* xr = x + t * x_stride_t;
        for (int64_t i = 0; i < D; ++i) v[i] = to_f32(xr[i * x_stride_k]);
        /* the full norm only where it is used: a serial fp64 sum is ~4 cycles per entry */
        double full = 0.0;
        if (rescale)
            for (int64_t i = 0; i < D; ++i) full += (double)v[i] * v[i];
        if (m == 0) {
            select_topk(v, D, k, keys, cand);
        } else if (m <= RANK_BLOCK_MAX) {
            for (int64_t g = 0; g < D; g += m) select_block_rank(v + g, m, n, keys);
        } else {
            for (int64_t g = 0; g < D; g += m) select_topk(v + g, m, n, keys, cand);
        }
        if (rescale) {
            double kept = 0.0;
            for (int64_t i = 0; i < D; ++i) kept += (double)v[i] * v[i];
            /* both norms are rounded to fp32 before dividing, as the reference computes them */
            const float full_f = (float)__builtin_sqrt(full);
            const float kept_f = (float)__builtin_sqrt(kept);
            /* NaN kept norm: the comparison is false and the factor is 1, as in the reference */
            const float factor = kept_f > 0.0f ? full_f / kept_f : 1.0f;
            for (int64_t i = 0; i < D; ++i) v[i] = round_elem(v[i] * factor);
        }
        if (quant) out.qscale[t] = quantize_int8(v, D, qx + (int64_t)t * D);
    }

    /* compaction without a branch per feature (whether one is kept is a coin flip at 50%):
     * every feature is written at the next free slot, which only a kept one advances (the
     * buffers hold D + 1 entries, and the slot is never past i) */
    int64_t nnz = 0;
    for (int64_t i = 0; i < D; ++i) {
        int any = 0;
        for (int t = 0; t < ROWS; ++t) {
            const float vt = xs[(int64_t)t * D + i];
            vals[nnz * ROWS + t] = vt;
            any |= (vt != 0.0f);  /* NaN != 0: a kept NaN is read and propagates */
        }
        rows[nnz] = (int32_t)i;
        if (quant)
            for (int t = 0; t < ROWS; ++t) qkept[nnz * ROWS + t] = qx[(int64_t)t * D + i];
        nnz += any;
    }
    out.nnz = nnz;
    out.rows = rows;
    out.vals = vals;
    out.codes = qkept;
    return out;
}
"""
