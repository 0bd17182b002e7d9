"""The 2:4 semi-structured prefill product: its capability gate, and its dense fallback.

The semi-structured branch runs only on an sm80+ GPU (the last test, skipped elsewhere); on a
CPU-only machine these tests check the gate's decisions as a pure function and that the CUDA
implementation of ``qsparse::block_sparse_linear``, given CPU tensors, takes the dense fallback
and equals the reference. The fallback and gradient tests run on the test device
(``QSPARSE_TEST_DEVICE``, see ``tests/devices.py``): with ``cuda``, on CUDA tensors too small for
the semi-structured branch.
"""

from __future__ import annotations

import pytest
import torch
from devices import selected_device

from qsparse_compile import reference
from qsparse_compile.codegen import semi_structured as ss
from qsparse_compile.codegen.semi_structured import cuda_block_sparse_linear

DEVICE = selected_device()


@pytest.mark.parametrize("n,m,fits", [
    (2, 4, True), (1, 4, True), (1, 2, True), (2, 8, True), (1, 8, True), (2, 32, True),
    (3, 4, False), (4, 4, False), (2, 2, False), (16, 32, False), (3, 8, False),
    (1, 1, False), (1, 3, False), (1, 6, False), (0, 4, False), (5, 4, False),
])
def test_pattern_fits_2_4(n, m, fits):
    assert ss.pattern_fits_2_4(n, m) is fits


ELIGIBLE = dict(device_type="cuda", capability=(8, 0), dtype=torch.float16,
                weight_dtype=torch.float16, rows=64, in_features=128, n=2, m=4, hip=False,
                min_rows=32, min_cols=64)


@pytest.mark.parametrize("change,expected", [
    ({}, True),
    ({"capability": (9, 0), "dtype": torch.bfloat16, "weight_dtype": torch.bfloat16}, True),
    ({"rows": 33}, True),  # padded to 64 rows
    ({"n": 1, "m": 2}, True),
    ({"device_type": "cpu"}, False),
    ({"capability": (7, 5)}, False),  # no sparse tensor cores before Ampere
    ({"capability": None}, False),
    ({"hip": True}, False),
    ({"dtype": torch.float32, "weight_dtype": torch.float32}, False),
    ({"weight_dtype": torch.bfloat16}, False),
    ({"rows": 8}, False),  # decode-sized
    ({"in_features": 96}, False),  # not a multiple of the column multiple
    ({"in_features": 32}, False),
    ({"n": 16, "m": 32}, False),
], ids=lambda v: "-".join(f"{k}={v}" for k, v in v.items()) if isinstance(v, dict) else str(v))
def test_gate_decisions(change, expected):
    assert ss.semi_structured_eligible(**{**ELIGIBLE, **change}) is expected


def _masked(rows: int, d: int, n: int, m: int, dtype=torch.float32) -> torch.Tensor:
    x = torch.randn(rows, d, generator=torch.Generator().manual_seed(rows)).to(dtype)
    return reference.block_sparsify(x, n, m, "none")


def test_gate_is_false_on_cpu_tensors():
    """CPU tensors whatever the test device: the gate's answer for them."""
    x = _masked(64, 128, 2, 4, torch.float16)
    assert not ss.semi_structured_supported(x, torch.randn(96, 128).half(), 2, 4)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_cuda_implementation_falls_back_to_dense_on_the_masked_input(bias):
    x = _masked(6, 32, 2, 4).reshape(2, 3, 32).to(DEVICE)
    w = torch.randn(12, 32, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    b = torch.randn(12).to(DEVICE) if bias else None
    expected = x @ w.t() + (b if bias else 0)
    got = cuda_block_sparse_linear(x, w, b, 2, 4)
    torch.testing.assert_close(got, expected)
    assert torch.equal(got, torch.ops.qsparse.block_sparse_linear(x, w, b, 2, 4))
    assert torch.equal(got, torch.ops.qsparse.sparse_linear(x, w, b))


def test_op_checks_and_gradients():
    from torch.library import opcheck

    x = _masked(5, 16, 2, 4).to(DEVICE).requires_grad_()
    w = torch.randn(7, 16).to(DEVICE).requires_grad_()
    b = torch.randn(7).to(DEVICE).requires_grad_()
    opcheck(torch.ops.qsparse.block_sparse_linear, (x, w, b, 2, 4))
    with pytest.raises(ValueError, match=r"qsparse.block_sparse_linear: the last dimension "
                                         r"\(16\) must be a multiple of m=3"):
        torch.ops.qsparse.block_sparse_linear(x, w, b, 1, 3)
    torch.ops.qsparse.block_sparse_linear(x, w, b, 2, 4).sum().backward()
    grads = [t.grad.clone() for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    torch.nn.functional.linear(x, w, b).sum().backward()
    for got, t in zip(grads, (x, w, b), strict=True):
        torch.testing.assert_close(got, t.grad)


def _sm80() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


@pytest.mark.skipif(not _sm80(), reason="the 2:4 semi-structured branch needs an sm80+ GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_semi_structured_branch_on_gpu(dtype):
    """GPU only: the sparse product with the activation compressed along its features equals
    the dense product on the masked input (fp32 accumulation in both, one rounding apart); the
    op's straight-through backward is the dense product's."""
    x = _masked(70, 128, 2, 4, dtype).cuda()  # 70 rows: padded to the row multiple
    w = torch.randn(96, 128, device="cuda").to(dtype)
    b = torch.randn(96, device="cuda").to(dtype)
    assert ss.semi_structured_supported(x, w, 2, 4)
    expected = (x.float() @ w.float().t() + b.float()).to(dtype)
    torch.testing.assert_close(ss.semi_structured_linear(x, w, b), expected, atol=2e-2,
                               rtol=2e-2)
    torch.testing.assert_close(cuda_block_sparse_linear(x, w, b, 2, 4), expected, atol=2e-2,
                               rtol=2e-2)
    leaves = [t.detach().requires_grad_() for t in (x, w, b)]
    torch.ops.qsparse.block_sparse_linear(*leaves, 2, 4).float().sum().backward()
    grads = [t.grad for t in leaves]
    dense = [t.detach().requires_grad_() for t in (x, w, b)]
    torch.nn.functional.linear(*dense).float().sum().backward()
    for got, want in zip(grads, (t.grad for t in dense), strict=True):
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
