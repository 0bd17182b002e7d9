"""``Rotations``: what the compiler reads of a calibration file, without the research tools."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from qsparse_compile.rotations import FORMAT, RotationGroup, Rotations, as_rotations


def _file(tmp_path, groups):
    tensors = {}
    for i, (_, q) in enumerate(groups):
        tensors[f"rotation.{i}"] = q
        tensors[f"eigenvalues.{i}"] = torch.ones(q.shape[0], dtype=torch.float64)
    header = {"format": FORMAT, "groups": [list(paths) for paths, _ in groups]}
    path = tmp_path / "cal.safetensors"
    save_file(tensors, str(path), metadata={"qsparse": json.dumps(header)})
    return path


def test_load_lookup_and_cache(tmp_path):
    q = torch.linalg.qr(torch.randn(4, 4))[0].contiguous()
    path = _file(tmp_path, [(("a.q", "a.k"), q), (("a.o",), torch.eye(4))])
    rotations = as_rotations(path, "calibration")
    assert rotations.group_of("a.k") == 0 and rotations.group_of("a.o") == 1
    assert rotations.group_of("b") is None and rotations.rotation_for("b") is None
    assert torch.equal(rotations.rotation_for("a.q"), q)
    assert rotations.paths == ["a.q", "a.k", "a.o"]
    assert as_rotations(str(path), "calibration") is rotations  # read once while unchanged
    assert as_rotations(rotations, "x") is rotations


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Rotations.load(tmp_path / "nowhere.safetensors")
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(1)}, str(other))
    with pytest.raises(ValueError, match="not a qsparse calibration file"):
        Rotations.load(other)
    with pytest.raises(TypeError, match="calibration: must be a Calibration.*got int"):
        as_rotations(3, "calibration")
    assert RotationGroup(("p",), torch.eye(3)).dim == 3
