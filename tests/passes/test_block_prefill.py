"""Prefill on the Triton path: projections on 2:4-compatible N:M inputs -> block_sparse_linear.

On a CPU-only machine ``qsparse::block_sparse_linear`` is the dense product on the masked input
(its 2:4 semi-structured branch needs an sm80+ GPU), so these tests check which projections the
pass retargets and that the results (and gradients) equal the reference. The models run on the
test device (``QSPARSE_TEST_DEVICE``; the sparsify kernels compiled on ``cuda``), the reference on
the same device; with these few rows the product is the dense fallback there too.
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton", reason="triton is not installed: the Triton path needs it")

import torch  # noqa: E402
from devices import selected_device  # noqa: E402
from hf_models import HF_MODELS, LAYERS, token_ids  # noqa: E402
from op_counts import CountingBackend  # noqa: E402

from qsparse_compile.reference import reference_model  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
DEVICE = selected_device()


@pytest.fixture(autouse=True)
def _kernel_cache(tmp_path_factory, monkeypatch, fresh_dynamo):
    monkeypatch.setenv("QSPARSE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "kernels"))


def test_llama_prefill_2_4():
    """Nine rows per call: no decode group is taken; all seven projections per layer read a
    2:4-masked input and become block_sparse_linear; the sparsify ops run the Triton kernels."""
    model = HF_MODELS["llama"].build().to(DEVICE)
    ids = token_ids(batch=1, seq=9).to(DEVICE)
    options = {"method": "block", "block": (2, 4)}
    backend = CountingBackend({**options, "kernels": "triton"})
    with torch.no_grad():
        out = torch.compile(model, backend=backend, fullgraph=True)(ids, use_cache=False).logits
        with reference_model(model, **options):
            expected = model(ids, use_cache=False).logits
    after = backend.after[0]
    assert after["block_sparse_linear"] == HF_MODELS["llama"].per_layer * LAYERS
    assert after["sparse_linear"] == after["sparse_gemv"] == 0
    result = backend.results[0]
    assert (result.triton, result.decode, result.block_linear) == (DEVICE.type, 0, 7 * LAYERS)
    assert result.lowered == 4 * LAYERS  # 2 norm_sparsify + 2 block_sparsify per layer
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)


class _Mlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.norm = torch.nn.LayerNorm(32)
        self.up = torch.nn.Linear(32, 64)
        self.down = torch.nn.Linear(64, 32)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


@pytest.mark.parametrize("options,retargeted", [
    ({"method": "block", "block": (2, 4)}, 2),
    ({"method": "block", "block": (1, 4)}, 2),
    ({"method": "block", "block": (16, 32)}, 0),  # 16 of 32 may fill a group of 4
    ({"sparsity": 0.5}, 0),  # top-K has no block structure
], ids=["2:4", "1:4", "16:32", "topk"])
def test_patterns_and_training(options, retargeted):
    """Grad mode on (training): retargeted where the pattern implies 2:4, nothing lowered to
    qsparse_triton ops; forward and gradients equal the reference."""
    model = _Mlp().to(DEVICE)
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    backend = CountingBackend({**options, "kernels": "triton"})
    out = torch.compile(model, backend=backend, fullgraph=True)(x)
    out.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with reference_model(model, **options):
        expected = model(x)
    expected.sum().backward()
    assert backend.after[0]["block_sparse_linear"] == retargeted
    assert backend.after[0]["sparse_linear"] == 2 - retargeted
    assert backend.results[0].lowered == 0
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)
    for got, want in zip(grads, (p.grad for p in model.parameters()), strict=True):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_auto_on_cpu_keeps_sparse_linear():
    """CPU tensors whatever the test device: ``kernels="auto"`` leaves CPU weights alone."""
    backend = CountingBackend({"method": "block", "block": (2, 4)})
    with torch.no_grad():
        torch.compile(_Mlp(), backend=backend, fullgraph=True)(torch.randn(9, 32))
    assert backend.after[0]["block_sparse_linear"] == 0
    assert backend.after[0]["sparse_linear"] == 2
