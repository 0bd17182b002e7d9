"""Hypothesis strategies shared by the op, reference and functional tests.

The inputs are chosen to hit the cases where a top-K implementation typically goes wrong:
a last dimension of 1 or an odd width, one row or many rows, 3-D activations, magnitudes that
tie (values drawn from a tiny set), rows that are entirely zero, and the IEEE specials
(+-inf, NaN, -0.0). Shapes stay small so the whole suite runs in seconds on two cores.
"""

from __future__ import annotations

import math

import torch
from hypothesis import strategies as st

from qsparse_compile import topk_count

#: The dtypes every op must support with identical semantics.
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

#: Magnitudes that collide a lot: the tie-break rule decides most masks.
TIES = (-2.0, -1.0, 0.0, 1.0, 2.0)
SPECIALS = (math.nan, math.inf, -math.inf, -0.0)

MAX_D = 33


def dtype_id(dtype: torch.dtype) -> str:
    return DTYPE_IDS[dtype]


def leading_shapes(max_rows: int = 64) -> st.SearchStrategy[tuple[int, ...]]:
    """Shapes in front of the feature dimension: none (1-D), one row, many rows, or 3-D."""
    return st.one_of(
        st.just(()),
        st.just((1,)),
        st.tuples(st.integers(1, max_rows)),
        st.tuples(st.integers(1, 3), st.integers(1, 5)),
    )


def widths(multiple_of: int = 1, max_d: int = MAX_D) -> st.SearchStrategy[int]:
    """Feature widths D: 1 and odd widths included (unless a block size forces multiples)."""
    if multiple_of == 1:
        return st.one_of(st.just(1), st.integers(1, max_d))
    return st.integers(1, max(1, max_d // multiple_of)).map(lambda g: g * multiple_of)


#: How the bulk of a tensor's values is produced (from a drawn seed, which is much cheaper
#: than drawing hundreds of floats one by one and still reproducible and shrinkable).
PALETTES = ("ties", "normal", "wide", "mixed")


def _bulk_values(palette: str, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ties = torch.tensor(TIES)[torch.randint(len(TIES), (n,), generator=gen)]
    normal = torch.randn(n, generator=gen)
    # magnitudes spread over 2^-10 .. 2^10, both signs: exercises exponent bits of the key
    sign = torch.randint(2, (n,), generator=gen) * 2.0 - 1.0
    wide = sign * torch.exp2(torch.rand(n, generator=gen) * 20 - 10)
    if palette == "ties":
        return ties
    if palette == "normal":
        return normal
    if palette == "wide":
        return wide
    pick = torch.randint(3, (n,), generator=gen)
    return torch.where(pick == 0, ties, torch.where(pick == 1, normal, wide))


@st.composite
def activations(
    draw,
    dtype: torch.dtype,
    *,
    special: bool = True,
    multiple_of: int = 1,
    max_rows: int = 64,
) -> torch.Tensor:
    """A float tensor ``[..., D]`` in ``dtype``; some rows may be all zero.

    ``special=True`` plants a few +-inf, NaN and -0.0 at drawn positions; ``special=False``
    keeps every value finite (for norm and quantization-error properties, which are stated
    for finite inputs). Values are made in float32 and rounded once to ``dtype``; the tests use
    the rounded tensor, so that rounding is not a source of error.
    """
    lead = draw(leading_shapes(max_rows))
    d = draw(widths(multiple_of))
    rows = math.prod(lead)
    palette = draw(st.sampled_from(PALETTES))
    flat = _bulk_values(palette, rows * d, draw(st.integers(0, 2**32 - 1)))
    if special:
        planted = st.tuples(st.integers(0, rows * d - 1), st.sampled_from(SPECIALS))
        for index, value in draw(st.lists(planted, max_size=4)):
            flat[index] = value
    x = flat.reshape(rows, d)
    for r in draw(st.lists(st.integers(0, rows - 1), max_size=min(rows, 3))):
        x[r] = 0.0
    return x.reshape(*lead, d).to(dtype)


def sparsities() -> st.SearchStrategy[float]:
    """Sparsity in ``[0, 0.99]``, with the edges and the usual values drawn often."""
    return st.one_of(
        st.sampled_from((0.0, 0.25, 0.4, 0.5, 0.6, 0.99)),
        st.floats(0.0, 0.99, allow_nan=False),
    )


def block_patterns(max_m: int = 8) -> st.SearchStrategy[tuple[int, int]]:
    """``(n, m)`` with ``1 <= n <= m``: 1:1 (dense), 2:4, 4:8, n == m, and odd ``m``."""
    return st.one_of(
        st.sampled_from(((2, 4), (1, 4), (4, 8), (1, 1), (3, 3))),
        st.integers(1, max_m).flatmap(lambda m: st.tuples(st.integers(1, m), st.just(m))),
    )


@st.composite
def topk_cases(draw, dtype: torch.dtype, *, special: bool = True):
    """``(x, k)`` with ``k = topk_count(D, s)`` for a drawn sparsity ``s``."""
    x = draw(activations(dtype, special=special))
    return x, topk_count(x.shape[-1], draw(sparsities()))


@st.composite
def block_cases(draw, dtype: torch.dtype, *, special: bool = True):
    """``(x, n, m)`` with ``D`` a multiple of ``m``."""
    n, m = draw(block_patterns())
    x = draw(activations(dtype, special=special, multiple_of=m))
    return x, n, m


def upstream_like(x: torch.Tensor, seed: int) -> torch.Tensor:
    """A deterministic, non-trivial upstream gradient with ``x``'s shape and dtype."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(x.shape, generator=g).to(x.dtype)


def _divisors(d: int) -> list[int]:
    return [m for m in range(1, d + 1) if d % m == 0]


@st.composite
def kernel_selections(draw, D: int) -> tuple[int, int, int]:
    """``(k, n, m)`` as the fused decode kernels take it: top-K with any ``k`` in ``[1, D]``
    (``m == 0``; ``k == D`` keeps every entry), or block ``n:m`` with ``m`` dividing ``D``."""
    if draw(st.booleans()):
        return draw(st.integers(1, D)), 0, 0
    m = draw(st.sampled_from(_divisors(D)))
    return 0, draw(st.integers(1, m)), m
