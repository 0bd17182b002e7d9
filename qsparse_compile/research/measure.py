"""Measure how sparse each projection's input really is, under a configuration's semantics.

A top-K configuration fixes the sparsity it asks for; ``method="relu"`` does not (the fraction of
zeros is whatever the data and the weights give, and it changes during training), and even top-K
can zero more than asked when the input already holds exact zeros (the down projection's input
under a squared-ReLU GLU) or when int8 quantization rounds small kept values to zero. This module
runs the eager model with every ``nn.Linear`` computed by the reference semantics
(:mod:`qsparse_compile.reference`) and counts the zeros of each projection's input *as the
matrix product sees it* (sparsified, then quantized), per projection, per role and overall.

For a top-K plan the measured fraction is ``1 - k/D`` with ``k = max(1, round((1 - s) * D))``
(39.8% for ``s = 0.4`` at ``D = 128``), more only where the input already held exact zeros.

It measures the eager module as written: graph passes that change the architecture
(``relu2_glu``) are not applied here, so give it a model whose own forward already has that
architecture (for :class:`~qsparse_compile.models.TinyLlama`, ``hidden_act="relu2"``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ..config import ProjectionPlan, QSparseConfig
from ..modules import all_projections
from ..plan import resolve_plan
from ..reference import reference_model
from ..roles import projection_roles

__all__ = ["ProjectionSparsity", "SparsityMeasurement", "measure_sparsity"]


@dataclasses.dataclass
class ProjectionSparsity:
    """Zeros counted in one projection's input over all measured batches."""

    path: str
    role: str
    in_features: int
    out_features: int
    method: str  # "dense", "topk", "block n:m" or "relu"
    configured: float | None  # the plan's sparsity (None: data-dependent or dense)
    governed: bool  # False when excluded or of a dense role (the head, routers by default)
    zeros: int = 0
    elements: int = 0
    #: an expert weight: experts held and read per token (0 / None for a plain projection)
    experts: int = 0
    experts_per_token: int | None = None

    @property
    def measured(self) -> float:
        """Fraction of the input's entries that are exactly zero."""
        return self.zeros / self.elements if self.elements else float("nan")

    @property
    def params(self) -> int:
        """Weights a token may read: the experts it reads times one expert's, for experts."""
        read = (self.experts_per_token or self.experts) if self.experts else 1
        return read * self.in_features * self.out_features


@dataclasses.dataclass
class SparsityMeasurement:
    """Measured input sparsity: per projection, per role, and overall.

    ``per_role`` pools the zeros of every projection with that role (all their entries count
    equally). ``overall`` weights each governed projection (not excluded by the config) by its
    weight count, so it is the fraction of projection weights a token does not need to read:
    the paper's "overall sparsity" (45.7% for per-projection 42/40/40/40/60.4%).
    """

    projections: list[ProjectionSparsity]

    @property
    def per_role(self) -> dict[str, float]:
        zeros: dict[str, int] = {}
        elements: dict[str, int] = {}
        for p in self.projections:
            zeros[p.role] = zeros.get(p.role, 0) + p.zeros
            elements[p.role] = elements.get(p.role, 0) + p.elements
        return {role: zeros[role] / elements[role] for role in zeros if elements[role]}

    @property
    def overall(self) -> float:
        governed = [p for p in self.projections if p.governed and p.elements]
        total = sum(p.params for p in governed)
        if not total:
            return float("nan")
        return sum(p.measured * p.params for p in governed) / total

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable summary (rounded to 6 decimals: these go into logs)."""
        return {
            "overall": round(self.overall, 6),
            "per_role": {r: round(v, 6) for r, v in self.per_role.items()},
            "per_projection": {
                p.path: {"role": p.role, "method": p.method, "configured": p.configured,
                         "measured": round(p.measured, 6)}
                for p in self.projections
            },
        }


def _method_name(plan: ProjectionPlan) -> str:
    if not plan.sparse:
        return "dense"
    if plan.method == "block":
        return f"block {plan.block[0]}:{plan.block[1]}"
    return plan.method


def _call(model: torch.nn.Module, batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def measure_sparsity(model: torch.nn.Module, batches: Iterable[Any],
                     config: QSparseConfig | Mapping[str, Any] | None = None,
                     **options: Any) -> SparsityMeasurement:
    """Run ``model`` (eager) on ``batches`` under ``config`` and count input zeros.

    Args:
        model: the eager module; its projections are those of
            :func:`qsparse_compile.modules.all_projections` (``nn.Linear``, ``Conv1D``,
            routers, expert weights; paths matched against the config's globs, roles from
            :func:`qsparse_compile.roles.projection_roles`).
        batches: model inputs: a tensor (``model(batch)``), a tuple (``model(*batch)``) or a
            mapping (``model(**batch)``) each.
        config: a :class:`QSparseConfig` or the options dict given to ``torch.compile``
            (backend-only options such as ``inner`` are not accepted here); ``**options``
            are merged in.

    Every projection's output is replaced, for the duration of the call, by the reference
    computation on its sparsified input (ternary weights with ``quant="bitnet"``), so later
    layers see what the compiled model would give them. Runs without gradients; the
    model's train/eval mode is left as it is.
    """
    config = QSparseConfig.from_options(config, **options)
    roles = projection_roles(model)
    records: dict[str, ProjectionSparsity] = {}
    for proj in all_projections(model):
        role = roles.role(proj.path)
        # block patterns that do not divide the width: not sparsified, as the pass does
        plan = resolve_plan(proj.path, proj.in_features, config, warn=False, role=role).plan
        records[proj.path] = ProjectionSparsity(
            path=proj.path, role=role, in_features=proj.in_features,
            out_features=proj.out_features, method=_method_name(plan),
            configured=plan.sparsity if plan.method in ("topk", "block") else None,
            governed=config.governs(proj.path, role),
            experts=proj.experts, experts_per_token=proj.experts_per_token)

    def observe(path: str, x: torch.Tensor) -> None:
        record = records[path]
        record.zeros += int((x == 0).sum())
        record.elements += x.numel()

    # the oracle computes every projection (sparsified input, ternary weights for bitnet)
    with torch.no_grad(), reference_model(model, config, observe=observe):
        for batch in batches:
            _call(model, batch)
    return SparsityMeasurement(list(records.values()))
