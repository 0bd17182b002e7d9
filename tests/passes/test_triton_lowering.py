"""``retarget_to_triton``: a graph's own ``qsparse`` nodes call the Triton kernels.

Graphs are traced on fake tensors and retargeted, then run on real tensors of the test device
(``QSPARSE_TEST_DEVICE``: CPU tensors with the kernels in Triton's interpreter,
``TRITON_INTERPRET=1`` from ``tests/conftest.py``, or CUDA tensors with compiled kernels), against
the untouched graph on the same device. The retargeted graph
computes what the ``qsparse`` ops compute; nodes the kernels do not take keep the ``qsparse``
op; nothing is registered for the process (an untouched graph still runs the ATen ops).
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton", reason="triton is not installed: the Triton path needs it")

import torch  # noqa: E402
from devices import selected_device  # noqa: E402
from op_counts import op_counts  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

import qsparse_compile  # noqa: E402, F401  (registers torch.ops.qsparse)
from qsparse_compile.codegen.triton.fused_norm import fused_norm_applies  # noqa: E402
from qsparse_compile.passes.normalise import trace_normalised  # noqa: E402
from qsparse_compile.passes.triton_lowering import retarget_to_triton  # noqa: E402

q = torch.ops.qsparse
DEVICE = selected_device()


def _x(dtype, *shape, seed=0):
    """Seeded values drawn on the CPU, on the test device (the same values on either)."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEVICE)


def _traced(fn, *args):
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        return trace_normalised(fn, [mode.from_tensor(a) for a in args])


def _namespaces(gm) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload):
            out[n.target.namespace] = out.get(n.target.namespace, 0) + 1
    return out


def _masks_and_sparsify(x):
    return (q.topk_mask.default(x, 5), q.block_mask.default(x, 2, 4),
            q.topk_sparsify.default(x, 5, False, True),
            q.block_sparsify.default(x, 1, 4, False, False),
            q.topk_sparsify.default(x, 5, True, True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=lambda d: str(d)[6:])
def test_retargeted_graph_computes_the_qsparse_ops(dtype):
    x = _x(dtype, 3, 16)
    x[1, :8] = 1.0  # ties
    gm = _traced(_masks_and_sparsify, x)
    expected = gm(x)
    assert retarget_to_triton(gm.graph) == 5
    gm.recompile()
    assert _namespaces(gm) == {"qsparse_triton": 5}
    got = gm(x)
    for a, b in zip(got[:4], expected[:4], strict=True):
        assert torch.equal(a, b)
    torch.testing.assert_close(got[4], expected[4])  # the L2 rescale: one rounding apart


def test_float64_keeps_the_aten_ops():
    x = _x(torch.float64, 3, 16)
    gm = _traced(_masks_and_sparsify, x)
    assert retarget_to_triton(gm.graph) == 0
    assert _namespaces(gm) == {"qsparse": 5}


@pytest.mark.parametrize("case", [
    ("rms", True, False, (13, 0, 0), True, True),
    ("rms", True, False, (0, 2, 4), False, False),
    ("layer", True, True, (0, 1, 4), False, True)], ids=["rms-topk-l2-int8", "rms-2:4",
                                                         "layer-1:4-int8"])
def test_norm_sparsify_becomes_the_fused_kernel(case):
    norm, has_weight, has_bias, (k, n, m), rescale, quant = case
    dtype = torch.bfloat16
    x = _x(dtype, 3, 32, seed=2)
    w = _x(dtype, 32, seed=3) if has_weight else None
    b = _x(dtype, 32, seed=4) if has_bias else None

    def fn(x, w, b):
        return q.norm_sparsify.default(x, norm, w, b, 1e-5, k, n, m, rescale, quant, True)

    args = [t for t in (x, w, b)]
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        gm = trace_normalised(fn, [None if t is None else mode.from_tensor(t) for t in args])
    expected = gm(*args)
    assert retarget_to_triton(gm.graph) == 1
    gm.recompile()
    assert op_counts(gm)["norm_sparsify"] == 1 and _namespaces(gm) == {"qsparse_triton": 1}
    got = gm(*args)
    if quant:  # one rounding apart may move a value by one int8 step of its row's scale
        step = expected.float().abs().amax(-1, keepdim=True) / 127
        assert ((got.float() - expected.float()).abs() <= 1.01 * step).all()
    else:
        torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)
        assert (got != 0).sum(-1).tolist() == (expected != 0).sum(-1).tolist()


def test_layer_norm_with_mixed_dtypes_keeps_the_op():
    x16, w32 = _x(torch.bfloat16, 2, 16), _x(torch.float32, 16, seed=1)
    assert not fused_norm_applies(x16, "layer", w32, None)
    assert fused_norm_applies(x16, "rms", w32, None)

    def fn(x, w):
        return q.norm_sparsify.default(x, "layer", w, None, 1e-5, 0, 2, 4, False, True, True)

    gm = _traced(fn, x16, w32)
    assert retarget_to_triton(gm.graph) == 0
