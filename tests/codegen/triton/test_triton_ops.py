"""``torch.ops.qsparse_triton.*`` registration, tracing, export, and the CUDA dispatch table.

Under the interpreter the ops are plain custom ops (``wrap_triton`` cannot capture interpreted
kernels); on a GPU they are ``triton_op``s. Either way they must pass ``opcheck``, trace with
``torch.compile`` and ``torch.export``, and compute what the kernels compute.
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton", reason="triton is not installed: the Triton kernel tests need it")

import torch  # noqa: E402
from torch.library import opcheck  # noqa: E402
from triton_cases import DTYPES, assert_bits_equal, dtype_id  # noqa: E402

import qsparse_compile  # noqa: E402, F401  (registers torch.ops.qsparse)
from qsparse_compile.codegen import triton as qtriton  # noqa: E402
from qsparse_compile.codegen.triton import dispatch, launch  # noqa: E402

ops = torch.ops.qsparse_triton
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)


def _x(dtype, *shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def test_registration_mode():
    assert launch.HAS_TRITON_OP == (hasattr(torch.library, "triton_op")
                                    and hasattr(torch.library, "wrap_triton"))
    assert launch.interpreting() and not launch.USE_TRITON_OP
    for name in ("topk_sparsify", "topk_mask", "block_sparsify", "block_mask", "norm_sparsify",
                 "sparse_gemv"):
        assert hasattr(ops, name)


def test_opcheck():
    """Schemas, fakes (shapes, dtypes incl. the promoted RMSNorm output) and dispatch."""
    x = _x(torch.bfloat16, 3, 24)
    w = _x(torch.bfloat16, 24, seed=1)
    opcheck(ops.topk_sparsify, (x, 5, True, True))
    opcheck(ops.topk_mask, (x.t(), 2))
    opcheck(ops.block_sparsify, (x.half(), 2, 4, False, True))
    opcheck(ops.block_mask, (x.reshape(2, 3, 12), 3, 4))
    opcheck(ops.norm_sparsify, (x, "rms", w.float(), None, 1e-6, 6, 0, 0, True, False))
    opcheck(ops.norm_sparsify, (x, "layer", w, w.flip(0), 1e-5, 0, 2, 4, False, True))
    opcheck(ops.sparse_gemv, (x[:2].float(), _x(torch.float32, 24, 7, seed=2), None))


@dtypes
def test_ops_compute_the_kernels(dtype):
    x = _x(dtype, 2, 3, 16)
    assert_bits_equal(ops.topk_sparsify(x, 4, False, False),
                      qtriton.topk_sparsify_reference(x, 4))
    assert torch.equal(ops.block_mask(x, 2, 4), qsparse_compile.reference.block_mask(x, 2, 4))
    wt = _x(dtype, 16, 5, seed=1)
    assert torch.equal(ops.sparse_gemv(x, wt, None), qtriton.sparse_gemv(x, wt))


class _DecodeBlock(torch.nn.Module):
    """RMSNorm + top-K + int8 fused, then the sparse GEMV: what a decode step runs."""

    def __init__(self, dtype):
        super().__init__()
        self.norm_weight = torch.nn.Parameter(_x(dtype, 32, seed=4))
        self.weight_t = torch.nn.Parameter(_x(dtype, 32, 12, seed=5))
        self.bias = torch.nn.Parameter(_x(dtype, 12, seed=6))

    def forward(self, x):
        h = ops.norm_sparsify(x, "rms", self.norm_weight, None, 1e-6, 13, 0, 0, True, True)
        return ops.sparse_gemv(h, self.weight_t, self.bias) * 2


@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=dtype_id)
def test_compile_and_export(dtype):
    block = _DecodeBlock(dtype).requires_grad_(False)
    x = _x(dtype, 2, 32, seed=7)
    eager = block(x)
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), eager)
    dynamic = torch.compile(block, backend="aot_eager", fullgraph=True, dynamic=True)
    for rows in (1, 3):  # fakes with a symbolic token count
        xr = _x(dtype, rows, 32, seed=rows)
        assert torch.equal(dynamic(xr), block(xr))
    exported = torch.export.export(block, (x,))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert "qsparse_triton.norm_sparsify.default" in targets
    assert "qsparse_triton.sparse_gemv.default" in targets
    assert torch.equal(exported.module()(x), eager)


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64], ids=lambda d: str(d)[6:])
def test_dispatch_implementations_match_the_qsparse_ops(dtype):
    """What register_cuda_kernels installs computes what the ops compute (fp64: ATen path)."""
    x = _x(dtype, 3, 16)
    x[1, :8] = 1.0
    impl = dispatch.IMPLEMENTATIONS
    q = torch.ops.qsparse
    assert torch.equal(impl["qsparse::topk_mask"](x, 5), q.topk_mask(x, 5))
    assert torch.equal(impl["qsparse::block_mask"](x, 2, 4), q.block_mask(x, 2, 4))
    assert_bits_equal(impl["qsparse::topk_sparsify"](x, 5, False, True),
                      q.topk_sparsify(x, 5, False, True))
    assert_bits_equal(impl["qsparse::block_sparsify"](x, 1, 4, False, False),
                      q.block_sparsify(x, 1, 4, False, False))
    scaled = impl["qsparse::topk_sparsify"](x, 5, True, True)
    torch.testing.assert_close(scaled, q.topk_sparsify(x, 5, True, True))
    with pytest.raises(ValueError, match="qsparse.topk_mask: k"):
        impl["qsparse::topk_mask"](x, 17)


NORM_CASES = {
    "rms-topk-l2-int8": ("rms", True, False, (13, 0, 0), True, True),
    "rms-2:4": ("rms", True, False, (0, 2, 4), False, False),
    "rms-no-weight": ("rms", False, False, (8, 0, 0), False, False),
    "layer-1:4-int8": ("layer", True, True, (0, 1, 4), False, True),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("case", list(NORM_CASES.values()), ids=list(NORM_CASES))
def test_dispatch_norm_sparsify_is_the_fused_kernel(case, dtype, monkeypatch):
    """The CUDA implementation of qsparse::norm_sparsify runs the fused Triton kernel (the
    ATen composition is never called) and matches the op within one rounding of the dtype."""
    norm, has_weight, has_bias, (k, n, m), rescale, quant = case
    x = _x(dtype, 3, 32, seed=2)
    w = _x(dtype, 32, seed=3) if has_weight else None
    b = _x(dtype, 32, seed=4) if has_bias else None
    args = (norm, w, b, 1e-5, k, n, m, rescale, quant, True)
    expected = torch.ops.qsparse.norm_sparsify(x, *args)
    monkeypatch.setattr(dispatch, "compose_norm_sparsify", None)  # calling it would fail
    got = dispatch.IMPLEMENTATIONS["qsparse::norm_sparsify"](x, *args)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    if quant:  # one rounding apart may move a value by one int8 step of its row's scale
        step = expected.float().abs().amax(-1, keepdim=True) / 127
        assert ((got.float() - expected.float()).abs() <= 1.01 * step).all()
    else:
        tolerance = {"atol": 2e-2, "rtol": 2e-2} if dtype == torch.bfloat16 else {}
        torch.testing.assert_close(got, expected, **tolerance)
        assert (got != 0).sum(-1).tolist() == (expected != 0).sum(-1).tolist()


def test_dispatch_norm_sparsify_falls_back_where_the_kernel_does_not_apply():
    """fp64, and a LayerNorm whose parameters have another dtype than x: the ATen composition,
    bit for bit; bad arguments get the op's own messages."""
    impl = dispatch.IMPLEMENTATIONS["qsparse::norm_sparsify"]
    q = torch.ops.qsparse
    x64 = _x(torch.float64, 2, 16)
    args = ("rms", _x(torch.float64, 16, seed=1), None, 1e-6, 5, 0, 0, True, False, True)
    assert torch.equal(impl(x64, *args), q.norm_sparsify(x64, *args))
    x16 = _x(torch.bfloat16, 2, 16)
    w32 = _x(torch.float32, 16, seed=1)
    assert not dispatch.fused_norm_applies(x16, "layer", w32, None)
    args = ("layer", w32, w32.flip(0), 1e-5, 0, 2, 4, False, True, True)
    assert torch.equal(impl(x16, *args), q.norm_sparsify(x16, *args))
    with pytest.raises(ValueError, match="qsparse.norm_sparsify: k"):
        impl(x16, "rms", None, None, 1e-6, 17, 0, 0, False, False, True)
    with pytest.raises(ValueError, match="norm must be one of"):
        impl(x16, "batch", None, None, 1e-6, 4, 0, 0, False, False, True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU-only machine")
def test_register_cuda_kernels_refuses_without_cuda():
    with pytest.raises(RuntimeError, match="no CUDA device"):
        dispatch.register_cuda_kernels()
    assert not dispatch.registered()
