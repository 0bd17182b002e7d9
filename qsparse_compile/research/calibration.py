"""The result of calibrating a model: rotations of projection inputs, loss-proxy curves, and
per-projection sparsity allocations. One object, saved to and loaded from one file.

A *rotation group* is the set of projections that read the same input tensor (q/k/v, gate/up)
and therefore share one orthogonal rotation ``Q`` (PCA eigenvectors of the input's second
moment ``X^T X``, by descending eigenvalue): ``x W^T == (x Q)(W Q)^T``, so top-K can be
applied to ``x Q`` with the rotation folded into the weights
(:mod:`qsparse_compile.passes.rotate`). The compiler reads the rotations of a saved calibration
without this module (:class:`qsparse_compile.rotations.Rotations`): the file format is defined
there, and written here with the curves and allocations beside the rotations.

*Curves* are the loss proxy the allocation minimises: for each projection, the relative output
error ``||x W^T - sparsify(x) W^T||^2 / ||x W^T||^2`` per token, averaged over a sample of
calibration rows, at each sparsity of a grid, measured both in the original ("plain") and the
rotated space.

The file is a safetensors file: the tensors as tensors, everything else as JSON in its
metadata, so loading runs no pickled code.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..config import QSparseConfig
from ..rotations import FORMAT, RotationGroup, Rotations, read_header

__all__ = ["Calibration", "ProjectionInfo", "RotationGroup", "stored_overrides", "summary"]


@dataclasses.dataclass
class ProjectionInfo:
    """What the allocation needs to know about one calibrated projection."""

    path: str
    in_features: int
    out_features: int
    group: int  # index into Calibration.groups


@dataclasses.dataclass(eq=False)  # tensors: compare fields explicitly
class Calibration:
    """Rotations, loss-proxy curves and allocations of one calibrated model.

    Attributes:
        groups: one :class:`RotationGroup` per distinct projection input, in call order.
        projections: every calibrated projection, in call order.
        grid: the sparsities at which ``curves`` were measured, ascending, starting at 0.
        curves: ``{"plain": [P, G], "rotated": [P, G]}`` float64 mean per-token relative
            output errors (row ``i`` is ``projections[i]``).
        allocations: ``{name: {path: sparsity}}``, overrides made by :meth:`allocate` (the
            name says the global sparsity and the space, e.g. ``"0.4/rotated"``).
        metadata: JSON-serialisable facts about the calibration run (tokens, seed, ...).
    """

    groups: list[RotationGroup]
    projections: list[ProjectionInfo]
    grid: tuple[float, ...]
    curves: dict[str, torch.Tensor]
    allocations: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self._by_path = {p.path: p for p in self.projections}

    @property
    def rotations(self) -> Rotations:
        """The rotation groups, as the compiler takes them (the ``calibration`` option)."""
        return Rotations(self.groups)

    # --- lookup ------------------------------------------------------------------------

    def group_of(self, path: str) -> int | None:
        """Index of the rotation group of the projection at ``path``; None if not calibrated."""
        info = self._by_path.get(path)
        return None if info is None else info.group

    def rotation_for(self, path: str) -> torch.Tensor | None:
        """The ``[D, D]`` rotation of the projection at ``path``; None if not calibrated."""
        group = self.group_of(path)
        return None if group is None else self.groups[group].rotation

    @property
    def paths(self) -> list[str]:
        return [p.path for p in self.projections]

    # --- allocation ----------------------------------------------------------------------

    def allocate(self, sparsity: float, rotated: bool = True, **config_options: Any
                 ) -> QSparseConfig:
        """A config whose per-projection sparsities meet the budget of global ``sparsity``.

        Greedy under the loss proxy of this calibration (``rotated`` picks the curves of
        the rotated or the original space); see :func:`qsparse_compile.allocation.allocate`
        for what the budget is and how exactly it is met. The overrides are also stored in
        :attr:`allocations` (and saved with the calibration). ``config_options`` go to the
        config (e.g. ``exclude``); ``sparsity`` and ``overrides`` are set here.
        """
        from .allocation import allocate, overrides_for

        space = "rotated" if rotated else "plain"
        sizes = [(p.in_features, p.out_features) for p in self.projections]
        ks = allocate(sizes, self.curves[space], self.grid, sparsity)
        overrides = overrides_for(self.paths, sizes, ks)
        self.allocations[f"{sparsity:g}/{space}"] = overrides
        return QSparseConfig(sparsity=sparsity, overrides=overrides, **config_options)

    # --- file --------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write the calibration to one safetensors file; return its path."""
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        for i, g in enumerate(self.groups):
            tensors[f"rotation.{i}"] = g.rotation.contiguous()
            tensors[f"eigenvalues.{i}"] = g.eigenvalues.contiguous()
        for space, curve in self.curves.items():
            tensors[f"curves.{space}"] = curve.contiguous()
        header = {
            "format": FORMAT,
            "groups": [list(g.paths) for g in self.groups],
            "projections": [dataclasses.asdict(p) for p in self.projections],
            "grid": list(self.grid),
            "allocations": self.allocations,
            "metadata": self.metadata,
        }
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(target), metadata={"qsparse": json.dumps(header)})
        return target

    @classmethod
    def load(cls, path: str | os.PathLike) -> Calibration:
        """Read a file written by :meth:`save`."""
        from safetensors import safe_open

        header = read_header(path)
        with safe_open(str(path), framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
        groups = [RotationGroup(tuple(paths), tensors[f"rotation.{i}"],
                                tensors[f"eigenvalues.{i}"])
                  for i, paths in enumerate(header["groups"])]
        curves = {name.split(".", 1)[1]: t for name, t in tensors.items()
                  if name.startswith("curves.")}
        return cls(groups=groups,
                   projections=[ProjectionInfo(**p) for p in header["projections"]],
                   grid=tuple(header["grid"]), curves=curves,
                   allocations={k: dict(v) for k, v in header["allocations"].items()},
                   metadata=header["metadata"])


def stored_overrides(calibration: Calibration, name: str) -> Mapping[str, float]:
    """The overrides of a stored allocation, with a clear error for an unknown name."""
    if name not in calibration.allocations:
        known = ", ".join(map(repr, calibration.allocations)) or "none"
        raise KeyError(f"calibration has no allocation {name!r}; stored: {known}")
    return calibration.allocations[name]


def summary(calibration: Calibration, sparsities: Sequence[float] = (0.4, 0.5)
            ) -> dict[str, Any]:
    """Mean relative output error of uniform top-K, plain vs rotated, at each sparsity
    (interpolated on the calibration grid): how much the rotation concentrates the inputs."""
    import numpy as np

    out: dict[str, Any] = {}
    grid = np.asarray(calibration.grid)
    for s in sparsities:
        row = {}
        for space, curve in calibration.curves.items():
            errs = [float(np.interp(s, grid, c)) for c in curve.double().numpy()]
            row[space] = round(sum(errs) / len(errs), 5)
        out[f"{s:g}"] = row
    return out
