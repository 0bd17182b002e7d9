"""The eager reference (``qsparse_compile.reference``) against the written semantics.

Every op and kernel is compared with this module, so it is checked here on its own: worked
examples computed by hand from DESIGN.md, and the top-K rule as a property. Nothing here calls
the ``qsparse`` ops.
"""

from __future__ import annotations

import math

import pytest
import torch
from assertions import assert_identical, assert_topk_rows
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import DTYPES, block_cases, dtype_id, topk_cases

from qsparse_compile import QSparseConfig, reference, topk_count

NAN, INF = math.nan, math.inf

dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)


# --- masks ---------------------------------------------------------------------------------------


@dtypes
@settings(max_examples=30)
@given(data=st.data())
def test_topk_mask_rule(dtype, data):
    """Exactly ``k`` per row, largest ``|x|`` first, NaN above all, ties to the lower index."""
    x, k = data.draw(topk_cases(dtype))
    assert_topk_rows(x, reference.topk_mask(x, k), k)


@dtypes
@settings(max_examples=30)
@given(data=st.data())
def test_block_mask_rule(dtype, data):
    x, n, m = data.draw(block_cases(dtype))
    mask = reference.block_mask(x, n, m)
    assert_topk_rows(x.reshape(-1, m), mask.reshape(-1, m), n)


@pytest.mark.parametrize(
    ("row", "k", "expected"),
    [
        pytest.param([2, -2, 2, 1], 2, [1, 1, 0, 0], id="ties-lower-index"),
        pytest.param([1, NAN, INF, NAN], 2, [0, 1, 0, 1], id="nans-first"),
        pytest.param([0, 0, 0], 2, [1, 1, 0], id="zero-row"),
    ],
)
@dtypes
def test_topk_mask_examples(dtype, row, k, expected):
    mask = reference.topk_mask(torch.tensor([row], dtype=dtype), k)
    assert mask.int().tolist() == [expected]


# --- sparsify, rescale and the straight-through backward --------------------------------------


