"""The ``qsparse`` ops inside ``torch.autocast``: they compute as ``F.linear`` would.

Each op's floating operands are cast to the autocast dtype and the op runs on the cast values,
so an op under autocast equals the op on explicitly cast inputs, forward and backward (the
gradient reaches the fp32 leaves through the cast). ``norm_sparsify`` equals the unfused chain
it stands for, under autocast.
"""

from __future__ import annotations

import pytest
import torch

import qsparse_compile  # noqa: F401  (registers torch.ops.qsparse)
from qsparse_compile.ops.autocast import CAST_OPS

qsparse = torch.ops.qsparse
AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)


def _leaf(*shape: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).requires_grad_()


def _cases():
    """op name -> (tensor operand shapes, the other arguments)."""
    return {
        "sparse_linear": ([(3, 32), (8, 32), (8,)], []),
        "block_sparse_linear": ([(3, 32), (8, 32), (8,)], [2, 4]),
        "topk_sparsify": ([(3, 32)], [5, False, True]),
        "block_sparsify": ([(3, 32)], [2, 4, True, True]),
        "topk_mask": ([(3, 32)], [5]),
        "block_mask": ([(3, 32)], [2, 4]),
        "int8_fake_quant": ([(3, 32)], []),
        "ternary_fake_quant": ([(8, 32)], []),
    }


def test_every_cast_op_has_a_case():
    assert set(_cases()) == set(CAST_OPS)


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
@pytest.mark.parametrize("name", CAST_OPS)
def test_op_under_autocast_equals_the_op_on_cast_operands(name, dtype):
    shapes, rest = _cases()[name]
    op = getattr(qsparse, name)
    leaves = [_leaf(*s, seed=i) for i, s in enumerate(shapes)]
    with torch.autocast("cpu", dtype=dtype):
        got = op(*leaves, *rest)
    expected = op(*[t.to(dtype) for t in leaves], *rest)
    if got.is_floating_point():
        assert got.dtype == dtype
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    if not got.is_floating_point():
        return
    got.float().square().sum().backward()
    grads = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    expected.float().square().sum().backward()
    for g, t in zip(grads, leaves, strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, t.grad, atol=0, rtol=0)


@pytest.mark.parametrize("norm", ["rms", "layer"])
@pytest.mark.parametrize("m", [0, 4], ids=["topk", "block2:4"])
def test_norm_sparsify_under_autocast_is_the_unfused_chain(norm, m):
    x = _leaf(3, 32, seed=0)
    weight = (1 + 0.5 * _leaf(32, seed=1)).detach().requires_grad_()
    bias = _leaf(32, seed=2) if norm == "layer" else None
    k, n = (7, 0) if m == 0 else (0, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = qsparse.norm_sparsify(x, norm, weight, bias, 1e-6, k, n, m, False, True, True)
        if norm == "rms":
            xf = x.float()
            h = weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6))
        else:
            h = torch.nn.functional.layer_norm(x, (32,), weight, bias, 1e-6)
        chain = qsparse.block_sparsify(h, n, m, False, True) if m else \
            qsparse.topk_sparsify(h, k, False, True)
        expected = qsparse.int8_fake_quant(chain)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    got.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_outside_autocast_nothing_is_cast():
    x, w = _leaf(3, 32, seed=0), _leaf(8, 32, seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert qsparse.sparse_linear(x, w, None).dtype == torch.float32
