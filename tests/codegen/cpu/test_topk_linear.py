"""``qsparse::cpu_topk_linear`` (selection fused into the CPU sparse GEMV) against its reference.

The selection is checked through the output: with an identity weight the output *is* the
sparsified activation, so the kept set must equal the reference's exactly (ties, zeros, odd
widths, blocks). Random weights then check the product within the tolerance of an fp32 sum in
another order. Shapes are small and odd (D = 1, 3, 17, 40, 100: not multiples of the 8-float
vector) so every tail of the kernel runs; one larger case runs the two-thread split.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import kernel_selections

from qsparse_compile.codegen.cpu import (
    cpu_topk_linear,
    prepare_group_weight,
    topk_linear,
    topk_linear_reference,
)
from qsparse_compile.codegen.cpu.topk_linear_op import MAX_ROWS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
WIDTHS = [1, 3, 17, 40, 100]


def _activations(rows: int, D: int, dtype: torch.dtype, pattern: str,
                 g: torch.Generator) -> torch.Tensor:
    if pattern == "ties":  # few distinct magnitudes, both signs: ties everywhere
        values = torch.tensor([0.0, 0.5, -0.5, 1.0, -1.0, 2.0])
        return values[torch.randint(0, len(values), (rows, D), generator=g)].to(dtype)
    x = torch.randn(rows, D, generator=g)
    if pattern == "zeros":  # more zeros than dropped entries in many rows
        x = torch.where(torch.rand(rows, D, generator=g) < 0.6, 0.0, x)
    return x.to(dtype)


def _assert_close_to_reference(y: torch.Tensor, ref: torch.Tensor, xs_abs_w: torch.Tensor,
                               dtype: torch.dtype) -> None:
    """Error bound of an fp32 sum in another order, then one bf16 rounding (one ulp)."""
    err = (y.float() - ref.float()).abs()
    rtol = 2.0**-7 if dtype == torch.bfloat16 else 0.0
    bound = 2e-5 * xs_abs_w + rtol * ref.float().abs() + 1e-30
    assert bool((err <= bound).all()), f"max error {err.max().item()} exceeds the bound"


@settings(max_examples=60, deadline=None)
@given(data=st.data(), dtype=st.sampled_from(list(DTYPES)), D=st.sampled_from(WIDTHS),
       rows=st.integers(1, MAX_ROWS), pattern=st.sampled_from(["randn", "ties", "zeros"]),
       rescale=st.booleans(), seed=st.integers(0, 2**16))
def test_selection_matches_reference_through_identity_weight(data, dtype, D, rows, pattern,
                                                              rescale, seed):
    dt = DTYPES[dtype]
    k, n, m = data.draw(kernel_selections(D))
    x = _activations(rows, D, dt, pattern, torch.Generator().manual_seed(seed))
    eye = torch.eye(D, dtype=dt)
    y = cpu_topk_linear(x, k, n, m, rescale, eye, None, MAX_ROWS)
    ref = topk_linear_reference(x, k, n, m, rescale, eye, None)
    assert y.shape == ref.shape and y.dtype == dt
    # the kept set is exactly the reference's (a kept zero is invisible and irrelevant)
    assert torch.equal(y != 0, ref != 0)
    if not rescale:
        assert torch.equal(y, ref)  # kept values are exact; adding zeros is exact
    else:
        # the factor's norms are summed in another order: a few ulps
        torch.testing.assert_close(y, ref, rtol=1e-5 if dt == torch.float32 else 2**-7,
                                   atol=0.0)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), dtype=st.sampled_from(list(DTYPES)), D=st.sampled_from(WIDTHS),
       N=st.sampled_from([1, 5, 33]), rows=st.integers(1, MAX_ROWS),
       pattern=st.sampled_from(["randn", "ties", "zeros"]), rescale=st.booleans(),
       with_bias=st.booleans(), seed=st.integers(0, 2**16))
def test_product_matches_reference(data, dtype, D, N, rows, pattern, rescale, with_bias, seed):
    dt = DTYPES[dtype]
    k, n, m = data.draw(kernel_selections(D))
    g = torch.Generator().manual_seed(seed)
    x = _activations(rows, D, dt, pattern, g)
    weight_t = torch.randn(D, N, generator=g).to(dt)
    bias = torch.randn(N, generator=g).to(dt) if with_bias else None
    y = cpu_topk_linear(x, k, n, m, rescale, weight_t, bias, MAX_ROWS)
    ref = topk_linear_reference(x, k, n, m, rescale, weight_t, bias)
    scale = x.float().abs() @ weight_t.float().abs() * (4.0 if rescale else 1.0)
    if bias is not None:
        scale = scale + bias.float().abs()
    _assert_close_to_reference(y, ref, scale, dt)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("mode", ["topk", "block"])
def test_nan_is_kept_and_propagates(dtype, mode):
    """NaN outranks every number (as torch.topk has it): kept even with k = 1."""
    dt = DTYPES[dtype]
    x = torch.tensor([[1.0, -5.0, float("nan"), 2.0], [1.0, -5.0, 0.5, 2.0]], dtype=dt)
    k, n, m = (1, 0, 0) if mode == "topk" else (0, 1, 4)
    eye = torch.eye(4, dtype=dt)
    y = cpu_topk_linear(x, k, n, m, False, eye, None, MAX_ROWS)
    assert y[0].isnan().all()  # the kept NaN reaches every output of its row
    assert torch.equal(y[1], torch.tensor([0.0, -5.0, 0.0, 0.0], dtype=dt))
    ref = topk_linear_reference(x, k, n, m, False, eye, None)
    torch.testing.assert_close(y, ref, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_ties_go_to_the_lower_index(dtype):
    dt = DTYPES[dtype]
    x = torch.tensor([[1.0, -3.0, 3.0, 0.5, -3.0, 3.0]], dtype=dt)
    eye = torch.eye(6, dtype=dt)
    y = cpu_topk_linear(x, 2, 0, 0, False, eye, None, MAX_ROWS)
    assert torch.equal(y, torch.tensor([[0.0, -3.0, 3.0, 0.0, 0.0, 0.0]], dtype=dt))
    y = cpu_topk_linear(x, 0, 1, 3, False, eye, None, MAX_ROWS)  # 1:3 blocks
    assert torch.equal(y, torch.tensor([[0.0, -3.0, 0.0, 0.0, -3.0, 0.0]], dtype=dt))


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_dropped_features_skip_their_weight_rows(dtype):
    """Rows of W^T under dropped activations are never read: poison there cannot reach y."""
    dt = DTYPES[dtype]
    x = torch.randn(2, 64).to(dt)
    weight_t = torch.randn(64, 48).to(dt)
    ref = topk_linear_reference(x, 16, 0, 0, False, weight_t, None)
    kept = topk_linear_reference(x, 16, 0, 0, False, torch.eye(64, dtype=dt), None) != 0
    poisoned = weight_t.clone()
    poisoned[~kept.any(0)] = float("nan")
    y = cpu_topk_linear(x, 16, 0, 0, False, poisoned, None, MAX_ROWS)
    assert not y.isnan().any()
    _assert_close_to_reference(y, ref, x.float().abs() @ weight_t.float().abs(), dt)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("rows,max_sparse_rows", [(11, 8), (3, 2), (1, 0)],
                         ids=["11rows", "3rows-max2", "max0"])
@pytest.mark.parametrize("mode", ["topk", "block"])
def test_fallback_beyond_max_sparse_rows(dtype, rows, max_sparse_rows, mode):
    """More rows than the fused kernel takes: sparsify op + dense product, same result."""
    dt = DTYPES[dtype]
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 40, generator=g).to(dt)
    weight_t = torch.randn(40, 21, generator=g).to(dt)
    bias = torch.randn(21, generator=g).to(dt)
    k, n, m = (13, 0, 0) if mode == "topk" else (0, 2, 4)
    for rescale in (False, True):
        y = cpu_topk_linear(x, k, n, m, rescale, weight_t, bias, max_sparse_rows)
        ref = topk_linear_reference(x, k, n, m, rescale, weight_t, bias)
        scale = x.float().abs() @ weight_t.float().abs() * 4 + bias.float().abs()
        _assert_close_to_reference(y, ref, scale, dt)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_leading_dims_strides_and_threads(dtype):
    """Any leading shape; non-contiguous activations and row-padded weights are read in
    place; the two-thread split (a weight large enough to share) agrees with one thread."""
    dt = DTYPES[dtype]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 2, 3, generator=g).to(dt).permute(1, 2, 0)  # [2, 3, 512], strided
    padded = torch.randn(512, 800, generator=g).to(dt)
    weight_t = padded[:, :700]  # row stride 800
    bias = torch.randn(700, generator=g).to(dt)
    ref = topk_linear_reference(x, 256, 0, 0, False, weight_t, bias)
    scale = x.float().abs() @ weight_t.float().abs() + bias.float().abs()
    for threads in (1, 2):
        y = topk_linear(x, 256, 0, 0, False, weight_t, bias, num_threads=threads)
        assert y.shape == (2, 3, 700)
        _assert_close_to_reference(y, ref, scale, dt)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("rows,max_sparse_rows", [(1, 8), (3, 8), (5, 2)],
                         ids=["1row", "3rows", "fallback"])
def test_opcheck(dtype, with_bias, rows, max_sparse_rows):
    dt = DTYPES[dtype]
    x = torch.randn(rows, 17).to(dt)
    weight_t = torch.randn(17, 9).to(dt)
    bias = torch.randn(9).to(dt) if with_bias else None
    torch.library.opcheck(cpu_topk_linear, (x, 5, 0, 0, True, weight_t, bias, max_sparse_rows))


def test_inference_only():
    x = torch.randn(1, 8, requires_grad=True)
    weight_t = torch.randn(8, 4)
    with pytest.raises(RuntimeError, match="inference-only"):
        cpu_topk_linear(x, 4, 0, 0, False, weight_t, None, 8)
    with torch.no_grad():
        assert cpu_topk_linear(x, 4, 0, 0, False, weight_t, None, 8).shape == (1, 4)


def test_prepare_group_weight():
    wq, wk = torch.randn(6, 5), torch.randn(3, 5)
    cat = prepare_group_weight([wq, wk])
    assert cat.shape == (5, 9) and cat.is_contiguous()
    assert torch.equal(cat, torch.cat([wq.t(), wk.t()], dim=1))
    assert torch.equal(prepare_group_weight([wq.t()], layout="in_out"), wq.t())
    assert prepare_group_weight([wq], dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="share in_features"):
        prepare_group_weight([wq, torch.randn(3, 4)])
    with pytest.raises(ValueError, match="layout"):
        prepare_group_weight([wq], layout="kn")


@pytest.mark.parametrize(
    "args,error,match",
    [
        ((torch.randn(2, 8), 9, 0, 0), ValueError, r"k .* must be in \[1, 8\].*k=9"),
        ((torch.randn(2, 8), 0, 0, 0), ValueError, r"got k=0"),
        ((torch.randn(2, 8), 0, 3, 2), ValueError, r"1 <= n <= m .* n=3, m=2"),
        ((torch.randn(2, 8), 0, 2, 3), ValueError, r"m dividing in_features=8"),
        ((torch.randn(2, 7), 3, 0, 0), ValueError, r"x \[..., in_features\].*\(2, 7\)"),
        ((torch.randn(2, 8).double(), 3, 0, 0), TypeError, r"x has dtype torch.float64"),
        ((torch.randn(2, 8).bfloat16(), 3, 0, 0), TypeError, r"share a dtype"),
    ],
    ids=["k-too-big", "k-zero", "n-above-m", "m-not-dividing", "shape", "dtype", "mixed"],
)
def test_errors_name_the_problem(args, error, match):
    x, k, n, m = args
    with pytest.raises(error, match=match):
        cpu_topk_linear(x, k, n, m, False, torch.randn(8, 4), None, 8)


def test_max_sparse_rows_out_of_range():
    with pytest.raises(ValueError, match=r"max_sparse_rows must be in \[0, 8\] .*got 9"):
        cpu_topk_linear(torch.randn(1, 8), 4, 0, 0, False, torch.randn(8, 4), None, 9)
