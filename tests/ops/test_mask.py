"""``qsparse::topk_mask`` and ``qsparse::block_mask`` (DESIGN.md points 1-3).

The ops select by threshold over the float bit pattern; the reference sorts. The property tests
check the rule itself (exact count, magnitude order, lower-index tie-break, NaN first) without
either algorithm, and the reference tests check the two algorithms agree bit for bit.
"""

from __future__ import annotations

import math

import pytest
import torch
from assertions import assert_identical, assert_topk_rows, raises_naming
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import DTYPES, block_cases, dtype_id, topk_cases
from torch.library import opcheck

import qsparse_compile  # noqa: F401  (registers torch.ops.qsparse)
from qsparse_compile import reference

qsparse = torch.ops.qsparse
NAN, INF = math.nan, math.inf

dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)

# --- opcheck ---------------------------------------------------------------------------------

LAYOUTS = {
    "rows": lambda dtype: torch.randn(5, 8, dtype=dtype),
    "3d": lambda dtype: torch.randn(2, 3, 8, dtype=dtype),
    "transposed": lambda dtype: torch.randn(8, 5, dtype=dtype).t(),
    "requires_grad": lambda dtype: torch.randn(4, 8, dtype=dtype, requires_grad=True),
}


@dtypes
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_opcheck_topk_mask(dtype, layout):
    """Schema, fake kernel, autograd registration and AOT dispatch agree with the CPU kernel.

    The transposed layout matters: the fake kernel promises a contiguous mask, so the real one
    must produce one too, or a compiler would plan with wrong strides. The mask is not
    differentiable, but it must still be computable on a tensor that requires grad.
    """
    opcheck(qsparse.topk_mask, (LAYOUTS[layout](dtype), 3))


@dtypes
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_opcheck_block_mask(dtype, layout):
    opcheck(qsparse.block_mask, (LAYOUTS[layout](dtype), 2, 4))


# --- top-K: the rule, checked directly --------------------------------------------------------


@dtypes
@settings(max_examples=30)
@given(data=st.data())
def test_topk_mask_keeps_k_largest_ties_to_lower_index(dtype, data):
    """Exactly ``k = topk_count(D, s)`` per row; no dropped entry outranks a kept one."""
    x, k = data.draw(topk_cases(dtype))
    mask = qsparse.topk_mask(x, k)
    assert mask.dtype == torch.bool and mask.shape == x.shape
    assert_topk_rows(x, mask, k)


@pytest.mark.parametrize(
    ("row", "k", "expected"),
    [
        pytest.param([1, -1, 1, -1], 2, [1, 1, 0, 0], id="all-tied-lowest-indices"),
        pytest.param([0, 2, -2, 1, 2], 2, [0, 1, 1, 0, 0], id="tie-at-kth-magnitude"),
        pytest.param([0, 0, 0, 0], 3, [1, 1, 1, 0], id="zero-row"),
        pytest.param([1, NAN, 5, NAN], 1, [0, 1, 0, 0], id="nan-beats-numbers"),
        pytest.param([1, NAN, INF, -INF], 3, [0, 1, 1, 1], id="nan-then-inf"),
        pytest.param([-INF, 3, INF], 1, [1, 0, 0], id="inf-tie-lower-index"),
        pytest.param([-0.0, 0.0, -0.0], 1, [1, 0, 0], id="signed-zeros-tie"),
        pytest.param([7.0], 1, [1], id="D1"),
    ],
)
@dtypes
def test_topk_mask_examples(dtype, row, k, expected):
    """Worked examples of the tie-break and NaN rules, readable on their own."""
    x = torch.tensor([row, row], dtype=dtype)  # two identical rows: rows are independent
    mask = qsparse.topk_mask(x, k)
    assert mask.tolist() == [[bool(v) for v in expected]] * 2


def test_topk_mask_rows_are_independent():
    """A row's mask must not depend on other rows (no global threshold)."""
    x = torch.tensor([[100.0, 200.0, 300.0], [1.0, 3.0, 2.0]])
    assert qsparse.topk_mask(x, 1).tolist() == [[False, False, True], [False, True, False]]


# --- block N:M --------------------------------------------------------------------------------


@dtypes
@settings(max_examples=30)
@given(data=st.data())
def test_block_mask_keeps_n_of_every_m(dtype, data):
    """Every group of ``m`` consecutive entries keeps exactly ``n``, chosen by the top-K rule."""
    x, n, m = data.draw(block_cases(dtype))
    mask = qsparse.block_mask(x, n, m)
    assert mask.dtype == torch.bool and mask.shape == x.shape
    groups = x.shape[-1] // m
    per_group = mask.reshape(*x.shape[:-1], groups, m).sum(-1)
    assert bool((per_group == n).all()), per_group
    assert_topk_rows(x.reshape(-1, m), mask.reshape(-1, m), n)


@dtypes
def test_block_mask_2_of_4_example(dtype):
    x = torch.tensor([[4, -3, 2, 1, 0, 0, -1, 1]], dtype=dtype)
    assert qsparse.block_mask(x, 2, 4).int().tolist() == [[1, 1, 0, 0, 0, 0, 1, 1]]


# --- agreement with the reference -------------------------------------------------------------


@dtypes
@settings(max_examples=30)
@given(data=st.data())
def test_topk_mask_matches_reference(dtype, data):
    x, k = data.draw(topk_cases(dtype))
    assert_identical(qsparse.topk_mask(x, k), reference.topk_mask(x, k))


@dtypes
@settings(max_examples=30)
@given(data=st.data())
def test_block_mask_matches_reference(dtype, data):
    x, n, m = data.draw(block_cases(dtype))
    assert_identical(qsparse.block_mask(x, n, m), reference.block_mask(x, n, m))


# --- invalid arguments --------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, -1, 9], ids=lambda k: f"k{k}")
def test_topk_mask_rejects_k_out_of_range(k):
    with raises_naming(ValueError, "qsparse.topk_mask", f"k={k}", "[1, 8]"):
        qsparse.topk_mask(torch.randn(2, 8), k)


@pytest.mark.parametrize(
    ("n", "m", "parts"),
    [
        pytest.param(5, 4, ("block (n, m)", "1 <= n <= m", "(5, 4)"), id="n-above-m"),
        pytest.param(0, 4, ("block (n, m)", "1 <= n <= m", "(0, 4)"), id="n-zero"),
        pytest.param(2, 3, ("last dimension (8)", "multiple of m=3", "2:3"), id="D-not-multiple"),
    ],
)
def test_block_mask_rejects_bad_pattern(n, m, parts):
    with raises_naming(ValueError, "qsparse.block_mask", *parts):
        qsparse.block_mask(torch.randn(2, 8), n, m)


@pytest.mark.parametrize("int_dtype", [torch.int64, torch.int32, torch.bool], ids=str)
@pytest.mark.parametrize(
    ("name", "call"),
    [
        ("topk_mask", lambda x: qsparse.topk_mask(x, 2)),
        ("block_mask", lambda x: qsparse.block_mask(x, 2, 4)),
    ],
    ids=["topk_mask", "block_mask"],
)
def test_mask_rejects_non_float_input(int_dtype, name, call):
    dtype_name = str(int_dtype).removeprefix("torch.")
    with raises_naming(TypeError, f"qsparse.{name}", "'x'", dtype_name, "float32, bfloat16"):
        call(torch.ones(2, 8, dtype=int_dtype))
