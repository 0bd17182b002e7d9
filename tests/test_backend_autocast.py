"""The backend under ``torch.autocast``: compiled models compute as the reference does when it
casts the same way (each projection's operands cast to the autocast dtype, the selection on
the cast activation), in inference and training, with autocast entered around the compiled
call or inside the compiled code.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hf_models import HF_MODELS, token_ids
from training import next_token_loss, take_gradients

import qsparse_compile
from qsparse_compile.reference import reference_model, topk_sparsify

OPTIONS = {"sparsity": 0.5}
BF16 = torch.bfloat16


def _autocast():
    return torch.autocast("cpu", dtype=BF16)


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_autocast_inference_matches_the_reference(inner):
    model = HF_MODELS["llama"].build()
    ids = token_ids(2, 12)
    backend = qsparse_compile.Backend(OPTIONS, inner=inner)
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad(), _autocast():
        got = compiled(ids, use_cache=False).logits
        with reference_model(model, **OPTIONS):
            expected = model(ids, use_cache=False).logits
        dense = model(ids, use_cache=False).logits
    assert got.dtype == expected.dtype == BF16
    assert backend.results[0].autocast
    assert backend.results[0].count("rewrite") == 14
    torch.testing.assert_close(got, expected, atol=0 if inner == "eager" else 2e-2,
                               rtol=0 if inner == "eager" else 2e-2)
    assert (got.float() - dense.float()).abs().max() > 0.05  # sparse, not dense


def test_autocast_training_matches_the_reference():
    """The forward (every mask) is exact; the bf16 backward differs by rounding order, as a
    dense compiled model's does from eager under autocast (about 5e-3 of the norm here)."""
    model = HF_MODELS["llama"].build().train()
    ids = token_ids(2, 12)
    compiled = torch.compile(model, backend="qsparse", options={**OPTIONS, "inner": "eager"})
    with _autocast():
        loss = next_token_loss(compiled(ids, use_cache=False).logits, ids)
    loss.backward()
    got = take_gradients(model)
    with _autocast(), reference_model(model, **OPTIONS):
        expected_loss = next_token_loss(model(ids, use_cache=False).logits, ids)
    expected_loss.backward()
    expected = take_gradients(model)
    with _autocast():
        dense_loss = next_token_loss(model(ids, use_cache=False).logits, ids)
    assert loss.item() == expected_loss.item() != dense_loss.item()
    assert got.keys() == expected.keys()
    for name in got:
        assert got[name].dtype == torch.float32
        error = (got[name] - expected[name]).norm() / expected[name].norm()
        assert error < 1.5e-2, f"{name}: relative gradient error {error:.2e}"


class _AutocastInside(torch.nn.Module):
    """Autocast entered inside the compiled code, with a cast back to fp32 after it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up = torch.nn.Linear(32, 64)
        self.down = torch.nn.Linear(64, 32)

    def forward(self, x):
        with torch.autocast("cpu", dtype=BF16):
            h = self.down(F.relu(self.up(x)))
        return h.float() * 2


def test_an_autocast_region_inside_the_graph_keeps_its_casts():
    model = _AutocastInside()
    x = torch.randn(4, 32)
    backend = qsparse_compile.Backend(OPTIONS, inner="eager")
    with torch.no_grad():
        got = torch.compile(model, backend=backend)(x)
        with reference_model(model, **OPTIONS):
            expected = model(x)
    assert got.dtype == torch.float32  # the h.float() after the region is kept
    assert backend.results[0].autocast
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_no_decode_lowering_under_autocast():
    """The lowerings' kernels compute in the weights' dtype; under autocast they stay out."""
    model = HF_MODELS["llama"].build()
    ids = token_ids(1, 1)
    backend = qsparse_compile.Backend(OPTIONS, inner="eager")
    with torch.no_grad(), _autocast():
        got = torch.compile(model, backend=backend)(ids, use_cache=False).logits
        with reference_model(model, **OPTIONS):
            expected = model(ids, use_cache=False).logits
    assert backend.results[0].count("cpu_decode") == 0
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


class _CastWeightBesideARegion(torch.nn.Module):
    """A weight cast (``W.to(x.dtype)``) in a graph that also has an autocast region."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(32, 32))
        self.out = torch.nn.Linear(32, 32)

    def forward(self, x):
        h = F.linear(x, self.w.to(x.dtype))
        with torch.autocast("cpu", enabled=False):  # keeps one op in fp32, casts nothing
            h = torch.softmax(h.float(), -1)
        return self.out(h)


def test_a_weight_cast_in_a_graph_with_an_autocast_region_is_still_a_projection():
    model = _CastWeightBesideARegion().eval()
    x = torch.randn(1, 32)
    backend = qsparse_compile.Backend(OPTIONS, inner="eager")
    with torch.no_grad():
        got = torch.compile(model, backend=backend)(x)
        h = torch.softmax(F.linear(topk_sparsify(x, 16, "none", True), model.w), -1)
        expected = model.out.bias + F.linear(topk_sparsify(h, 16, "none", True),
                                             model.out.weight)
    sparse = sorted(r.path for r in backend.results[0].records if r.plan.sparse)
    assert sparse == ["out", "w"]
    # a region that turns autocast off is not autocast: the decode lowering still runs
    assert not backend.results[0].autocast
    assert backend.results[0].count("cpu_decode") >= 1
    torch.testing.assert_close(got, expected)
