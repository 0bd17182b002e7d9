"""The benchmark-only sparse GEMV (``benchmarks/sparse_gemv_kernel.py``) against its reference.

No pass emits this kernel; ``benchmarks/cpu_decode.py`` times it, so it is checked forward and
backward like every kernel, here.

Shapes are deliberately small and odd (K = 1, 3, 17, 100; N = 1, 5, 33) so every tail path of
the kernel (rows left over after the last full pass, columns left over after the last vector,
tokens 1..8 and a chunked 11) runs; a few larger cases exercise the multi-threaded split.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sparse_gemv_kernel import (
    MAX_TOKENS,
    cpu_sparse_gemv,
    prepare_weight,
    sparse_gemv,
    sparse_gemv_reference,
)

from qsparse_compile.reference import topk_sparsify

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _activations(tokens: int, K: int, dtype: torch.dtype, pattern: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, K, generator=g).to(dtype)
    if pattern == "zero":
        return torch.zeros_like(x)
    if pattern == "topk":
        return topk_sparsify(x, max(1, K // 2))
    if pattern == "mixed":  # some rows all zero, some dense, some sparse
        keep = torch.rand(tokens, K, generator=g) < 0.4
        keep[::3] = False
        keep[1::3] = True
        return torch.where(keep, x, 0)
    return x  # "dense"


def _assert_matches_reference(
    y: torch.Tensor, x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None
) -> None:
    ref = sparse_gemv_reference(x, weight_t, bias)
    assert y.dtype == ref.dtype and y.shape == ref.shape
    # fp32 sums in a different order than the reference; bf16 may then round to the other
    # neighbour, one bf16 ulp (2^-8 relative) away.
    scale = x.float().abs() @ weight_t.float().abs()
    if bias is not None:
        scale = scale + bias.float().abs()
    rtol = 2.0**-7 if x.dtype == torch.bfloat16 else 0.0
    err = (y.float() - ref.float()).abs()
    bound = 1e-5 * scale + rtol * ref.float().abs() + 1e-30
    assert bool((err <= bound).all()), f"max error {err.max().item()} exceeds bound"


@settings(max_examples=40, deadline=None)
@given(
    dtype=st.sampled_from(list(DTYPES)),
    K=st.sampled_from([1, 3, 17, 100]),
    N=st.sampled_from([1, 5, 33]),
    tokens=st.integers(1, MAX_TOKENS),
    pattern=st.sampled_from(["topk", "mixed", "zero", "dense"]),
    with_bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_forward_matches_reference(dtype, K, N, tokens, pattern, with_bias, seed):
    dt = DTYPES[dtype]
    x = _activations(tokens, K, dt, pattern, seed)
    g = torch.Generator().manual_seed(seed + 1)
    weight_t = prepare_weight(torch.randn(N, K, generator=g).to(dt))
    bias = torch.randn(N, generator=g).to(dt) if with_bias else None
    y = torch.ops.qsparse_bench.cpu_sparse_gemv(x, weight_t, bias)
    _assert_matches_reference(y, x, weight_t, bias)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("leading", [(11,), (2, 3, 5), (0,)], ids=["11rows", "3d", "empty"])
def test_leading_dims_and_chunks(dtype, leading):
    """More than MAX_TOKENS rows run chunk by chunk; any leading shape is flattened."""
    dt = DTYPES[dtype]
    x = topk_sparsify(torch.randn(*leading, 40), 10).to(dt)
    weight_t = torch.randn(40, 21).to(dt)
    bias = torch.randn(21).to(dt)
    y = cpu_sparse_gemv(x, weight_t, bias)
    assert y.shape == (*leading, 21)
    _assert_matches_reference(y.reshape(-1, 21), x.reshape(-1, 40), weight_t, bias)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_all_zero_input_gives_bias_exactly(dtype):
    dt = DTYPES[dtype]
    weight_t = torch.randn(17, 33).to(dt)
    bias = torch.randn(33).to(dt)
    x = torch.zeros(3, 17, dtype=dt)
    assert torch.equal(cpu_sparse_gemv(x, weight_t, bias), bias.expand(3, 33))
    assert torch.equal(cpu_sparse_gemv(x, weight_t, None), torch.zeros(3, 33, dtype=dt))


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_zeroed_features_skip_their_weight_rows(dtype):
    """Rows of W^T under zero activations are never read: poison there cannot reach y."""
    dt = DTYPES[dtype]
    x = topk_sparsify(torch.randn(2, 64), 16).to(dt)
    weight_t = torch.randn(64, 48).to(dt)
    unused = (x == 0).all(0)
    poisoned = weight_t.clone()
    poisoned[unused] = float("nan")
    y = cpu_sparse_gemv(x, poisoned, None)
    assert not y.isnan().any()
    assert torch.equal(y, cpu_sparse_gemv(x, weight_t, None))


def test_nan_activation_propagates():
    x = torch.zeros(1, 10)
    x[0, 3] = float("nan")
    y = cpu_sparse_gemv(x, torch.randn(10, 7), None)
    assert y.isnan().all()


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_bf16_rounding_and_threads_do_not_change_results(dtype):
    """Each output column is summed in the same order whatever the thread split."""
    dt = DTYPES[dtype]
    x = topk_sparsify(torch.randn(3, 300), 120).to(dt)
    weight_t = torch.randn(300, 1000).to(dt)
    bias = torch.randn(1000).to(dt)
    outs = [sparse_gemv(x, weight_t, bias, num_threads=n) for n in (1, 2, 3)]
    _assert_matches_reference(outs[0], x, weight_t, bias)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_strided_inputs(dtype):
    """Non-contiguous activations and row-padded weights are read in place."""
    dt = DTYPES[dtype]
    x = topk_sparsify(torch.randn(17, 4), 2).to(dt).t()  # [4, 17], column stride 4
    padded = torch.randn(17, 48).to(dt)
    weight_t = padded[:, :33]  # row stride 48
    y = cpu_sparse_gemv(x, weight_t, None)
    _assert_matches_reference(y, x, weight_t, None)
    transposed = torch.randn(33, 17).to(dt).t()  # [17, 33], column stride 17: copied
    _assert_matches_reference(cpu_sparse_gemv(x, transposed, None), x, transposed, None)


@settings(max_examples=10, deadline=None)
@given(
    dtype=st.sampled_from(list(DTYPES)),
    K=st.sampled_from([1, 3, 17]),
    N=st.sampled_from([1, 5, 33]),
    tokens=st.integers(1, 9),
    with_bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_backward_matches_reference(dtype, K, N, tokens, with_bias, seed):
    dt = DTYPES[dtype]
    g = torch.Generator().manual_seed(seed)
    x0 = _activations(tokens, K, dt, "mixed", seed)
    w0 = torch.randn(K, N, generator=g).to(dt)
    b0 = torch.randn(N, generator=g).to(dt) if with_bias else None
    grad = torch.randn(tokens, N, generator=g).to(dt)

    def grads(fn):
        leaves = [t.clone().requires_grad_() for t in (x0, w0, b0) if t is not None]
        fn(*leaves, *([None] if b0 is None else [])).backward(grad)
        return [t.grad for t in leaves]

    ours = grads(torch.ops.qsparse_bench.cpu_sparse_gemv)
    ref = grads(sparse_gemv_reference)
    tol = {"rtol": 2e-2, "atol": 5e-2} if dt == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}
    for a, b in zip(ours, ref, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_opcheck(dtype, with_bias):
    dt = DTYPES[dtype]
    x = topk_sparsify(torch.randn(2, 3, 17), 5).to(dt).requires_grad_()
    weight_t = torch.randn(17, 5).to(dt).requires_grad_()
    bias = torch.randn(5).to(dt).requires_grad_() if with_bias else None
    torch.library.opcheck(torch.ops.qsparse_bench.cpu_sparse_gemv, (x, weight_t, bias))


def test_prepare_weight_layout():
    weight = torch.randn(33, 17)
    weight_t = prepare_weight(weight)
    assert weight_t.shape == (17, 33) and weight_t.is_contiguous()
    assert torch.equal(weight_t, weight.t())
    assert prepare_weight(weight, torch.bfloat16).dtype == torch.bfloat16


def test_errors_name_the_problem():
    x, weight_t = torch.randn(2, 4), torch.randn(4, 3)
    with pytest.raises(TypeError, match=r"float16.*allowed: torch.float32, torch.bfloat16"):
        cpu_sparse_gemv(x.half(), weight_t.half(), None)
    with pytest.raises(TypeError, match="must share a dtype"):
        cpu_sparse_gemv(x, weight_t.bfloat16(), None)
    with pytest.raises(ValueError, match=r"x \(2, 5\) and weight_t \(4, 3\)"):
        cpu_sparse_gemv(torch.randn(2, 5), weight_t, None)
    with pytest.raises(ValueError, match=r"bias must have shape \(3,\)"):
        cpu_sparse_gemv(x, weight_t, torch.randn(4))
    with pytest.raises(ValueError, match="2-D weight"):
        prepare_weight(torch.randn(3))
