"""``torch.ops.qsparse_triton.*``: registration, tracing, export.

Under the interpreter the ops are plain custom ops (``wrap_triton`` cannot capture interpreted
kernels); on a GPU they are ``triton_op``s. Either way they must pass ``opcheck``, trace with
``torch.compile`` and ``torch.export``, and compute what the kernels compute. Inputs are built
on ``triton_cases.DEVICE``, so a ``cuda`` run checks the ``triton_op`` registration.
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton", reason="triton is not installed: the Triton kernel tests need it")

import torch  # noqa: E402
from torch.library import opcheck  # noqa: E402
from triton_cases import (  # noqa: E402
    DEVICE,
    DTYPES,
    assert_bits_equal,
    cpu_reference,
    dtype_id,
    randn,
)

import qsparse_compile  # noqa: E402, F401  (registers torch.ops.qsparse)
from qsparse_compile.codegen import triton as qtriton  # noqa: E402
from qsparse_compile.codegen.triton import launch  # noqa: E402

ops = torch.ops.qsparse_triton
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)


def _x(dtype, *shape, seed=0):
    return randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def test_registration_mode():
    """The interpreter (CPU test device) registers plain custom ops; compiled kernels (CUDA test
    device) ``triton_op``s where this PyTorch has them."""
    assert launch.HAS_TRITON_OP == (hasattr(torch.library, "triton_op")
                                    and hasattr(torch.library, "wrap_triton"))
    if DEVICE.type == "cpu":
        assert launch.interpreting() and not launch.USE_TRITON_OP
    else:
        assert not launch.interpreting() and launch.USE_TRITON_OP == launch.HAS_TRITON_OP
    for name in ("topk_sparsify", "topk_mask", "block_sparsify", "block_mask", "norm_sparsify",
                 "sparse_gemv", "packed_gemv"):
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
                      cpu_reference(qtriton.topk_sparsify_reference, x, 4))
    assert torch.equal(ops.block_mask(x, 2, 4),
                       cpu_reference(qsparse_compile.reference.block_mask, x, 2, 4))
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
