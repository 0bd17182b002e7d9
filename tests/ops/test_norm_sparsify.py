"""``qsparse::norm_sparsify``: the fused norm + sparsify (+ rescale, + int8) op.

Forward must equal the unfused reference composition bit for bit (the op is defined as that
composition); backward is the exact norm gradient behind a straight-through sparsifier,
checked against autograd through the reference.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.library import opcheck

import qsparse_compile  # noqa: F401  (registers torch.ops.qsparse)
from qsparse_compile import reference

qsparse = torch.ops.qsparse
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _inputs(norm: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen).to(dtype).requires_grad_()
    d = shape[-1]
    weight = (1 + 0.5 * torch.randn(d, generator=gen)).to(dtype).requires_grad_()
    bias = (0.1 * torch.randn(d, generator=gen)).to(dtype).requires_grad_() \
        if norm == "layer" else None
    return x, weight, bias


SPARSIFY = {"topk": lambda d: (max(1, d // 3), 0, 0), "block2:4": lambda d: (0, 2, 4)}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("norm", ["rms", "layer"])
@pytest.mark.parametrize("method", list(SPARSIFY))
@pytest.mark.parametrize("rescale,quant,ste", [(False, False, True), (True, True, False)],
                         ids=["plain", "rescale-int8-no-ste"])
def test_opcheck(dtype, norm, method, rescale, quant, ste):
    x, weight, bias = _inputs(norm, (3, 8), dtype, seed=0)
    k, n, m = SPARSIFY[method](8)
    opcheck(qsparse.norm_sparsify.default,
            (x, norm, weight, bias, 1e-5, k, n, m, rescale, quant, ste))


@settings(max_examples=40, deadline=None)
@given(
    norm=st.sampled_from(["rms", "layer"]),
    method=st.sampled_from(list(SPARSIFY)),
    lead=st.sampled_from([(1,), (5,), (2, 3)]),
    groups=st.integers(1, 6),
    dtype=st.sampled_from(DTYPES),
    with_weight=st.booleans(),
    rescale=st.booleans(),
    quant=st.booleans(),
    ste=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_matches_reference_forward_and_backward(norm, method, lead, groups, dtype, with_weight,
                                                rescale, quant, ste, seed):
    d = 4 * groups
    x, weight, bias = _inputs(norm, (*lead, d), dtype, seed)
    if not with_weight:
        weight = bias = None
    k, n, m = SPARSIFY[method](d)
    args = (norm, weight, bias, 1e-5, k, n, m, rescale, quant, ste)
    out = qsparse.norm_sparsify(x, *args)
    ref = reference.norm_sparsify(x, *args)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert torch.equal(out, ref), (out - ref).abs().max()

    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(
        out.dtype)
    params = [t for t in (x, weight, bias) if t is not None]
    got = torch.autograd.grad(out, params, grad)
    want = torch.autograd.grad(ref, params, grad)
    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
    for name, a, b in zip(("x", "weight", "bias"), got, want, strict=False):
        torch.testing.assert_close(a, b, atol=tol * max(1.0, b.abs().max().item()), rtol=tol,
                                   msg=lambda msg, name=name: f"grad {name}: {msg}")


def test_ste_passes_gradient_of_norm_only():
    """ste=True, no rescale: the input gradient is the norm's gradient of the upstream one."""
    x, weight, _ = _inputs("rms", (4, 16), torch.float32, seed=3)
    out = qsparse.norm_sparsify(x, "rms", weight, None, 1e-6, 2, 0, 0, False, False, True)
    grad = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, x, grad)
    (want,) = torch.autograd.grad(reference.rms_norm(x, weight, 1e-6), x, grad)
    torch.testing.assert_close(got, want)
    assert (out != 0).sum(-1).eq(2).all()


@pytest.mark.parametrize("bad,match", [
    (dict(norm="batch"), "norm must be one of"),
    (dict(k=17), "k \\(entries kept per row\\) must be in \\[1, 16\\]"),
    (dict(k=0, n=2, m=5), "multiple of m=5"),
])
def test_bad_arguments_name_the_problem(bad, match):
    args = dict(norm="rms", weight=None, bias=None, eps=1e-5, k=4, n=0, m=0, rescale=False,
                quant=False, ste=True) | bad
    with pytest.raises(ValueError, match=match):
        qsparse.norm_sparsify(torch.randn(2, 16), **args)
