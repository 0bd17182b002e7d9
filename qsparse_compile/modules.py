"""The one walker over a model's projection modules: ``nn.Linear`` and GPT-2-style ``Conv1D``.

The compiler finds projections in graphs, whatever their spelling; eager tools (the reference
model, the report of a module, calibration, sparsity measurement) find them by walking the
module tree. They all walk it here, so they agree on what a projection module is:

* ``nn.Linear`` (and subclasses): weight ``[out_features, in_features]``, layout ``"out_in"``;
* a ``Conv1D`` as Hugging Face's GPT-2 family defines it (``y = x @ W + b``): a module of that
  class name whose ``weight`` is a 2-D tensor ``[in_features, out_features]``, layout
  ``"in_out"``.

Paths are ``named_modules()`` names, the names the configuration's globs match.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["ProjectionModule", "projection_layout", "projection_modules"]


def projection_layout(module: nn.Module) -> str | None:
    """``"out_in"`` for an ``nn.Linear``, ``"in_out"`` for a ``Conv1D``, else None."""
    if isinstance(module, nn.Linear):
        return "out_in"
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) \
            and weight.dim() == 2:
        return "in_out"
    return None


@dataclasses.dataclass(frozen=True)
class ProjectionModule:
    """One projection module of a model, at ``path``."""

    path: str
    module: nn.Module
    layout: str  # "out_in" (nn.Linear) or "in_out" (Conv1D)

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.module, "bias", None)

    def weight_out_in(self) -> torch.Tensor:
        """The weight as ``[out_features, in_features]`` (a view for ``Conv1D``)."""
        return self.weight if self.layout == "out_in" else self.weight.t()

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1 if self.layout == "out_in" else 0])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0 if self.layout == "out_in" else 1])


def projection_modules(model: nn.Module) -> Iterator[ProjectionModule]:
    """Every projection module of ``model``, in ``named_modules()`` order."""
    for path, module in model.named_modules():
        layout = projection_layout(module)
        if layout is not None:
            yield ProjectionModule(path, module, layout)
