"""Decode sparse GEMV (``y = x_s @ Wt + b``, 1-8 tokens) against its pure-PyTorch reference.

Both sum in fp32, in different orders, so the bound is the one any two fp32 summation orders
share, ``2 K u sum|x w|``, plus one rounding of the output dtype. Every path is reached on small,
odd shapes: K = 1, 7, 24, 100; N = 1, 5, 33; one to eight tokens (and 11, two launches); with
and without bias; one launch (no K split) or a split with the ordered reduction kernel.
Inputs are built on ``triton_cases.DEVICE``; the reference runs on the CPU (``cpu_reference``).
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton", reason="triton is not installed: the Triton kernel tests need it")

import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from triton_cases import DTYPES, cpu_reference, dtype_id, on_device, randn, ulp  # noqa: E402

from qsparse_compile import reference  # noqa: E402
from qsparse_compile.codegen.triton import gemv  # noqa: E402

dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
U32 = 2.0**-24


def _activations(tokens, k, dtype, pattern, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=g)
    if pattern == "zero":
        x.zero_()
    elif pattern == "topk":
        x = reference.topk_sparsify(x, max(1, k // 2))
    elif pattern == "union":  # tokens zero in different places: the union decides
        keep = torch.rand(tokens, k, generator=g) < 0.4
        keep[::3] = False
        x = torch.where(keep, x, 0)
    return on_device(x.to(dtype))


def _assert_matches_reference(y, x, weight_t, bias):
    ref = cpu_reference(gemv.sparse_gemv_reference, x, weight_t, bias)
    assert y.dtype == ref.dtype and y.shape == ref.shape
    scale = x.double().abs() @ weight_t.double().abs()
    if bias is not None:
        scale = scale + bias.double().abs()
    k = max(1, x.shape[-1])
    bound = 2 * k * U32 * scale + ulp(y.dtype) * ref.double().abs() + 1e-30
    err = (y.double() - ref.double()).abs()
    assert bool((err <= bound).all()), f"max error {err.max().item()}, bound {bound.min()}"


@dtypes
@settings(max_examples=15)
@given(
    k=st.sampled_from([1, 7, 24, 100]),
    n=st.sampled_from([1, 5, 33]),
    tokens=st.integers(1, gemv.MAX_TOKENS),
    pattern=st.sampled_from(["topk", "union", "zero", "dense"]),
    with_bias=st.booleans(),
    splits=st.sampled_from([None, 1, 2, 3]),
    seed=st.integers(0, 2**16),
)
def test_gemv_matches_reference(dtype, k, n, tokens, pattern, with_bias, splits, seed):
    x = _activations(tokens, k, dtype, pattern, seed)
    g = torch.Generator().manual_seed(seed + 1)
    weight_t = gemv.prepare_weight(randn(n, k, dtype=dtype, generator=g))
    bias = randn(n, dtype=dtype, generator=g) if with_bias else None
    # a small block_k so that K = 100 takes several tiles and the splits have work each
    y = gemv.sparse_gemv(x, weight_t, bias, splits=splits, block_k=16 if k > 16 else None)
    _assert_matches_reference(y, x, weight_t, bias)


@dtypes
@pytest.mark.parametrize("leading", [(11,), (2, 3), (0,)], ids=["11rows", "3d", "empty"])
def test_gemv_leading_dims_and_token_groups(dtype, leading):
    """More than MAX_TOKENS rows run in groups; any leading shape is flattened."""
    x = on_device(reference.topk_sparsify(torch.randn(*leading, 40), 10).to(dtype))
    weight_t = randn(40, 21, dtype=dtype)
    bias = randn(21, dtype=dtype)
    y = gemv.sparse_gemv(x, weight_t, bias)
    assert y.shape == (*leading, 21)
    _assert_matches_reference(y.reshape(-1, 21), x.reshape(-1, 40), weight_t, bias)


@dtypes
@pytest.mark.parametrize("splits", [1, 3])
def test_gemv_all_zero_input_gives_bias_exactly(dtype, splits):
    weight_t = randn(17, 33, dtype=dtype)
    bias = randn(33, dtype=dtype)
    x = on_device(torch.zeros(3, 17, dtype=dtype))
    assert torch.equal(gemv.sparse_gemv(x, weight_t, bias, splits=splits, block_k=4),
                       bias.expand(3, 33))
    assert torch.equal(gemv.sparse_gemv(x, weight_t, None, splits=splits, block_k=4),
                       on_device(torch.zeros(3, 33, dtype=dtype)))
    no_features = on_device(torch.empty(3, 0, dtype=dtype))
    assert torch.equal(gemv.sparse_gemv(no_features, weight_t[:0], bias), bias.expand(3, 33))


@dtypes
@pytest.mark.parametrize("splits", [1, 2])
def test_gemv_skips_weight_rows_of_zeroed_features(dtype, splits):
    """Rows of W^T under activations zero for every token are never used: NaN there is inert."""
    x = on_device(reference.topk_sparsify(torch.randn(3, 64), 16).to(dtype))
    weight_t = randn(64, 48, dtype=dtype)
    unused = (x == 0).all(0)
    assert unused.any()
    poisoned = weight_t.clone()
    poisoned[unused] = float("nan")
    y = gemv.sparse_gemv(x, poisoned, None, splits=splits, block_k=16)
    assert not y.isnan().any()
    assert torch.equal(y, gemv.sparse_gemv(x, weight_t, None, splits=splits, block_k=16))


def test_gemv_nan_activation_propagates_and_runs_are_deterministic():
    x = torch.zeros(2, 10)
    x[0, 3] = float("nan")
    x[1, 5] = 1.0
    y = gemv.sparse_gemv(on_device(x), randn(10, 7), None, splits=2, block_k=4)
    assert y[0].isnan().all() and not y[1].isnan().any()
    x = randn(4, 50)
    w = randn(50, 9)
    assert torch.equal(gemv.sparse_gemv(x, w, splits=3, block_k=8),
                       gemv.sparse_gemv(x, w, splits=3, block_k=8))


@dtypes
def test_gemv_strided_inputs(dtype):
    x = randn(3, 60, dtype=dtype)[:, ::2]  # non-unit column stride: copied
    rows = randn(6, 30, dtype=dtype)[::2]  # row stride 60: read in place
    weight_t = randn(30, 12, dtype=dtype)
    for inp in (x, rows):
        _assert_matches_reference(gemv.sparse_gemv(inp, weight_t), inp, weight_t, None)


def test_gemv_config_for_llama_shapes():
    """Heuristic tilings: whole K covered, no empty split, enough programs for an H100."""
    for k, n in ((4096, 4096), (4096, 11008), (11008, 4096)):
        for tokens in range(1, gemv.MAX_TOKENS + 1):
            for dtype in DTYPES:
                cfg = gemv.gemv_config(k, n, tokens, dtype, num_sms=132)
                assert cfg.k_split % cfg.block_k == 0
                assert cfg.splits * cfg.k_split >= k > (cfg.splits - 1) * cfg.k_split
                programs = -(-n // cfg.block_n) * cfg.splits
                assert programs >= 132, (k, n, tokens, dtype, cfg)
                assert cfg.block_n * torch.empty((), dtype=dtype).element_size() == 128


def test_gemv_rejects_bad_arguments():
    x = randn(2, 8)
    with pytest.raises(TypeError, match="share a dtype"):
        gemv.sparse_gemv(x, randn(8, 4, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"weight_t \[in_features, out_features\]"):
        gemv.sparse_gemv(x, randn(4, 8))
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\)"):
        gemv.sparse_gemv(x, randn(8, 4), randn(5))
    with pytest.raises(TypeError, match="float64"):
        gemv.prepare_weight(randn(4, 8), torch.float64)
    assert gemv.prepare_weight(randn(4, 8)).shape == (8, 4)
