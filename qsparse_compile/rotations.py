"""Rotations of projection inputs, keyed by module path: what the compiler reads of a calibration.

A *rotation group* is the set of projections that read one input tensor (q/k/v, gate/up) and
share one orthogonal rotation ``Q``: ``x W^T == (x Q)(W Q)^T``, so top-K can act on ``x Q``
with ``Q`` folded into the weights (:mod:`qsparse_compile.passes.rotate`). How rotations are
found (``qsparse_compile.research.calibrate``) is not the compiler's business; this module
defines the file format they are stored in and reads the part the compiler needs.

The file is a safetensors file: tensors ``rotation.<i>`` (``[D, D]`` float32) and
``eigenvalues.<i>`` per group, and a JSON header in the metadata key ``qsparse`` whose
``groups`` lists each group's paths (a calibration stores more there; the compiler ignores it).
Loading runs no pickled code.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["FORMAT", "RotationGroup", "Rotations", "as_rotations", "read_header"]

#: The format tag of calibration files (shared with the research calibration that writes them).
FORMAT = "qsparse-calibration/1"


@dataclasses.dataclass(eq=False)  # tensors: compare fields explicitly
class RotationGroup:
    """Projections reading one input tensor, and the rotation they share.

    ``rotation`` is ``[D, D]``, orthogonal; ``eigenvalues`` (float64, descending) is the input's
    second-moment spectrum in the rotated basis, where the calibration recorded it.
    """

    paths: tuple[str, ...]
    rotation: torch.Tensor
    eigenvalues: torch.Tensor | None = None

    @property
    def dim(self) -> int:
        return int(self.rotation.shape[0])


class Rotations:
    """Rotation groups, looked up by the module path of any projection in them."""

    def __init__(self, groups: list[RotationGroup]):
        self.groups = list(groups)
        self._group_of = {p: i for i, g in enumerate(self.groups) for p in g.paths}

    def group_of(self, path: str) -> int | None:
        """Index of the group of the projection at ``path``; None if it has no rotation."""
        return self._group_of.get(path)

    def rotation_for(self, path: str) -> torch.Tensor | None:
        """The ``[D, D]`` rotation of the projection at ``path``; None if it has none."""
        group = self.group_of(path)
        return None if group is None else self.groups[group].rotation

    @property
    def paths(self) -> list[str]:
        return [p for g in self.groups for p in g.paths]

    @classmethod
    def load(cls, path: str | os.PathLike) -> Rotations:
        """The rotation groups of a calibration file (see the module docstring)."""
        from safetensors import safe_open

        header = read_header(path)
        with safe_open(str(path), framework="pt") as f:
            groups = [RotationGroup(tuple(paths), f.get_tensor(f"rotation.{i}"),
                                    f.get_tensor(f"eigenvalues.{i}"))
                      for i, paths in enumerate(header["groups"])]
        return cls(groups)


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of a calibration file; clear errors for a missing or foreign file."""
    from safetensors import safe_open

    target = Path(path)
    if not target.is_file():
        raise FileNotFoundError(f"calibration file {str(target)!r} does not exist")
    with safe_open(str(target), framework="pt") as f:
        raw = (f.metadata() or {}).get("qsparse")
    header = json.loads(raw) if raw else {}
    if header.get("format") != FORMAT:
        raise ValueError(f"{str(target)!r} is not a qsparse calibration file "
                         f"(format {header.get('format')!r}, expected {FORMAT!r})")
    return header


#: The rotations most recently read from a path, keyed by (path, mtime, size): Dynamo compiles
#: one graph per break and recompilation, each asking for the option again, and a real
#: model's calibration is hundreds of MB. One entry bounds the memory held.
_LAST_READ: dict[tuple[str, int, int], Rotations] = {}


def as_rotations(value: Any, where: str) -> Rotations:
    """:class:`Rotations` from rotations, an object holding them (``.rotations``: a
    calibration) or the path of a calibration file (read once while it is unchanged)."""
    if isinstance(value, Rotations):
        return value
    held = getattr(value, "rotations", None)
    if isinstance(held, Rotations):
        return held
    if isinstance(value, (str, os.PathLike)):
        target = Path(value).resolve()
        try:
            stat = target.stat()
        except OSError:
            return Rotations.load(value)  # its error names the missing file
        key = (str(target), stat.st_mtime_ns, stat.st_size)
        if key not in _LAST_READ:
            _LAST_READ.clear()
            _LAST_READ[key] = Rotations.load(target)
        return _LAST_READ[key]
    raise TypeError(f"{where}: must be a Calibration (or Rotations), or the path of a file "
                    f"written by Calibration.save, got {type(value).__name__}")