def test_topk_sparsify_example_forward_and_backward():
    x = torch.tensor([[3.0, -4.0, 0.0, 1.0]], requires_grad=True)
    out = reference.topk_sparsify(x, 2)
    assert_identical(out, torch.tensor([[3.0, -4.0, 0.0, 0.0]]))
    out.backward(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    assert_identical(x.grad, torch.tensor([[1.0, 2.0, 3.0, 4.0]]))  # straight through


def test_topk_sparsify_masked_gradient_ablation():
    x = torch.tensor([[3.0, -4.0, 0.0, 1.0]], requires_grad=True)
    reference.topk_sparsify(x, 2, ste=False).backward(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    assert_identical(x.grad, torch.tensor([[1.0, 2.0, 0.0, 0.0]]))


@pytest.mark.parametrize("ste", [True, False], ids=["ste", "masked-grad"])
def test_l2_rescale_example(ste):
    """Row [3, -4, 0, 1], k = 1: ||x|| = sqrt(26), kept norm 4, factor sqrt(26)/4."""
    x = torch.tensor([[3.0, -4.0, 0.0, 1.0]], requires_grad=True)
    factor = math.sqrt(26) / 4
    out = reference.topk_sparsify(x, 1, rescale="l2", ste=ste)
    torch.testing.assert_close(out, torch.tensor([[0.0, -4.0 * factor, 0.0, 0.0]]))
    out.backward(torch.ones(1, 4))
    expected = torch.full((1, 4), factor) if ste else torch.tensor([[0.0, factor, 0.0, 0.0]])
    torch.testing.assert_close(x.grad, expected)


def test_l2_rescale_factor_of_zero_row_is_one():
    x = torch.zeros(2, 5)
    mask = reference.topk_mask(x, 2)
    assert_identical(reference.l2_rescale_factor(x, mask), torch.ones(2, 1))


def test_block_sparsify_example():
    x = torch.tensor([[1.0, -3.0, 2.0, 0.5, 4.0, 4.0, -4.0, 1.0]])
    expected = torch.tensor([[0.0, -3.0, 2.0, 0.0, 4.0, 4.0, 0.0, 0.0]])
    assert_identical(reference.block_sparsify(x, 2, 4), expected)


# --- quantizers ----------------------------------------------------------------------------------


@dtypes
def test_int8_fake_quant_example(dtype):
    """g = 4: 1 -> round(31.75) = 32, -2 -> -63.5 -> -64 (half to even), 4 -> 127."""
    x = torch.tensor([[4.0, 1.0, -2.0, 0.0]], dtype=dtype, requires_grad=True)
    out = reference.int8_fake_quant(x)
    expected = (torch.tensor([[127.0, 32.0, -64.0, 0.0]]) * 4.0 / 127.0).to(dtype)
    assert_identical(out, expected)
    out.backward(torch.ones_like(out))
    assert_identical(x.grad, torch.ones_like(x))


@dtypes
def test_ternary_fake_quant_example(dtype):
    """mean|W| = 1.5: 0.5 / 1.5 rounds to 0, 2 / 1.5 to 1, -3 / 1.5 clamps to -1."""
    w = torch.tensor([[0.5, 2.0], [-3.0, 0.5]], dtype=dtype, requires_grad=True)
    out = reference.ternary_fake_quant(w)
    assert_identical(out, torch.tensor([[0.0, 1.5], [-1.5, 0.0]], dtype=dtype))
    out.backward(torch.full_like(out, 2.0))
    assert_identical(w.grad, torch.full_like(w, 2.0))


# --- sparsify_input and projection -------------------------------------------------------------


def test_sparsify_input_dense_plan_returns_input():
    config = QSparseConfig(sparsity=0.5)
    x = torch.randn(2, 8)
    assert reference.sparsify_input(x, config.plan_for("lm_head"), config) is x


def test_sparsify_input_quantizes_after_masking():
    """Mask on the unquantized x, then int8 on the kept values: ``Q(X) * M`` (point 5)."""
    config = QSparseConfig(sparsity=0.5, quant="int8")
    x = torch.randn(3, 10)
    out = reference.sparsify_input(x, config.plan_for("mlp.up_proj"), config)
    k = topk_count(10, 0.5)
    expected = reference.int8_fake_quant(reference.topk_sparsify(x, k))
    assert_identical(out, expected)
    assert bool((out[~reference.topk_mask(x, k)] == 0).all())


def test_sparsify_input_block_plan():
    config = QSparseConfig(method="block", block=(2, 4))
    x = torch.randn(3, 8)
    out = reference.sparsify_input(x, config.plan_for("mlp.up_proj"), config)
    assert_identical(out, reference.block_sparsify(x, 2, 4))


def test_projection_bitnet_uses_ternary_weights_and_int8_activations():
    config = QSparseConfig(sparsity=0.25, quant="bitnet")
    plan = config.plan_for("mlp.up_proj")
    x, w, b = torch.randn(3, 8), torch.randn(5, 8), torch.randn(5)
    expected = torch.nn.functional.linear(
        reference.int8_fake_quant(reference.topk_sparsify(x, topk_count(8, 0.25))),
        reference.ternary_fake_quant(w),
        b,
    )
    assert_identical(reference.projection(x, w, b, plan, config), expected)


def test_projection_bitnet_at_sparsity_zero_quantizes_without_masking():
    config = QSparseConfig(sparsity=0, quant="bitnet")
    plan = config.plan_for("mlp.up_proj")
    x, w, b = torch.randn(3, 8), torch.randn(5, 8), torch.randn(5)
    expected = torch.nn.functional.linear(reference.int8_fake_quant(x),
                                          reference.ternary_fake_quant(w), b)
    assert_identical(reference.projection(x, w, b, plan, config), expected)


def test_projection_dense_plan_is_plain_linear():
    config = QSparseConfig(sparsity=0.5, quant="bitnet")
    x, w = torch.randn(3, 8), torch.randn(5, 8)
    out = reference.projection(x, w, None, config.plan_for("lm_head"), config)
    assert_identical(out, torch.nn.functional.linear(x, w))
