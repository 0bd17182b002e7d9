"""Top-K and N:M row kernels against the eager reference, on the test device.

Inputs are built on ``triton_cases.DEVICE`` (CPU tensors in Triton's interpreter, or CUDA
tensors with compiled kernels); the references run on the CPU (``cpu_reference``).

Masks must equal the reference's bit for bit (ties to the lower index, NaN first); kept values
take no arithmetic and must be bit-identical too; the int8 fake-quant without rescale does the
reference's exact fp32 operations and must be bit-identical; with the L2 rescale the factor's
sums run in another order, so results may sit one rounding of the dtype away.
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton", reason="triton is not installed: the Triton kernel tests need it")

import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from triton_cases import (  # noqa: E402
    DTYPES,
    assert_bits_equal,
    assert_close_ulps,
    cpu_reference,
    dtype_id,
    on_device,
    randn,
    rows_of,
    widths,
)

from qsparse_compile import reference, topk_count  # noqa: E402
from qsparse_compile.codegen.triton import row_sparsify as kernels  # noqa: E402

dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
SPARSITIES = st.sampled_from((0.0, 0.25, 0.4, 0.5, 0.6, 0.8, 0.99))
FLAGS = [(True, False), (False, True), (True, True)]
FLAG_IDS = ["rescale", "quant", "rescale+quant"]


def _expected_arithmetic(x, out_ref, rescale, quant):
    """Tolerance for outputs that went through rescale and/or quant (see module docstring)."""
    if quant and rescale:
        # a rescaled value one rounding off can move q by one step of gamma / 127
        step = out_ref.float().abs().amax(-1, keepdim=True) / 127.0
        return dict(ulps=2.0, atol=step.double() * 1.01)
    if rescale:
        return dict(ulps=4.0 if x.dtype == torch.float32 else 1.0)
    return None  # quant alone: bit-identical


def _check_values(out, ref, x, rescale, quant):
    tol = _expected_arithmetic(x, ref, rescale, quant)
    if tol is None:
        assert_bits_equal(out, ref)
    else:
        assert_close_ulps(out, ref, **tol)


# --- top-K -----------------------------------------------------------------------------------


@dtypes
@settings(max_examples=10)
@given(data=st.data())
def test_topk_mask_and_values_match_reference(dtype, data):
    d = data.draw(widths(), label="d")
    x = data.draw(rows_of(dtype, d), label="x")
    k = topk_count(d, data.draw(SPARSITIES, label="s"))
    assert torch.equal(kernels.topk_mask(x, k), cpu_reference(reference.topk_mask, x, k))
    assert_bits_equal(kernels.topk_sparsify(x, k), cpu_reference(reference.topk_sparsify, x, k))


@dtypes
@pytest.mark.parametrize("rescale,quant", FLAGS, ids=FLAG_IDS)
@settings(max_examples=4)
@given(data=st.data())
def test_topk_rescale_quant_match_reference(dtype, rescale, quant, data):
    d = data.draw(widths(), label="d")
    x = data.draw(rows_of(dtype, d, special=False), label="x")
    k = topk_count(d, data.draw(SPARSITIES, label="s"))
    out = kernels.topk_sparsify(x, k, rescale, quant)
    ref = cpu_reference(kernels.topk_sparsify_reference, x, k, rescale, quant)
    _check_values(out, ref, x, rescale, quant)


@settings(max_examples=5)
@given(data=st.data())
def test_topk_multi_tile_rows(data):
    """Rows wider than a tile: one pass per key bit, tie-break carried across tiles.

    (The interpreter makes this path slow: one example per dtype-ish, small rows.)
    """
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    d = data.draw(st.sampled_from((7, 13, 24)), label="d")
    x = data.draw(rows_of(dtype, d, max_rows=2), label="x")
    k = topk_count(d, data.draw(SPARSITIES, label="s"))
    chunk = data.draw(st.sampled_from((4, 8)), label="chunk")
    assert torch.equal(kernels.topk_mask(x, k, chunk=chunk),
                       cpu_reference(reference.topk_mask, x, k))
    assert_bits_equal(kernels.topk_sparsify(x, k, chunk=chunk),
                      cpu_reference(reference.topk_sparsify, x, k))


#: Multi-tile statistics passes: every flag once (bf16) and both flags for the other dtypes.
MULTI_TILE_FLAGS = [
    pytest.param(torch.bfloat16, True, False, id="bf16-rescale"),
    pytest.param(torch.bfloat16, False, True, id="bf16-quant"),
    pytest.param(torch.bfloat16, True, True, id="bf16-rescale+quant"),
    pytest.param(torch.float16, True, True, id="fp16-rescale+quant"),
    pytest.param(torch.float32, True, True, id="fp32-rescale+quant"),
]


@pytest.mark.parametrize("dtype,rescale,quant", MULTI_TILE_FLAGS)
def test_topk_multi_tile_rescale_quant(dtype, rescale, quant):
    g = torch.Generator().manual_seed(7)
    x = randn(2, 19, dtype=dtype, generator=g)
    x[1, ::2] = 1.0  # ties across tile borders
    out = kernels.topk_sparsify(x, 9, rescale, quant, chunk=8)
    ref = cpu_reference(kernels.topk_sparsify_reference, x, 9, rescale, quant)
    _check_values(out, ref, x, rescale, quant)


@dtypes
def test_topk_ties_nan_inf_and_signed_zero(dtype):
    nan, inf = float("nan"), float("inf")
    x = on_device(torch.tensor([
        [1.0, -1.0, 1.0, -1.0, 1.0, 0.0, -0.0],   # ties: lower index wins
        [nan, 2.0, nan, -inf, inf, nan, 1.0],      # NaN outranks inf; NaNs tie
        [-0.0, 0.0, -0.0, 0.0, -0.0, 0.0, -0.0],   # all zero: first k, -0.0 kept as -0.0
    ]).to(dtype))
    for k in (1, 3, 4, 7):
        assert torch.equal(kernels.topk_mask(x, k), cpu_reference(reference.topk_mask, x, k))
        assert_bits_equal(kernels.topk_sparsify(x, k),
                          cpu_reference(reference.topk_sparsify, x, k))


@dtypes
def test_topk_layouts(dtype):
    """Leading dimensions, strided rows, a transposed (non-unit stride) input and no rows."""
    g = torch.Generator().manual_seed(3)
    x3 = randn(2, 3, 10, dtype=dtype, generator=g)
    assert torch.equal(kernels.topk_mask(x3, 4), cpu_reference(reference.topk_mask, x3, 4))
    strided = randn(4, 20, dtype=dtype, generator=g)[:, :10]
    assert_bits_equal(kernels.topk_sparsify(strided, 3),
                      cpu_reference(reference.topk_sparsify, strided, 3))
    xt = randn(10, 3, dtype=dtype, generator=g).t()
    out = kernels.topk_sparsify(xt, 5)
    assert out.is_contiguous()
    assert_bits_equal(out, cpu_reference(reference.topk_sparsify, xt, 5))
    empty = on_device(torch.empty(0, 10, dtype=dtype))
    assert kernels.topk_sparsify(empty, 5).shape == (0, 10)
    one = on_device(torch.tensor([-3.0], dtype=dtype))
    assert_bits_equal(kernels.topk_sparsify(one, 1), one)


def test_topk_rejects_bad_arguments():
    x = randn(2, 8)
    with pytest.raises(ValueError, match="k=9"):
        kernels.topk_sparsify(x, 9)
    with pytest.raises(ValueError, match="k=0"):
        kernels.topk_mask(x, 0)
    with pytest.raises(TypeError, match="float64"):
        kernels.topk_sparsify(x.double(), 2)


# --- N:M -------------------------------------------------------------------------------------


PATTERNS = st.one_of(
    st.sampled_from(((2, 4), (1, 4), (4, 8), (3, 3), (1, 1), (16, 32), (5, 12))),
    st.integers(1, 10).flatmap(lambda m: st.tuples(st.integers(1, m), st.just(m))),
)


@dtypes
@settings(max_examples=10)
@given(data=st.data())
def test_block_mask_and_values_match_reference(dtype, data):
    n, m = data.draw(PATTERNS, label="n:m")
    d = data.draw(widths(multiple_of=m, max_d=64), label="d")
    x = data.draw(rows_of(dtype, d), label="x")
    select = data.draw(st.sampled_from((None, "bisect")), label="select")
    if n == m:
        select = None
    mask = kernels.block_mask(x, n, m, select=select)
    assert torch.equal(mask, cpu_reference(reference.block_mask, x, n, m))
    out = kernels.block_sparsify(x, n, m, select=select)
    assert_bits_equal(out, cpu_reference(reference.block_sparsify, x, n, m))


@dtypes
@pytest.mark.parametrize("rescale,quant", FLAGS, ids=FLAG_IDS)
@settings(max_examples=4)
@given(data=st.data())
def test_block_rescale_quant_match_reference(dtype, rescale, quant, data):
    n, m = data.draw(st.sampled_from(((2, 4), (3, 8), (16, 32), (2, 3))), label="n:m")
    d = data.draw(widths(multiple_of=m, max_d=64), label="d")
    x = data.draw(rows_of(dtype, d, special=False), label="x")
    out = kernels.block_sparsify(x, n, m, rescale, quant)
    ref = cpu_reference(kernels.block_sparsify_reference, x, n, m, rescale, quant)
    _check_values(out, ref, x, rescale, quant)


@pytest.mark.parametrize("dtype,select", [
    pytest.param(torch.bfloat16, "rank", id="bf16-rank"),
    pytest.param(torch.float16, "bisect", id="fp16-bisect"),
    pytest.param(torch.float32, "bisect", id="fp32-bisect"),
])
def test_block_multi_tile_rows(dtype, select):
    """Fewer groups per tile than the row has: statistics passes, then the write pass."""
    g = torch.Generator().manual_seed(11)
    x = randn(3, 24, dtype=dtype, generator=g)
    x[1] = 1.0
    x[2, 5] = float("nan")
    assert torch.equal(kernels.block_mask(x, 2, 4, chunk=2, select=select),
                       cpu_reference(reference.block_mask, x, 2, 4))
    finite = x[:2]
    out = kernels.block_sparsify(finite, 2, 4, True, True, chunk=2, select=select)
    ref = cpu_reference(kernels.block_sparsify_reference, finite, 2, 4, True, True)
    _check_values(out, ref, finite, True, True)


def test_block_rejects_bad_arguments():
    x = randn(2, 8)
    with pytest.raises(ValueError, match="multiple of m=3"):
        kernels.block_sparsify(x, 1, 3)
    with pytest.raises(ValueError, match=r"\(5, 4\)"):
        kernels.block_mask(x, 5, 4)


def test_block_empty_rows_and_width():
    assert kernels.block_sparsify(randn(3, 0), 2, 4).shape == (3, 0)
    assert kernels.block_mask(randn(0, 8), 2, 4).shape == (0, 8)
