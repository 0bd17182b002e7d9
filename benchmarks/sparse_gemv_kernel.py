"""A CPU sparse GEMV on pre-sparsified activations, kept for ``benchmarks/cpu_decode.py`` only.

No pass emits this kernel (the backend's decode path fuses the selection into the product:
``qsparse::cpu_topk_linear``); it lives here so the GEMV table of ``benchmarks/RESULTS.md``
can be re-measured with the same kernel. Registered as ``torch.ops.qsparse_bench.cpu_sparse_gemv``
(with a fake and an autograd formula, as it was when it was part of the package).

Template:

The C source of the activation-sparse GEMV, rendered per specialisation.

One specialisation fixes the element type (fp32 or bf16), the number of tokens ``T`` (1..8) and
the two tiling parameters, so every loop over tokens and over the rows of a pass has a
compile-time trip count that the compiler unrolls and keeps in registers.

The kernel computes ``y[t, :] = bias + sum_k x[t, k] * wt[k, :]`` with ``wt = W^T`` stored
K-major (``[in_features, out_features]``): a feature ``k`` that is zero in every token is skipped,
and skipping it skips one contiguous row of ``wt``; that is where the speed-up of a memory-bound
decode step comes from. Accumulation is fp32 whatever the element type.

Op:

Decode-time activation-sparse GEMV on the CPU: ``qsparse::cpu_sparse_gemv``.

``y = x @ weight_t + bias`` where ``weight_t = W^T`` is stored K-major (``[in_features,
out_features]``, prepared once with :func:`prepare_weight`) and ``x`` is a top-K-sparsified
activation. A feature that is zero in every row of a (≤ 8-row) chunk of ``x`` skips one whole
contiguous row of ``weight_t``, so at sparsity ``s`` a memory-bound decode step reads about
``1 - s`` of the weight bytes.

Numerics: fp32 accumulation for fp32 and bf16; bf16 outputs are rounded once from fp32 (round to
nearest even), as the reference :func:`sparse_gemv_reference` does. The one deliberate difference
from a dense product: a skipped feature contributes nothing even if its weight row holds inf or
NaN (a dense product would give ``0 * inf = NaN``).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import string
from collections.abc import Callable

import torch

from qsparse_compile.codegen.cpu.c_common import ELEMENT_HELPERS, PRELUDE, SUPPORTED_DTYPES
from qsparse_compile.codegen.cpu.compiler import load_entry_point
from qsparse_compile.codegen.gemv_operands import check_gemv_operands

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


_OP = "qsparse_bench.cpu_sparse_gemv"


def default_spec(dtype: torch.dtype, tokens: int) -> GemvSpec:
    """The tiling used for ``tokens`` rows of ``dtype``, chosen from measurements on AVX2 CPUs.

    Measured on a 2-core EPYC (32 KiB L1d, 512 KiB L2), cold caches, 4096-11008 features:

    * 8 weight rows per sweep of the accumulator beat 2 and 4 (fewer accumulator loads and
      stores per weight byte) and 16 (more streams than the prefetchers follow well).
    * Wider tiles win: each row of ``W^T`` is then read in one long contiguous run per thread
      (a whole 8-22 KiB slice for one token) instead of many short ones. Up to 8192 floats the
      accumulator still fits L1; with several tokens a 64 KiB accumulator in L2 still beats
      cutting every row into short runs (8 tokens: 3.0 ms with 16384 floats against 8.4 ms
      with 4096, at 4096x4096 fp32).
    * ``acc_skew`` (16 floats between the tokens' accumulator rows) removes 4 KiB aliasing
      between them: 2.5 ms against 4.2 ms at 4 tokens.
    """
    if tokens <= 2:
        return GemvSpec(dtype, tokens, rows_per_pass=8, tile_floats=8192)
    return GemvSpec(dtype, tokens, rows_per_pass=8, tile_floats=16384)


_ARGTYPES = [
    ctypes.c_void_p,  # x
    ctypes.c_int64,  # x_stride_t
    ctypes.c_int64,  # x_stride_k
    ctypes.c_int64,  # K
    ctypes.c_void_p,  # wt
    ctypes.c_int64,  # ldw
    ctypes.c_int64,  # N
    ctypes.c_void_p,  # bias (NULL for none)
    ctypes.c_void_p,  # y
    ctypes.c_int64,  # ldy
    ctypes.c_int64,  # nthreads
]


@functools.cache
def _kernel(spec: GemvSpec) -> Callable[..., int]:
    """The compiled entry point of ``spec`` (built at first use, then from the disk cache)."""
    return load_entry_point(spec.name, render(spec), _ARGTYPES)


#: (dtype, tokens) -> compiled entry point; a plain dict so a call costs one look-up.
_KERNELS: dict[tuple[torch.dtype, int], Callable[..., int]] = {}


def _kernel_for(dtype: torch.dtype, tokens: int) -> Callable[..., int]:
    fn = _KERNELS[(dtype, tokens)] = _kernel(default_spec(dtype, tokens))
    return fn


def _check(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None) -> None:
    check_gemv_operands(_OP, x, weight_t, bias, SUPPORTED_DTYPES, "prepare_weight")


def prepare_weight(weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Lay out a linear layer's weight for the kernel, once: ``W^T`` contiguous, K-major.

    Args:
        weight: ``[out_features, in_features]``, as stored by ``torch.nn.Linear``.
        dtype: element type for the kernel (``torch.float32`` or ``torch.bfloat16``); default
            ``weight.dtype``.

    Returns:
        A detached ``[in_features, out_features]`` contiguous tensor: the row of feature ``k``
        is one contiguous run, which is what a zeroed activation lets the kernel skip.
    """
    dtype = weight.dtype if dtype is None else dtype
    if dtype not in SUPPORTED_DTYPES:
        allowed = ", ".join(str(d) for d in SUPPORTED_DTYPES)
        raise TypeError(f"prepare_weight: dtype {dtype} is not supported; allowed: {allowed}")
    if weight.dim() != 2:
        raise ValueError(
            f"prepare_weight: expected a 2-D weight [out_features, in_features], "
            f"got shape {tuple(weight.shape)}"
        )
    return weight.detach().to(dtype=dtype, device="cpu").t().contiguous()


def sparse_gemv(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    bias: torch.Tensor | None = None,
    num_threads: int | None = None,
) -> torch.Tensor:
    """Run the compiled kernel directly (no dispatcher): ``x @ weight_t + bias``.

    This is the implementation behind ``torch.ops.qsparse_bench.cpu_sparse_gemv``; call the op in
    models (it is traceable and differentiable) and this function only where the few
    microseconds of dispatch matter, as in benchmarks.

    Args:
        x: ``[..., K]`` CPU activations, any strides; rows are processed in chunks of up to
            ``MAX_TOKENS``, and within a chunk a feature is skipped only if it is zero in
            every row.
        weight_t: ``[K, N]`` CPU weights (``W^T``) with contiguous rows (any row stride).
        bias: ``[N]`` or ``None``.
        num_threads: the most threads to use; default ``torch.get_num_threads()``.

    Returns:
        ``[..., N]`` tensor of ``x.dtype``.
    """
    _check(x, weight_t, bias)
    for label, t in (("x", x), ("weight_t", weight_t), ("bias", bias)):
        if t is not None and not t.is_cpu:
            raise ValueError(f"{_OP}: {label} must be on the CPU, got device {t.device}")
    K, N = weight_t.shape
    if N > 1 and weight_t.stride(1) != 1:
        # correct but slow: the kernel streams rows, so it needs them contiguous
        weight_t = weight_t.contiguous()
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    x2 = x if x.dim() == 2 else x.reshape(-1, K)
    M = x2.shape[0]
    out = torch.empty((M, N), dtype=x.dtype)
    if M and N:
        threads = torch.get_num_threads() if num_threads is None else num_threads
        ldw = weight_t.stride(0) if K > 1 else N
        sx_t, sx_k = x2.stride()
        elem = x2.element_size()
        x_ptr, y_ptr, wt_ptr = x2.data_ptr(), out.data_ptr(), weight_t.data_ptr()
        b_ptr = None if bias is None else bias.data_ptr()
        for start in range(0, M, MAX_TOKENS):
            rows = min(MAX_TOKENS, M - start)
            kernel = _KERNELS.get((x.dtype, rows)) or _kernel_for(x.dtype, rows)
            status = kernel(
                x_ptr + start * sx_t * elem, sx_t, sx_k, K,
                wt_ptr, ldw, N, b_ptr,
                y_ptr + start * N * elem, N, threads,
            )  # fmt: skip
            if status < 0:
                raise MemoryError(f"{_OP}: could not allocate index buffers for K={K}")
    return out if x.dim() == 2 else out.reshape(*x.shape[:-1], N)


def sparse_gemv_reference(
    x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """The pure-PyTorch meaning of the op: ``x @ weight_t + bias`` in fp32, then cast."""
    y = x.float() @ weight_t.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


@torch.library.custom_op("qsparse_bench::cpu_sparse_gemv", mutates_args=(), device_types="cpu")
def cpu_sparse_gemv(
    x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``x @ weight_t + bias``, skipping the rows of ``weight_t`` of zeroed activations.

    ``x`` is ``[..., in_features]``, ``weight_t`` is ``W^T`` (``[in_features, out_features]``,
    from :func:`prepare_weight`), ``bias`` is ``[out_features]`` or ``None``; all fp32 or all
    bf16. fp32 accumulation; the result has ``x.dtype``.
    """
    return sparse_gemv(x, weight_t, bias)


@cpu_sparse_gemv.register_fake
def _(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    _check(x, weight_t, bias)
    return x.new_empty((*x.shape[:-1], weight_t.shape[1]))


def _setup_context(ctx, inputs, output) -> None:
    x, weight_t, bias = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight_t)


def _backward(ctx, grad: torch.Tensor):
    x, weight_t = ctx.saved_tensors
    grad_x = grad_w = grad_b = None
    flat = grad.reshape(-1, grad.shape[-1])
    if ctx.needs_input_grad[0]:
        grad_x = grad @ weight_t.t()
    if ctx.needs_input_grad[1]:
        grad_w = x.reshape(-1, x.shape[-1]).t() @ flat
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_b = flat.sum(0)
    return grad_x, grad_w, grad_b


cpu_sparse_gemv.register_autograd(_backward, setup_context=_setup_context)
