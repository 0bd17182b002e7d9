"""C text the CPU kernel templates share: headers, the SIMD switch, the element type.

Both kernels (:mod:`.sparse_gemv_template`, :mod:`.topk_linear_template`) are rendered for fp32
or bf16 elements with fp32 arithmetic; the conversions here are the exact ones (bf16 -> fp32 by
a shift, fp32 -> bf16 rounding to nearest even with NaN canonicalised as torch does), so both
kernels round exactly like the reference.
"""

from __future__ import annotations

import torch

#: Element types the kernels are rendered for, and their C spelling.
SUPPORTED_DTYPES: dict[torch.dtype, str] = {torch.float32: "fp32", torch.bfloat16: "bf16"}

#: Headers and ``QS_SIMD`` (1 where AVX2 + FMA are available): the top of every kernel.
PRELUDE = r"""#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define QS_SIMD 1
#else
#define QS_SIMD 0  /* portable C: the scalar tail loops do all the work */
#endif
"""

#: ``elem_t`` for ``ELEM_IS_BF16`` (defined by the kernel before this text), ``to_f32``,
#: ``from_f32`` and, under ``QS_SIMD``, ``load8`` (8 elements widened to an fp32 vector).
ELEMENT_HELPERS = r"""#if ELEM_IS_BF16
typedef uint16_t elem_t;
#else
typedef float elem_t;
#endif

static inline float to_f32(elem_t v) {
#if ELEM_IS_BF16
    union { uint32_t u; float f; } c;
    c.u = (uint32_t)v << 16;  /* bf16 is the top half of an fp32: exact */
    return c.f;
#else
    return v;
#endif
}

static inline elem_t from_f32(float f) {
#if ELEM_IS_BF16
    union { uint32_t u; float f; } c;
    c.f = f;
    /* NaN maps to the canonical quiet NaN, as torch's own float -> bfloat16 conversion does. */
    if ((c.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)0x7fc0;
    c.u += 0x7fffu + ((c.u >> 16) & 1u);  /* round to nearest, ties to even */
    return (uint16_t)(c.u >> 16);
#else
    return f;
#endif
}

#if QS_SIMD
static inline __m256 load8(const elem_t* p) {
#if ELEM_IS_BF16
    /* widen 8 bf16 to 8 fp32 in-register: zero-extend to 32 bits, shift into the high half */
    __m128i h = _mm_loadu_si128((const __m128i*)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
#else
    return _mm256_loadu_ps(p);
#endif
}
#endif
"""
