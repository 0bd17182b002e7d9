"""``qsparse::int8_fake_quant`` and ``qsparse::ternary_fake_quant`` (DESIGN.md points 5-7).

int8: per row ``g = max(max|x|, 1e-5)``, ``q = clamp(round(127 x / g), -128, 127)``, value
``q g / 127``; so the error is at most half a step ``g / 127``. Ternary: per tensor
``a = max(mean|W|, 1e-5)``, values in ``{-a, 0, a}``. Both are straight-through in backward.
"""

from __future__ import annotations

import pytest
import torch
from assertions import assert_identical, raises_naming
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import DTYPES, activations, dtype_id, upstream_like
from torch.library import opcheck

import qsparse_compile  # noqa: F401  (registers torch.ops.qsparse)
from qsparse_compile import reference

qsparse = torch.ops.qsparse

dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
quantizers = pytest.mark.parametrize(
    ("op", "ref"),
    [
        (qsparse.int8_fake_quant, reference.int8_fake_quant),
        (qsparse.ternary_fake_quant, reference.ternary_fake_quant),
    ],
    ids=["int8", "ternary"],
)

SHAPES = {"row": (8,), "rows": (4, 8), "3d": (2, 3, 5), "D1": (3, 1)}


# --- opcheck ---------------------------------------------------------------------------------


@dtypes
@quantizers
def test_opcheck(op, ref, dtype):
    """Schema, fake kernel, autograd formula (input requires grad) and AOT dispatch."""
    opcheck(op, (torch.randn(SHAPES["rows"], dtype=dtype, requires_grad=True),))


@pytest.mark.parametrize("shape", ["row", "3d", "D1"])
@quantizers
def test_opcheck_other_shapes(op, ref, shape):
    """One token, 3-D activations and a width of one: per-row scales must still line up."""
    opcheck(op, (torch.randn(SHAPES[shape], requires_grad=True),))


# --- int8 activations --------------------------------------------------------------------------


@dtypes
@settings(max_examples=30)
@given(data=st.data())
def test_int8_error_at_most_half_a_step(dtype, data):
    """``|Q(x) - x| <= g / 254`` per row for finite inputs.

    A float32 slack of 1e-4 step covers the float32 arithmetic inside the op; in bfloat16 and
    float16 the dequantized value is rounded once more to the dtype (half an ulp of ``|x|``).
    A quantizer that truncated instead of rounding would be off by up to a whole step.
    """
    x = data.draw(activations(dtype, special=False))
    out = qsparse.int8_fake_quant(x)
    assert out.dtype == dtype and out.shape == x.shape
    xd, od = x.double(), out.double()
    g = xd.abs().amax(dim=-1, keepdim=True).clamp_min(1e-5)
    step = g / 127
    bound = step * (0.5 + 1e-4)
    if dtype != torch.float32:
        bound = bound + xd.abs() * torch.finfo(dtype).eps
    assert bool(((od - xd).abs() <= bound).all()), (od - xd).abs().max()


@settings(max_examples=30)
@given(x=activations(torch.float32, special=False))
def test_int8_values_lie_on_the_grid(x):
    """Each output is an integer ``q`` in ``[-128, 127]`` times the row's step ``g / 127``."""
    out = qsparse.int8_fake_quant(x).double()
    g = x.double().abs().amax(dim=-1, keepdim=True).clamp_min(1e-5)
    q = out * 127 / g
    assert bool(((q - q.round()).abs() <= 1e-3).all())
    assert bool(((q.round() >= -128) & (q.round() <= 127)).all())


@dtypes
def test_int8_zero_row_stays_zero(dtype):
    """``g`` is clamped at 1e-5, so an all-zero row divides by a positive number and gives 0."""
    x = torch.zeros(2, 6, dtype=dtype)
    assert_identical(qsparse.int8_fake_quant(x), x)


