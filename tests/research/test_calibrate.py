"""``calibrate``: grouping by shared input, orthogonal PCA rotations, loss-proxy curves."""

from __future__ import annotations

import pytest
import torch
from hf_models import HF_MODELS, LAYERS, token_ids
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qsparse_compile as qc
from qsparse_compile.config import topk_count
from qsparse_compile.reference import topk_sparsify
from qsparse_compile.research.calibrate import DEFAULT_GRID, error_curves, principal_rotation


def _batches(seeds=range(4), seq=16):
    return [{"input_ids": token_ids(2, seq, seed=s), "use_cache": False} for s in seeds]


@pytest.fixture(scope="module")
def llama_calibration():
    model = HF_MODELS["llama"].build()
    return model, qc.calibrate(model, _batches(), sample_rows=32)


def test_projections_reading_one_tensor_share_one_rotation(llama_calibration):
    model, cal = llama_calibration
    expected = []
    for i in range(LAYERS):
        attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        expected += [(f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj"), (f"{attn}.o_proj",),
                     (f"{mlp}.gate_proj", f"{mlp}.up_proj"), (f"{mlp}.down_proj",)]
    assert [g.paths for g in cal.groups] == expected
    q, k, v = expected[0]
    assert cal.group_of(q) == cal.group_of(k) == cal.group_of(v) == 0
    assert cal.rotation_for(q) is cal.rotation_for(v)
    assert cal.group_of("lm_head") is None  # excluded by default
    sizes = {p.path: (p.in_features, p.out_features) for p in cal.projections}
    assert sizes[k] == (32, 16) and sizes[f"{expected[3][0]}"] == (64, 32)


def test_rotations_are_orthogonal_with_descending_spectrum(llama_calibration):
    _, cal = llama_calibration
    for group in cal.groups:
        q = group.rotation.double()
        assert group.rotation.dtype == torch.float32
        torch.testing.assert_close(q.T @ q, torch.eye(group.dim, dtype=torch.float64),
                                   rtol=0, atol=1e-6)
        values = group.eigenvalues
        assert torch.all(values[:-1] >= values[1:]) and torch.all(values >= 0)


def test_the_rotation_diagonalises_the_second_moment():
    torch.manual_seed(0)
    x = torch.randn(500, 8, dtype=torch.float64) @ torch.randn(8, 8, dtype=torch.float64)
    moment = x.T @ x / len(x)
    q, values = principal_rotation(moment)
    rotated = q.double().T @ moment @ q.double()
    torch.testing.assert_close(rotated, torch.diag(values), rtol=1e-5, atol=1e-5)
    pivots = q.abs().argmax(dim=0)
    assert torch.all(q[pivots, torch.arange(8)] > 0)  # sign convention


def test_a_low_rank_input_loses_nothing_to_rotated_topk():
    """Inputs in a 4-dimensional subspace of 32: in the rotated space they have at most 4
    non-zero coordinates, so top-K at 50% keeps everything; in the original space it does not."""
    torch.manual_seed(0)
    basis = torch.randn(4, 32)
    model = nn.Sequential(nn.Linear(32, 16))
    batches = [torch.randn(64, 4) @ basis for _ in range(4)]
    cal = qc.calibrate(model, batches, sample_rows=64)
    at50 = DEFAULT_GRID.index(0.5)
    assert cal.curves["rotated"][0, at50] < 1e-10 < 1e-2 < cal.curves["plain"][0, at50]
    assert cal.paths == ["0"] and cal.groups[0].paths == ("0",)


@settings(max_examples=5, deadline=None)
@given(st.integers(2, 20), st.sampled_from([0.0, 0.25, 0.5, 0.9]), st.integers(0, 100))
def test_error_curves_follow_the_topk_semantics(dim, sparsity, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(9, dim, generator=gen)
    x[0, :2] = 1.0  # a tie: the lower index is kept
    w = torch.randn(5, dim, generator=gen)
    got = error_curves(x, [w], [0.0, sparsity])
    kept = topk_sparsify(x, topk_count(dim, sparsity), "none", True)
    per_row = ((x - kept) @ w.T).double().pow(2).sum(-1) / (x @ w.T).double().pow(2).sum(-1)
    expected = per_row.mean()
    assert got[0, 0] == 0.0
    torch.testing.assert_close(got[0, 1], expected, rtol=1e-5, atol=1e-9)


def test_same_seed_same_calibration_other_seed_other_sample():
    model = HF_MODELS["llama"].build()
    a = qc.calibrate(model, _batches(range(2)), sample_rows=8, seed=3)
    b = qc.calibrate(model, _batches(range(2)), sample_rows=8, seed=3)
    c = qc.calibrate(model, _batches(range(2)), sample_rows=8, seed=4)
    for space in ("plain", "rotated"):
        assert torch.equal(a.curves[space], b.curves[space])
    assert all(torch.equal(x.rotation, y.rotation) for x, y in zip(a.groups, b.groups,
                                                                   strict=True))
    assert not torch.equal(a.curves["plain"], c.curves["plain"])


def test_gpt2_conv1d_projections_are_calibrated():
    cal = qc.calibrate(HF_MODELS["gpt2"].build(), [token_ids()], sample_rows=4)
    sizes = {p.path: (p.in_features, p.out_features) for p in cal.projections}
    assert sizes["transformer.h.0.attn.c_attn"] == (32, 96)
    assert sizes["transformer.h.0.mlp.c_proj"] == (128, 32)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"batches": []}, ValueError, "non-empty sequence"),
    ({"sample_rows": 0}, ValueError, "sample_rows must be a positive integer"),
    ({"grid": (0.1, 0.5)}, ValueError, "starting at 0"),
    ({"sample_rows": 10_000}, ValueError, "leaves no calibration row"),
    ({"exclude": ("*",)}, ValueError, "no projection"),
    ({"runner": nn.Linear(2, 2)}, ValueError, "not a submodule"),
], ids=["no-batches", "no-rows", "grid", "all-rows-sampled", "all-excluded", "runner"])
def test_bad_input(kwargs, error, match):
    model = nn.Sequential(nn.Linear(8, 4))
    args = {"batches": [torch.randn(3, 8)], **kwargs}
    with pytest.raises(error, match=match):
        qc.calibrate(model, args.pop("batches"), **args)

