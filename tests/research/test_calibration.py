"""``Calibration``: one file that reloads to the same rotations and the same compiled outputs."""

from __future__ import annotations

import pytest
import torch
from hf_models import HF_MODELS, token_ids
from safetensors.torch import save_file

import qsparse_compile as qc
from qsparse_compile.research.calibration import stored_overrides, summary
from qsparse_compile.rotations import as_rotations


@pytest.fixture(scope="module")
def model_and_calibration():
    model = HF_MODELS["llama"].build()
    batches = [{"input_ids": token_ids(2, 16, seed=s), "use_cache": False} for s in range(4)]
    cal = qc.calibrate(model, batches, sample_rows=32)
    cal.allocate(0.4)
    return model, cal


def _compiled_logits(model, cal, ids):
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="qsparse", dynamic=False,
                             options={"sparsity": 0.5, "calibration": cal, "inner": "eager"})
    with torch.no_grad():
        return compiled(ids, use_cache=False).logits


def test_saved_calibration_reloads_to_identical_outputs(model_and_calibration, tmp_path):
    model, cal = model_and_calibration
    path = cal.save(tmp_path / "cal.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["cal.safetensors"]  # one file
    loaded = qc.Calibration.load(path)
    assert [g.paths for g in loaded.groups] == [g.paths for g in cal.groups]
    for a, b in zip(loaded.groups, cal.groups, strict=True):
        assert torch.equal(a.rotation, b.rotation) and torch.equal(a.eigenvalues, b.eigenvalues)
    assert all(torch.equal(loaded.curves[k], cal.curves[k]) for k in ("plain", "rotated"))
    assert loaded.projections == cal.projections and loaded.grid == cal.grid
    assert loaded.allocations == cal.allocations and loaded.metadata == cal.metadata
    assert stored_overrides(loaded, "0.4/rotated") == cal.allocations["0.4/rotated"]
    ids = token_ids()
    expected = _compiled_logits(model, cal, ids)
    assert torch.equal(_compiled_logits(model, loaded, ids), expected)
    assert torch.equal(_compiled_logits(model, str(path), ids), expected)  # a path option


def test_a_path_option_is_read_once_while_the_file_is_unchanged(model_and_calibration,
                                                                tmp_path):
    _, cal = model_and_calibration
    path = cal.save(tmp_path / "cal.safetensors")
    first = as_rotations(path, "calibration")  # what the backend reads of the option
    assert as_rotations(str(path), "calibration") is first  # same file: not read again
    assert [g.paths for g in first.groups] == [g.paths for g in cal.groups]
    assert all(torch.equal(a.rotation, b.rotation) for a, b in zip(first.groups, cal.groups,
                                                                    strict=True))
    other = qc.Calibration.load(path)
    other.allocate(0.5)  # a different file content (one more stored allocation)
    other.save(path)
    assert as_rotations(path, "calibration") is not first
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        as_rotations(tmp_path / "missing.safetensors", "calibration")


def test_load_refuses_other_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        qc.Calibration.load(tmp_path / "missing.safetensors")
    other = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(ValueError, match="not a qsparse calibration file"):
        qc.Calibration.load(other)
    with pytest.raises(TypeError, match="calibration: must be a Calibration"):
        as_rotations(1.5, "calibration")


def test_stored_overrides_and_summary(model_and_calibration):
    _, cal = model_and_calibration
    with pytest.raises(KeyError, match="no allocation '0.9/plain'; stored: '0.4/rotated'"):
        stored_overrides(cal, "0.9/plain")
    means = summary(cal)
    assert set(means) == {"0.4", "0.5"} and set(means["0.4"]) == {"plain", "rotated"}