def test_int8_example():
    """A worked row: g = 2; 0.5 -> round(31.75) = 32; -1 -> round(-63.5) = -64 (half to even)."""
    x = torch.tensor([[2.0, -1.0, 0.5, 0.0]])
    expected = torch.tensor([[127.0, -64.0, 32.0, 0.0]]) * 2.0 / 127.0
    assert_identical(qsparse.int8_fake_quant(x), expected)


# --- ternary weights ---------------------------------------------------------------------------


@dtypes
@settings(max_examples=30)
@given(data=st.data())
def test_ternary_takes_only_minus_a_zero_a(dtype, data):
    """Every weight becomes ``-a``, ``0`` or ``a``, with ``a`` the tensor's mean ``|W|``.

    Also checks which: the sign is kept, and ``|W| / a`` below one half gives 0, above it ``a``.
    """
    w = data.draw(activations(dtype, special=False))
    out = qsparse.ternary_fake_quant(w)
    assert out.dtype == dtype and out.shape == w.shape
    wd, od = w.double(), out.double()
    a = max(wd.abs().mean().item(), 1e-5)
    magnitudes = od.abs()[od != 0].unique()
    assert len(magnitudes) <= 1, magnitudes
    if len(magnitudes):
        rtol = 1e-6 if dtype == torch.float32 else torch.finfo(dtype).eps
        assert magnitudes.item() == pytest.approx(a, rel=rtol)
    assert bool((torch.sign(od) * torch.sign(wd) >= 0).all())
    ratio = wd.abs() / a
    assert bool((od[ratio < 0.5 - 1e-4] == 0).all())
    assert bool((od[ratio > 0.5 + 1e-4] != 0).all())


def test_ternary_example():
    """mean|W| = 1: 0.4 rounds to 0, 0.6 to a, -3 clamps to -a."""
    w = torch.tensor([[0.4, 0.6, -3.0, 0.0, 2.0, 0.0]])
    expected = torch.tensor([[0.0, 1.0, -1.0, 0.0, 1.0, 0.0]])
    assert_identical(qsparse.ternary_fake_quant(w), expected)


# --- straight-through backward -----------------------------------------------------------------


@dtypes
@quantizers
@settings(max_examples=30)
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_gradient_is_straight_through(op, ref, dtype, data, seed):
    """The upstream gradient reaches the input unchanged, for every input including NaN/inf."""
    x = data.draw(activations(dtype)).requires_grad_()
    grad = upstream_like(x, seed)
    op(x).backward(grad)
    assert_identical(x.grad, grad)


# --- agreement with the reference --------------------------------------------------------------


@dtypes
@quantizers
@settings(max_examples=30)
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_matches_reference_forward_and_backward(op, ref, dtype, data, seed):
    x = data.draw(activations(dtype))
    grad = upstream_like(x, seed)
    x_op = x.clone().requires_grad_()
    x_ref = x.clone().requires_grad_()
    out_op, out_ref = op(x_op), ref(x_ref)
    assert_identical(out_op, out_ref)
    out_op.backward(grad)
    out_ref.backward(grad)
    assert_identical(x_op.grad, x_ref.grad)


# --- invalid arguments --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("op", "name", "arg"),
    [
        (qsparse.int8_fake_quant, "int8_fake_quant", "'x'"),
        (qsparse.ternary_fake_quant, "ternary_fake_quant", "'w'"),
    ],
    ids=["int8", "ternary"],
)
@pytest.mark.parametrize("int_dtype", [torch.int8, torch.int32], ids=str)
def test_rejects_integer_input(op, name, arg, int_dtype):
    """An int8 tensor is not "already quantized": it is a wrong input and must be refused."""
    dtype_name = str(int_dtype).removeprefix("torch.")
    with raises_naming(TypeError, f"qsparse.{name}", arg, dtype_name, "float32, bfloat16"):
        op(torch.ones(2, 4, dtype=int_dtype))
