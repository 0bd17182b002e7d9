"""``qsparse::sparse_linear``: ``y = x_s W^T + b`` on an already sparsified input.

Its CPU kernel is the dense product, so the oracle is ``torch.nn.functional.linear`` with
autograd: forward and all three gradients must agree bit for bit. Device kernels that skip
zeroed activations are held to the same contract elsewhere.
"""

from __future__ import annotations

import pytest
import torch
from assertions import assert_identical, raises_naming
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import DTYPES, dtype_id, topk_cases, upstream_like
from torch.library import opcheck

import qsparse_compile  # noqa: F401  (registers torch.ops.qsparse)

qsparse = torch.ops.qsparse

dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
biases = pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
X_SHAPES = {"vector": (8,), "rows": (4, 8), "3d": (2, 3, 8)}


@dtypes
@biases
def test_opcheck(bias, dtype):
    """Schema, fake kernel, autograd formula (x, W and b require grad) and AOT dispatch."""
    _opcheck_linear(X_SHAPES["3d"], bias, dtype)


@pytest.mark.parametrize("x_shape", ["vector", "rows"])
def test_opcheck_other_ranks(x_shape):
    """A single token (1-D input) and a plain batch of rows have the same contract."""
    _opcheck_linear(X_SHAPES[x_shape], True, torch.float32)


def _opcheck_linear(x_shape, bias, dtype):
    x = torch.randn(x_shape, dtype=dtype, requires_grad=True)
    w = torch.randn(5, 8, dtype=dtype, requires_grad=True)
    b = torch.randn(5, dtype=dtype, requires_grad=True) if bias else None
    opcheck(qsparse.sparse_linear, (x, w, b))


@dtypes
@settings(max_examples=30)
@given(
    data=st.data(),
    out_features=st.integers(1, 9),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_matches_linear_forward_and_backward(dtype, data, out_features, bias, seed):
    """Against ``F.linear``: output, grad of x, grad of W and grad of b, bit for bit.

    The input is a top-K sparsified activation (finite values), as in a compiled model.
    """
    x, k = data.draw(topk_cases(dtype, special=False))
    x = qsparse.topk_sparsify(x, k, False, True)
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, x.shape[-1], generator=gen).to(dtype)
    b = torch.randn(out_features, generator=gen).to(dtype) if bias else None
    grad = upstream_like(torch.empty(*x.shape[:-1], out_features, dtype=dtype), seed + 1)

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in (x, w) + ((b,) if bias else ())]
        y = fn(leaves[0], leaves[1], leaves[2] if bias else None)
        y.backward(grad)
        return y, [t.grad for t in leaves]

    y_op, grads_op = run(qsparse.sparse_linear)
    y_ref, grads_ref = run(torch.nn.functional.linear)
    assert_identical(y_op, y_ref)
    for g_op, g_ref in zip(grads_op, grads_ref, strict=True):
        assert_identical(g_op, g_ref)


def test_gradients_only_for_inputs_that_require_them():
    """A frozen weight (fine-tuning only activations' producers) gets no gradient."""
    x = torch.randn(3, 8, requires_grad=True)
    w = torch.randn(5, 8)
    b = torch.randn(5, requires_grad=True)
    qsparse.sparse_linear(x, w, b).sum().backward()
    assert x.grad is not None and b.grad is not None and w.grad is None


@pytest.mark.parametrize(
    ("x", "w", "b", "exc", "parts"),
    [
        pytest.param(
            torch.randn(3, 7), torch.randn(5, 8), None, ValueError,
            ("x [..., in_features]", "(3, 7)", "(5, 8)"), id="in-features-mismatch",
        ),
        pytest.param(
            torch.randn(3, 8), torch.randn(8), None, ValueError,
            ("weight [out_features, in_features]", "(8,)"), id="weight-not-2d",
        ),
        pytest.param(
            torch.randn(3, 8), torch.randn(5, 8, dtype=torch.float16), None, TypeError,
            ("share a dtype", "torch.float32", "torch.float16"), id="dtype-mismatch",
        ),
        pytest.param(
            torch.ones(3, 8, dtype=torch.int64), torch.randn(5, 8), None, TypeError,
            ("'x'", "int64", "float32, bfloat16"), id="integer-x",
        ),
        pytest.param(
            torch.randn(3, 8), torch.ones(5, 8, dtype=torch.int32), None, TypeError,
            ("'weight'", "int32", "float32, bfloat16"), id="integer-weight",
        ),
    ],
)
def test_rejects_bad_arguments(x, w, b, exc, parts):
    with raises_naming(exc, "qsparse.sparse_linear", *parts):
        qsparse.sparse_linear(x, w, b)
