"""``qsparse::topk_sparsify`` and ``qsparse::block_sparsify`` (DESIGN.md points 2-4 and 7).

Forward: kept entries keep their exact bits, the rest are zero, and ``rescale`` restores each
row's L2 norm. Backward: the straight-through estimator passes the upstream gradient unchanged
(``ste=True``) or masked (``ste=False``), multiplied by the rescale factor as a constant.
"""

from __future__ import annotations

import pytest
import torch
from assertions import assert_identical, bits, raises_naming
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import DTYPES, block_cases, dtype_id, topk_cases, upstream_like
from torch.library import opcheck

import qsparse_compile  # noqa: F401  (registers torch.ops.qsparse)
from qsparse_compile import reference

qsparse = torch.ops.qsparse

dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
rescales = pytest.mark.parametrize("rescale", [False, True], ids=["plain", "l2"])
stes = pytest.mark.parametrize("ste", [True, False], ids=["ste", "masked-grad"])
kinds = pytest.mark.parametrize("kind", ["topk", "block"])

#: (relative, absolute) tolerance for properties that go through one rounding to ``dtype``.
ROUNDING_TOL = {
    torch.float32: (1e-5, 1e-7),
    torch.bfloat16: (8e-3, 1e-6),
    torch.float16: (1e-3, 1e-6),
}


def sparsify(kind: str, x: torch.Tensor, param: tuple[int, ...], rescale: bool, ste: bool):
    """Call the op of ``kind`` ("topk" or "block") with its count parameter(s)."""
    if kind == "topk":
        return qsparse.topk_sparsify(x, *param, rescale, ste)
    return qsparse.block_sparsify(x, *param, rescale, ste)


def mask_of(kind: str, x: torch.Tensor, param: tuple[int, ...]) -> torch.Tensor:
    return qsparse.topk_mask(x, *param) if kind == "topk" else qsparse.block_mask(x, *param)


def reference_sparsify(kind, x, param, rescale: bool, ste: bool):
    mode = "l2" if rescale else "none"
    if kind == "topk":
        return reference.topk_sparsify(x, *param, mode, ste)
    return reference.block_sparsify(x, *param, mode, ste)


def draw_case(data, kind: str, dtype: torch.dtype, *, special: bool = True):
    """``(x, param)``: ``param`` is ``(k,)`` for top-K, ``(n, m)`` for block."""
    if kind == "topk":
        x, k = data.draw(topk_cases(dtype, special=special))
        return x, (k,)
    x, n, m = data.draw(block_cases(dtype, special=special))
    return x, (n, m)


# --- opcheck ---------------------------------------------------------------------------------


@dtypes
@pytest.mark.parametrize(
    ("rescale", "ste"), [(False, True), (True, False)], ids=["plain-ste", "l2-masked-grad"]
)
@kinds
def test_opcheck(kind, rescale, ste, dtype):
    """Schema, fake kernel, autograd formula (input requires grad) and AOT dispatch.

    The two flag pairs cover both backward branches: the pass-through one that saves nothing,
    and the one that recomputes the mask and the rescale factor from the saved input.
    """
    x = torch.randn(3, 8, dtype=dtype, requires_grad=True)
    op = qsparse.topk_sparsify if kind == "topk" else qsparse.block_sparsify
    param = (3,) if kind == "topk" else (2, 4)
    opcheck(op, (x, *param, rescale, ste))


@kinds
def test_opcheck_non_contiguous_input(kind):
    """The output is contiguous whatever the input layout, as the fake kernel says."""
    x = torch.randn(2, 8, 3).permute(2, 0, 1).requires_grad_()
    op = qsparse.topk_sparsify if kind == "topk" else qsparse.block_sparsify
    param = (3,) if kind == "topk" else (2, 4)
    opcheck(op, (x, *param, True, False))


# --- forward properties --------------------------------------------------------------------------


@dtypes
@kinds
@settings(max_examples=30)
@given(data=st.data())
def test_kept_values_are_bit_identical_rest_zero(kind, dtype, data):
    """Sparsify is ``where(mask, x, 0)``: no rounding, no sign flip, NaN and inf kept as is."""
    x, param = draw_case(data, kind, dtype)
    mask = mask_of(kind, x, param)
    out = sparsify(kind, x, param, rescale=False, ste=True)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(bits(out)[mask], bits(x)[mask])
    assert bool((out[~mask] == 0).all())


@dtypes
@kinds
@settings(max_examples=30)
@given(data=st.data())
def test_l2_rescale_preserves_row_norm(kind, dtype, data):
    """With ``rescale`` every row keeps its L2 norm (finite inputs); zero rows stay zero.

    float32 holds to 1e-5; bfloat16/float16 lose up to half an ulp per element when the
    rescaled values are rounded back, hence their looser tolerance. Magnitudes stay within
    2^-10 .. 2^10 (and normal samples): the norms are float32 sums of squares, which
    underflow below about 1e-19 and overflow above about 1e19.
    """
    x, param = draw_case(data, kind, dtype, special=False)
    out = sparsify(kind, x, param, rescale=True, ste=True)
    mask = mask_of(kind, x, param)
    assert bool((out[~mask] == 0).all())
    rtol, atol = ROUNDING_TOL[dtype]
    torch.testing.assert_close(
        torch.linalg.vector_norm(out.double(), dim=-1),
        torch.linalg.vector_norm(x.double(), dim=-1),
        rtol=rtol,
        atol=atol,
    )


