"""The native CPU kernels of ``qsparse::cpu_topk_linear`` / ``qsparse::cpu_packed_linear``.

Once loaded, the C++ kernel serves the ops' CPU key and calls the same C entry points as the
Python implementation: its outputs must equal the Python implementation's bit for bit, it must
actually serve the calls a decode step makes (counted), and everything else (first calls,
many rows, grad, bad operands, another thread count) must reach the Python implementation,
with its errors.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import kernel_selections

from qsparse_compile.codegen.cpu.native_dispatch import native_calls, native_library
from qsparse_compile.codegen.cpu.packed_linear_op import prepare_packed_weight
from qsparse_compile.codegen.cpu.packed_weights import FORMATS
from qsparse_compile.codegen.cpu.topk_linear_op import MAX_ROWS, prepare_group_weight

pytestmark = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                reason="no C++ compiler")

ops = torch.ops.qsparse
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(scope="module", autouse=True)
def _loaded():
    assert native_library() is not None, "the native dispatch library did not build"


def _served_by_native(call) -> tuple[torch.Tensor, bool]:
    before = native_calls()
    y = call()
    return y, native_calls() == before + 1


@settings(max_examples=40, deadline=None)
@given(data=st.data(), fmt=st.sampled_from(list(FORMATS)), dtype=st.sampled_from(DTYPES),
       D=st.sampled_from([7, 32, 70, 96]), N=st.integers(1, 70),
       rows=st.integers(1, MAX_ROWS), quant=st.booleans(), bias=st.booleans(),
       transposed=st.booleans(), seed=st.integers(0, 2**16))
def test_packed_native_equals_python(data, fmt, dtype, D, N, rows, quant, bias, transposed,
                                     seed):
    g = torch.Generator().manual_seed(seed)
    k, n, m = data.draw(kernel_selections(D))
    packed = prepare_packed_weight([torch.randn(N, D, generator=g)], fmt)
    x = torch.randn(D, rows, generator=g).to(dtype).t() if transposed else \
        torch.randn(rows, D, generator=g).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    args = (x, k, n, m, False, quant, fmt, N, packed, b, MAX_ROWS)
    with torch.no_grad():
        ops.cpu_packed_linear(*args)  # a first call publishes the entry point and layout
        y, native = _served_by_native(lambda: ops.cpu_packed_linear(*args))
        expected = ops.cpu_packed_linear_python(*args)
    assert native
    assert torch.equal(y, expected) or (y.isnan() == expected.isnan()).all()
    assert torch.equal(torch.nan_to_num(y), torch.nan_to_num(expected))


@settings(max_examples=30, deadline=None)
@given(data=st.data(), dtype=st.sampled_from(DTYPES), D=st.sampled_from([7, 32, 70]),
       N=st.integers(1, 70), rows=st.integers(1, MAX_ROWS), rescale=st.booleans(),
       bias=st.booleans(), seed=st.integers(0, 2**16))
def test_topk_native_equals_python(data, dtype, D, N, rows, rescale, bias, seed):
    g = torch.Generator().manual_seed(seed)
    k, n, m = data.draw(kernel_selections(D))
    wt = prepare_group_weight([torch.randn(N, D, generator=g)], dtype=dtype)
    x = torch.randn(1, rows, D, generator=g).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    args = (x, k, n, m, rescale, wt, b, MAX_ROWS)
    with torch.no_grad():
        ops.cpu_topk_linear(*args)
        y, native = _served_by_native(lambda: ops.cpu_topk_linear(*args))
        expected = ops.cpu_topk_linear_python(*args)
    assert native
    assert y.shape == (1, rows, N)
    assert torch.equal(torch.nan_to_num(y), torch.nan_to_num(expected))


def test_what_the_native_kernel_does_not_take_reaches_python():
    """Many rows, grad, a bad operand, another thread count: the Python implementation runs
    (its fallback, its errors, its new thread policy) and the native count stays put."""
    g = torch.Generator().manual_seed(1)
    packed = prepare_packed_weight([torch.randn(24, 40, generator=g)], "int4")
    x = torch.randn(1, 40, generator=g)
    with torch.no_grad():
        ops.cpu_packed_linear(x, 20, 0, 0, False, False, "int4", 24, packed, None, MAX_ROWS)
    before = native_calls()
    many = torch.randn(3, 5, 40, generator=g)
    with torch.no_grad():
        y = ops.cpu_packed_linear(many, 20, 0, 0, False, False, "int4", 24, packed, None,
                                  MAX_ROWS)
        assert y.shape == (3, 5, 24)
        with pytest.raises(ValueError, match=r"k must be in \[1, 40\]"):
            ops.cpu_packed_linear(x, 41, 0, 0, False, False, "int4", 24, packed, None, MAX_ROWS)
        with pytest.raises(ValueError, match="packed must be the uint8 buffer"):
            ops.cpu_packed_linear(x, 20, 0, 0, False, False, "int4", 24, packed[:-64], None,
                                  MAX_ROWS)
        with pytest.raises(ValueError, match="bias must have shape"):
            ops.cpu_packed_linear(x, 20, 0, 0, False, False, "int4", 24, packed,
                                  torch.zeros(5), MAX_ROWS)
        for max_rows in (-1, MAX_ROWS + 1):
            with pytest.raises(ValueError, match="max_sparse_rows must be in"):
                ops.cpu_packed_linear(x, 20, 0, 0, False, False, "int4", 24, packed, None,
                                      max_rows)
            with pytest.raises(ValueError, match="max_sparse_rows must be in"):
                ops.cpu_topk_linear(x, 20, 0, 0, False, torch.randn(40, 24, generator=g),
                                    None, max_rows)
    with pytest.raises(RuntimeError, match="inference-only"):
        ops.cpu_packed_linear(x.clone().requires_grad_(), 20, 0, 0, False, False, "int4", 24,
                              packed, None, MAX_ROWS)
    assert native_calls() == before
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        with torch.no_grad():
            y1 = ops.cpu_packed_linear(x, 20, 0, 0, False, False, "int4", 24, packed, None,
                                       MAX_ROWS)
        assert native_calls() == before  # deferred: the policy is measured for this count
        with torch.no_grad():
            _, native = _served_by_native(lambda: ops.cpu_packed_linear(
                x, 20, 0, 0, False, False, "int4", 24, packed, None, MAX_ROWS))
        assert native
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        y2 = ops.cpu_packed_linear(x, 20, 0, 0, False, False, "int4", 24, packed, None,
                                   MAX_ROWS)
        # back at the first count, the native kernel serves again
        _, native = _served_by_native(lambda: ops.cpu_packed_linear(
            x, 20, 0, 0, False, False, "int4", 24, packed, None, MAX_ROWS))
        assert native
    assert torch.equal(y1, y2)
