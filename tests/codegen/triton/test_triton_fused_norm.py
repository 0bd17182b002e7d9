"""Fused RMSNorm / LayerNorm + top-K or N:M + rescale + int8 kernel against the reference.

The kernel computes the norm with a correctly rounded ``1 / sqrt`` and its own summation order,
PyTorch with its vectorised ``rsqrt`` and another order, so the normalised activation ``h`` may
differ by one rounding of the dtype (for LayerNorm in fp32, also by the cancellation in
PyTorch's ``x * rstd - mean * rstd``). The checks follow from that:

* the mask keeps exactly ``k`` (or ``n`` per group) entries and is a top-K of the reference's
  ``h`` up to that rounding; where ``h`` is exact in both (RMSNorm of values from a tiny set of
  powers of two, with such weights) the mask equals the reference's bit for bit;
* the values equal the reference pipeline applied with the kernel's mask, to within a rounding
  (one int8 step where quantization follows a rescale).

Inputs are built on ``triton_cases.DEVICE``; the references (and the LayerNorm cancellation bound,
derived for PyTorch's CPU LayerNorm) are computed on the CPU (``cpu_reference``), so the bounds
compare the kernel with the same values on either device.
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton", reason="triton is not installed: the Triton kernel tests need it")

import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from triton_cases import (  # noqa: E402
    DTYPES,
    TIES,
    assert_close_ulps,
    cpu_reference,
    dtype_id,
    on_device,
    randn,
    rows_of,
    ulp,
    widths,
)

from qsparse_compile import reference, topk_count  # noqa: E402
from qsparse_compile.codegen.triton import fused_norm  # noqa: E402

dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
norms = pytest.mark.parametrize("norm", ["rms", "layer"])
FLAGS = [(False, False), (True, False), (False, True), (True, True)]
FLAG_IDS = ["plain", "rescale", "quant", "rescale+quant"]
EPS = 1e-5


def _ulps(dtype: torch.dtype, norm: str) -> float:
    """How far the kernel's h may sit from the reference's, in units of eps(dtype)."""
    if dtype == torch.float32:
        return 16.0 if norm == "layer" else 8.0
    return 2.0


def _cancellation(x, norm, weight):
    """Per-row absolute error LayerNorm's ``x - mean`` can carry (0 for RMSNorm).

    PyTorch's CPU LayerNorm computes ``x * rstd - mean * rstd``; when the deviations are small
    next to ``|x|`` that subtraction loses about ``|x| rstd`` ulps, so the two implementations
    can differ by that much, however small ``h`` is.
    """
    if norm != "layer":
        return torch.zeros(*x.shape[:-1], 1, dtype=torch.float64)
    xd = x.double()
    rstd = (xd.var(-1, unbiased=False, keepdim=True) + EPS).rsqrt()
    w = 1.0 if weight is None else weight.double().abs().max().item()
    return 8 * torch.finfo(torch.float32).eps * rstd * xd.abs().amax(-1, keepdim=True) * w


def _assert_near_topk(mask, h, k, n, m, ulps, atol):
    """Exact count per unit; no dropped |h| above a kept one by more than the rounding slack."""
    mag = h.double().abs()
    slack = 2 * (ulps * ulp(h.dtype) * mag.amax(-1, keepdim=True) + atol)
    slack = slack.expand(mag.shape)
    if m:
        mag, keep, slack = mag.reshape(-1, m), mask.reshape(-1, m), slack.reshape(-1, m)
        count = n
    else:
        d = h.shape[-1]
        mag, keep, slack = mag.reshape(-1, d), mask.reshape(-1, d), slack.reshape(-1, d)
        count = k
    assert bool((keep.sum(-1) == count).all()), f"wrong count per row: {keep.sum(-1)}"
    kept_min = torch.where(keep, mag, torch.inf).amin(-1)
    dropped_max = torch.where(keep, -torch.inf, mag).amax(-1)
    bad = kept_min < dropped_max - slack[:, 0]
    assert not bool(bad.any()), f"dropped entries outrank kept ones in rows {bad.nonzero()}"


def _expected(h, mask, rescale, quant):
    out = torch.where(mask, h, 0)
    if rescale:
        out = (out.float() * reference.l2_rescale_factor(h, mask)).to(h.dtype)
    return reference.int8_fake_quant(out) if quant else out


def _check(x, norm, weight, bias, k, n, m, rescale, quant, exact_mask=False):
    out, mask = fused_norm.norm_sparsify(x, norm, weight, bias, EPS, k, n, m, rescale, quant,
                                         return_mask=True)
    h = cpu_reference(fused_norm.normalise_reference, x, norm, weight, bias, EPS)
    assert out.dtype == h.dtype and out.shape == x.shape
    ulps = _ulps(h.dtype, norm)
    cancel = cpu_reference(_cancellation, x, norm, weight)
    if exact_mask:
        ref_mask = (cpu_reference(reference.block_mask, h, n, m) if m else
                    cpu_reference(reference.topk_mask, h, k))
        assert torch.equal(mask, ref_mask)
    _assert_near_topk(mask, h, k, n, m, ulps, cancel)
    expected = cpu_reference(_expected, h, mask, rescale, quant)
    atol = cancel * (2.0 if rescale else 1.0)
    if quant:
        # one int8 step of the row's scale, for a pre-quant value one rounding off
        atol = atol + expected.double().abs().amax(-1, keepdim=True) / 127.0 * 1.01
    assert_close_ulps(out, expected, ulps=2 * ulps if rescale else ulps, atol=atol)


@st.composite
def _cases(draw, dtype, norm):
    """(x, weight, bias, k, n, m, exact): finite rows; RMS on powers of two is exact."""
    block = draw(st.booleans())
    n, m = draw(st.sampled_from(((2, 4), (1, 3), (3, 8), (4, 4)))) if block else (0, 0)
    d = draw(widths(multiple_of=m or 1, max_d=48))
    palette = draw(st.sampled_from(("ties", "mixed")))
    x = draw(rows_of(dtype, d, special=False, palette=palette), label="x")
    w_kind = draw(st.sampled_from(("none", "same", "fp32") if norm == "rms" else
                                  ("none", "same")))
    weight = bias = None
    if w_kind != "none":
        w_dtype = torch.float32 if w_kind == "fp32" else dtype
        vals = st.sampled_from(TIES) if palette == "ties" else st.floats(-2.0, 2.0, width=32)
        weight = on_device(torch.tensor(draw(st.lists(vals, min_size=d, max_size=d)),
                                        dtype=torch.float32).to(w_dtype))
        if norm == "layer" and draw(st.booleans()):
            bias = on_device(torch.tensor(draw(st.lists(st.floats(-1.0, 1.0, width=32),
                                                        min_size=d, max_size=d))).to(dtype))
    k = 0 if block else topk_count(d, draw(st.sampled_from((0.0, 0.4, 0.5, 0.8))))
    exact = norm == "rms" and palette == "ties"
    return x, weight, bias, k, n, m, exact


@dtypes
@norms
@pytest.mark.parametrize("rescale,quant", FLAGS, ids=FLAG_IDS)
@settings(max_examples=3)
@given(data=st.data())
def test_fused_norm_sparsify_matches_reference(dtype, norm, rescale, quant, data):
    x, weight, bias, k, n, m, exact = data.draw(_cases(dtype, norm))
    _check(x, norm, weight, bias, k, n, m, rescale, quant, exact_mask=exact)


@pytest.mark.parametrize("dtype,norm", [
    pytest.param(torch.bfloat16, "rms", id="rms-bf16"),
    pytest.param(torch.float16, "layer", id="layer-fp16"),
    pytest.param(torch.float32, "layer", id="layer-fp32"),
])
def test_fused_norm_multi_tile_rows(dtype, norm):
    """Rows wider than a tile: the statistics, selection and write passes loop over tiles."""
    g = torch.Generator().manual_seed(5)
    x = randn(2, 16, dtype=dtype, generator=g)
    x[1, 3:9] = x[1, 2]  # ties spanning the tile border
    weight = on_device(torch.rand(16, generator=g).to(dtype) + 0.5)
    bias = randn(16, dtype=dtype, generator=g) if norm == "layer" else None
    h = cpu_reference(fused_norm.normalise_reference, x, norm, weight, bias, EPS)
    cancel = cpu_reference(_cancellation, x, norm, weight)
    for k, n, m, chunk in ((7, 0, 0, 8), (0, 2, 4, 2)):
        out, mask = fused_norm.norm_sparsify(x, norm, weight, bias, EPS, k, n, m, True, True,
                                             return_mask=True, chunk=chunk)
        whole, whole_mask = fused_norm.norm_sparsify(x, norm, weight, bias, EPS, k, n, m, True,
                                                     True, return_mask=True)
        # the same rows tiled differently: the same selection, values within a rounding
        assert torch.equal(mask, whole_mask)
        _assert_near_topk(mask, h, k, n, m, _ulps(dtype, norm), cancel)
        step = whole.double().abs().amax(-1, keepdim=True) / 127.0 * 1.01
        assert_close_ulps(out, whole, ulps=2.0, atol=step)
        assert_close_ulps(out, cpu_reference(_expected, h, mask, True, True),
                          ulps=2 * _ulps(dtype, norm), atol=step + 2 * cancel)


@dtypes
def test_rms_of_zero_row_keeps_the_first_k(dtype):
    x = on_device(torch.zeros(2, 9, dtype=dtype))
    x[1] = on_device(torch.arange(9, dtype=dtype))
    out, mask = fused_norm.norm_sparsify(x, "rms", None, None, EPS, 4, return_mask=True)
    assert mask[0].tolist() == [True] * 4 + [False] * 5
    assert not out[0].any()
    assert mask[1].tolist() == [False] * 5 + [True] * 4


def test_fused_norm_rejects_bad_arguments():
    x = randn(2, 8)

    def ones(d):
        return on_device(torch.ones(d))

    with pytest.raises(ValueError, match="norm must be one of"):
        fused_norm.norm_sparsify(x, "batch", None, None, EPS, 4)
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        fused_norm.norm_sparsify(x, "rms", ones(7), None, EPS, 4)
    with pytest.raises(ValueError, match="takes no bias"):
        fused_norm.norm_sparsify(x, "rms", None, ones(8), EPS, 4)
    with pytest.raises(TypeError, match="norm='layer' needs weight and bias"):
        fused_norm.norm_sparsify(x.half(), "layer", ones(8), None, EPS, 4)
    with pytest.raises(ValueError, match="k=9"):
        fused_norm.norm_sparsify(x, "rms", None, None, EPS, 9)
    with pytest.raises(ValueError, match="multiple of m=3"):
        fused_norm.norm_sparsify(x, "layer", None, None, EPS, 0, 1, 3)