@dtypes
@kinds
@settings(max_examples=30)
@given(data=st.data())
def test_sparsify_is_idempotent(kind, dtype, data):
    """Sparsifying an already sparsified row changes nothing: the kept entries still win."""
    x, param = draw_case(data, kind, dtype)
    once = sparsify(kind, x, param, rescale=False, ste=True)
    twice = sparsify(kind, once, param, rescale=False, ste=True)
    assert_identical(twice, once)


@dtypes
@rescales
def test_zero_sparsity_keeps_everything(dtype, rescale):
    """``s = 0`` gives ``k = D``: the op returns the input unchanged (factor exactly 1)."""
    x = torch.randn(4, 9).to(dtype)
    assert_identical(qsparse.topk_sparsify(x, 9, rescale, True), x)
    assert_identical(qsparse.block_sparsify(x, 3, 3, rescale, True), x)


# --- backward properties -------------------------------------------------------------------------


@dtypes
@stes
@kinds
@settings(max_examples=20)
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_gradient_without_rescale(kind, ste, dtype, data, seed):
    """STE: the upstream gradient passes exactly (``ste=True``) or exactly masked (``False``).

    Holds for every input, NaN and inf included: the gradient does not look at the values.
    """
    x, param = draw_case(data, kind, dtype)
    x.requires_grad_()
    grad = upstream_like(x, seed)
    sparsify(kind, x, param, rescale=False, ste=ste).backward(grad)
    expected = grad if ste else torch.where(mask_of(kind, x.detach(), param), grad, 0)
    assert_identical(x.grad, expected)


@dtypes
@stes
@kinds
@settings(max_examples=20)
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_gradient_with_rescale(kind, ste, dtype, data, seed):
    """With ``rescale`` the gradient is ``upstream * factor [* mask]``, factor held constant.

    The factor here is computed independently in float64; the op computes it in float32 and
    rounds the product once to ``dtype``, hence the tolerance.
    """
    x, param = draw_case(data, kind, dtype, special=False)
    x.requires_grad_()
    grad = upstream_like(x, seed)
    sparsify(kind, x, param, rescale=True, ste=ste).backward(grad)
    xd = x.detach().double()
    mask = mask_of(kind, x.detach(), param)
    full = torch.linalg.vector_norm(xd, dim=-1, keepdim=True)
    kept = torch.linalg.vector_norm(torch.where(mask, xd, 0), dim=-1, keepdim=True)
    factor = torch.where(kept > 0, full / kept, torch.ones_like(kept))
    expected = grad.double() * factor
    if not ste:
        expected = torch.where(mask, expected, 0)
    rtol, atol = ROUNDING_TOL[dtype]
    torch.testing.assert_close(x.grad.double(), expected, rtol=rtol, atol=atol)


# --- agreement with the reference ----------------------------------------------------------------


@dtypes
@kinds
@settings(max_examples=40)
@given(data=st.data(), rescale=st.booleans(), ste=st.booleans(), seed=st.integers(0, 2**16))
def test_matches_reference_forward_and_backward(kind, dtype, data, rescale, ste, seed):
    """Bit for bit against the sort-based reference, output and input gradient.

    ``rescale`` and ``ste`` are drawn rather than parametrised: every combination is hit
    many times over the examples at a quarter of the cost.
    """
    x, param = draw_case(data, kind, dtype)
    grad = upstream_like(x, seed)
    x_op = x.clone().requires_grad_()
    x_ref = x.clone().requires_grad_()
    out_op = sparsify(kind, x_op, param, rescale, ste)
    out_ref = reference_sparsify(kind, x_ref, param, rescale, ste)
    assert_identical(out_op, out_ref)
    out_op.backward(grad)
    out_ref.backward(grad)
    assert_identical(x_op.grad, x_ref.grad)


# --- invalid arguments --------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 9], ids=lambda k: f"k{k}")
def test_topk_sparsify_rejects_k_out_of_range(k):
    with raises_naming(ValueError, "qsparse.topk_sparsify", f"k={k}", "[1, 8]"):
        qsparse.topk_sparsify(torch.randn(3, 8), k, False, True)


@pytest.mark.parametrize(
    ("n", "m", "parts"),
    [
        pytest.param(5, 4, ("1 <= n <= m", "(5, 4)"), id="n-above-m"),
        pytest.param(0, 4, ("1 <= n <= m", "(0, 4)"), id="n-zero"),
        pytest.param(2, 3, ("last dimension (8)", "multiple of m=3"), id="D-not-multiple"),
    ],
)
def test_block_sparsify_rejects_bad_pattern(n, m, parts):
    with raises_naming(ValueError, "qsparse.block_sparsify", *parts):
        qsparse.block_sparsify(torch.randn(3, 8), n, m, False, True)


@pytest.mark.parametrize("kind", ["topk", "block"])
def test_sparsify_rejects_integer_input(kind):
    name = f"{kind}_sparsify"
    with raises_naming(TypeError, f"qsparse.{name}", "'x'", "int64", "float32, bfloat16"):
        sparsify(kind, torch.ones(3, 8, dtype=torch.int64), (2,) if kind == "topk" else (2, 4),
                 False, True)

