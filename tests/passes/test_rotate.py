"""The rotate pass: ``linear(x, W, b)`` -> ``linear(x @ Q, W Q, b)`` before the sparsify.

Counts ops before and after the passes (one ``x @ Q`` per shared input, none where nothing is
sparsified) and compares compiled outputs with the eager rotated reference
(``sparsify(x Q) (W Q)^T + b`` per projection, :mod:`rotated_reference`).
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from hf_models import HF_MODELS, LAYERS, Logits, token_ids
from op_counts import CountingBackend, dense_projections
from rotated_reference import rotated_reference
from torch._dynamo.exc import BackendCompilerFailed

import qsparse_compile as qc
from qsparse_compile.config import topk_count
from qsparse_compile.options import CompileOptions
from qsparse_compile.passes import cpu_decode
from qsparse_compile.reference import reference_model

LLAMA = HF_MODELS["llama"]
GROUPS_PER_LAYER = 4  # q/k/v, o, gate/up, down


def _batches(seeds=range(4), seq=16):
    return [{"input_ids": token_ids(2, seq, seed=s), "use_cache": False} for s in seeds]


@pytest.fixture(scope="module")
def llama():
    model = LLAMA.build()
    return model, qc.calibrate(model, _batches(), sample_rows=32)


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def _run(model, options, ids, grad=False):
    backend = CountingBackend(options)
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
    with torch.set_grad_enabled(grad):
        out = compiled(ids, use_cache=False).logits
    return out, backend


def _rotated_reference(model, cal, options, ids):
    with torch.no_grad(), rotated_reference(model, cal, **options):
        return model(ids, use_cache=False).logits


def _dense(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def test_sparsity_zero_leaves_the_graph_untouched(llama):
    model, cal = llama
    ids = token_ids()
    out, backend = _run(model, {"sparsity": 0.0, "calibration": cal}, ids)
    assert backend.after[0] == backend.before_live[0]
    assert backend.results[0].rotations == []
    assert torch.equal(out, _dense(model, ids))


def test_rotation_with_every_input_kept_equals_the_dense_model(llama):
    """k == D everywhere: top-K keeps all of ``x Q``, so only the rotation acts, and
    ``(x Q)(W Q)^T == x W^T`` up to float32 rounding."""
    model, cal = llama
    sparsity = 0.005
    assert topk_count(32, sparsity) == 32 and topk_count(64, sparsity) == 64
    ids = token_ids()
    out, backend = _run(model, {"sparsity": sparsity, "calibration": cal}, ids)
    torch.testing.assert_close(out, _dense(model, ids), rtol=1e-5, atol=1e-5)
    before, after = backend.before_live[0], backend.after[0]
    # every projection but the head (excluded, not rotated) left the dense products
    assert dense_projections(before) - dense_projections(after) == 7 * LAYERS
    assert after["matmul"] - before.get("matmul", 0) == GROUPS_PER_LAYER * LAYERS
    assert after["sparse_linear"] == 7 * LAYERS
    assert after["norm_sparsify"] == 0  # rotated inputs are not a norm's output
    rotations = backend.results[0].rotations
    assert [r.paths for r in rotations] == [g.paths for g in cal.groups]


@pytest.mark.parametrize("options", [
    {"sparsity": 0.4}, {"sparsity": 0.5, "rescale": "l2"},
    {"method": "block", "block": (2, 4)}], ids=["topk40", "topk50-l2", "block2:4"])
def test_outputs_match_the_rotated_reference(llama, options):
    model, cal = llama
    ids = token_ids()
    out, _ = _run(model, {**options, "calibration": cal}, ids)
    torch.testing.assert_close(out, _rotated_reference(model, cal, options, ids),
                               rtol=1e-5, atol=1e-5)
    with torch.no_grad(), reference_model(model, **options):
        plain = model(ids, use_cache=False).logits
    assert not torch.allclose(out, plain)  # the rotation changed the selection


def test_excluded_and_dense_projections_stay_as_they_were(llama):
    model, cal = llama
    options = {"sparsity": 0.5, "overrides": {"model.layers.0.*": None, "*.down_proj": 0.0}}
    ids = token_ids()
    out, backend = _run(model, {**options, "calibration": cal}, ids)
    rotated = [r.paths for r in backend.results[0].rotations]
    assert rotated == [g.paths for g in cal.groups
                       if g.paths[0].startswith("model.layers.1.") and "down" not in g.paths[0]]
    # the head, layer 0 and layer 1's down stay dense: 6 of 15 projections rewritten
    assert dense_projections(backend.before[0]) - dense_projections(backend.after[0]) == 6
    torch.testing.assert_close(out, _rotated_reference(model, cal, options, ids),
                               rtol=1e-5, atol=1e-5)


def test_without_calibration_the_norms_fuse_and_with_it_they_do_not(llama):
    model, cal = llama
    ids = token_ids()
    _, plain = _run(model, {"sparsity": 0.5}, ids)
    _, rotated = _run(model, {"sparsity": 0.5, "calibration": cal}, ids)
    assert plain.after[0]["norm_sparsify"] == 2 * LAYERS
    assert rotated.after[0]["norm_sparsify"] == 0


def test_relu_method_is_not_rotated(llama):
    model, cal = llama
    ids = token_ids()
    _, backend = _run(model, {"method": "relu", "calibration": cal}, ids)
    assert backend.results[0].rotations == []
    assert backend.after[0]["matmul"] == backend.before_live[0].get("matmul", 0)


def test_cpu_decode_takes_the_rotated_weights(llama, monkeypatch):
    monkeypatch.setattr(cpu_decode, "_max_sparse_rows", lambda *args: 8)
    monkeypatch.setattr(cpu_decode, "_max_dense_rows", lambda *args: 0)  # the head: mm
    model, cal = llama
    ids = token_ids(1, 1)
    out, backend = _run(model, {"sparsity": 0.5, "calibration": cal}, ids)
    assert backend.after[0]["cpu_topk_linear"] == GROUPS_PER_LAYER * LAYERS
    torch.testing.assert_close(out, _rotated_reference(model, cal, {"sparsity": 0.5}, ids),
                               rtol=1e-5, atol=1e-5)


def test_training_through_folded_weights_warns(llama):
    model, cal = llama
    with pytest.warns(UserWarning, match="gradients will not reach"):
        _run(model, {"sparsity": 0.5, "calibration": cal}, token_ids(), grad=True)


def test_report_counts_the_rotation_cost(llama):
    model, cal = llama
    _, backend = _run(model, {"sparsity": 0.5, "calibration": cal}, token_ids())
    result = backend.results[0]
    compiled = qc.report(model, sparsity=0.5, calibration=cal)
    from qsparse_compile.report import rows_from_records

    from_records = rows_from_records(result.records, result.rotations)
    expected = sum(g.dim ** 2 for g in cal.groups)
    assert compiled.totals["rotation_macs"] == from_records.totals["rotation_macs"] == expected
    q = next(r for r in compiled if r["path"].endswith("layers.0.self_attn.q_proj"))
    k = next(r for r in compiled if r["path"].endswith("layers.0.self_attn.k_proj"))
    assert q["rotation_macs"] == 32 * 32 and k["rotation_macs"] == 0
    assert "shared with" in k["note"]
    assert "rotations add" in compiled.table()
    assert qc.report(model, sparsity=0.5).totals["rotation_macs"] == 0


def test_calibration_option_errors(llama, tmp_path):
    model, cal = llama
    from qsparse_compile.rotations import as_rotations

    assert CompileOptions.parse({"sparsity": 0.5}).calibration is None
    assert CompileOptions.parse({"calibration": cal}).calibration is cal
    assert [g.paths for g in as_rotations(cal, "calibration").groups] == [
        g.paths for g in cal.groups]
    with pytest.raises(TypeError, match="option 'calibration'.*got int"):
        CompileOptions.parse({"sparsity": 0.5, "calibration": 3})
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        as_rotations(str(tmp_path / "nowhere.safetensors"), "option 'calibration'")
    other = qc.calibrate(HF_MODELS["gpt2"].build(), [token_ids()], sample_rows=2)
    with pytest.raises(BackendCompilerFailed,
                       match="'model.layers.0.self_attn.q_proj'.*no rotation"):
        _run(model, {"sparsity": 0.5, "calibration": other}, token_ids())


def test_exported_program_with_calibration_runs_saves_and_loads():
    wrapped = Logits(LLAMA.build())
    cal = qc.calibrate(wrapped, [token_ids(2, 16, seed=s) for s in range(4)], sample_rows=32)
    ids = token_ids()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(wrapped, (ids,), strict=False)
    ep2 = qc.sparsify_exported(ep, sparsity=0.5, calibration=cal)
    with torch.no_grad(), rotated_reference(wrapped, cal, sparsity=0.5):
        expected = wrapped(ids)
    out = ep2.module()(ids)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.export.save(ep2, buffer)
        buffer.seek(0)
        loaded = torch.export.load(buffer)
    assert torch.equal(loaded.module()(ids), out)
