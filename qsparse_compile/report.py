"""Per-projection report: what is sparsified, how much, and what fraction of weights is read.

``report(model_or_program, ...)`` returns a :class:`Report`: a list of JSON-serialisable dicts
(one per projection) with ``totals``; ``print(report)`` shows an aligned table.

With a calibration (rotated inputs), each inserted ``x @ Q`` costs ``D * D`` multiply-adds per
token; that cost is on the row of the first projection reading the rotated input
(``rotation_macs``, with a note naming the others sharing it) and in the totals, beside the
weights the sparse products read (``activated_params``, also multiply-adds per token).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import torch

from .config import ProjectionPlan, QSparseConfig
from .passes.module_path import role_of
from .passes.rewrite import RewrittenProjection
from .passes.rotate import RotatedInput

COLUMNS = ("path", "role", "shape", "method", "quant", "sparsity", "k", "params",
           "activated_params")


def projection_row(path: str, in_features: int, out_features: int, plan: ProjectionPlan,
                   k: int | None, note: str = "") -> dict[str, Any]:
    """One row: ``activated_params`` counts the weights a sparse product reads (``k * out``)."""
    params = in_features * out_features
    if not plan.sparse:
        method, sparsity, kept = "dense", 0.0, in_features
    elif plan.method == "block":
        method, sparsity, kept = f"block {plan.block[0]}:{plan.block[1]}", plan.sparsity, k
    elif plan.method == "relu":
        # data-dependent: count every weight as activated (an upper bound), measure to know
        method, sparsity, kept = "relu", 0.0, in_features
    else:
        method, sparsity, kept = "topk", plan.sparsity, k
    return {
        "path": path,
        "role": role_of(path),
        "in_features": in_features,
        "out_features": out_features,
        "shape": f"{out_features}x{in_features}",
        "method": method,
        "quant": plan.quant,
        "sparsity": round(float(sparsity), 6),
        "k": int(kept),
        "params": params,
        "activated_params": int(kept) * out_features,
        "rotation_macs": 0,
        "note": note,
    }


class Report(list):
    """Rows (dicts) of a projection report, with ``totals`` and a printable table."""

    def __init__(self, rows: Iterable[dict[str, Any]]):
        super().__init__(rows)
        params = sum(r["params"] for r in self)
        activated = sum(r["activated_params"] for r in self)
        self.totals = {
            "projections": len(self),
            "sparsified": sum(r["method"] != "dense" for r in self),
            "params": params,
            "activated_params": activated,
            "activated_fraction": activated / params if params else 1.0,
            "rotation_macs": sum(r.get("rotation_macs", 0) for r in self),
        }

    def to_dict(self) -> dict[str, Any]:
        return {"rows": list(self), "totals": dict(self.totals)}

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def table(self) -> str:
        cells = [list(COLUMNS)] + [[_fmt(r[c]) for c in COLUMNS] for r in self]
        widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                 for row in cells]
        lines.insert(1, "  ".join("-" * w for w in widths))
        t = self.totals
        lines.append(
            f"{t['sparsified']}/{t['projections']} projections sparsified; activated weight "
            f"parameters {t['activated_params']:,} of {t['params']:,} "
            f"({100 * t['activated_fraction']:.1f}%)"
        )
        if t["rotation_macs"]:
            lines[-1] += (f"; rotations add {t['rotation_macs']:,} multiply-adds per token "
                          f"({100 * t['rotation_macs'] / max(t['activated_params'], 1):.1f}% of "
                          f"the activated)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:g}" if isinstance(value, float) else f"{value:,}" if isinstance(
        value, int) else str(value)


def rows_from_records(records: Iterable[RewrittenProjection],
                      rotations: Iterable[RotatedInput] = ()) -> Report:
    """A report of what a pass did (``backend.last_compiled()``, ``sparsify_exported``);
    ``rotations`` (``PassResult.rotations``) adds the cost of rotated inputs."""
    rows = [projection_row(r.projection.path, r.projection.in_features,
                           r.projection.out_features, r.plan, r.k, r.note) for r in records]
    return Report(with_rotations(rows, rotations))


def with_rotations(rows: list[dict[str, Any]], rotations: Iterable[RotatedInput]
                   ) -> list[dict[str, Any]]:
    """Put each rotation's ``D * D`` multiply-adds per token on its first projection's row."""
    by_path = {r["path"]: r for r in rows}
    for rot in rotations:
        first = by_path.get(rot.paths[0])
        if first is None:
            continue
        first["rotation_macs"] += rot.macs_per_token
        for path in rot.paths:
            row = by_path.get(path)
            if row is None:
                continue
            others = [p for p in rot.paths if p != path]
            note = "rotated input" + (f" shared with {', '.join(others)}" if others else "")
            row["note"] = f"{row['note']}; {note}" if row["note"] else note
    return rows


def _module_projections(model: torch.nn.Module):
    """(path, in, out) of ``nn.Linear`` and ``Conv1D``-style (``weight [in, out]``) modules."""
    for path, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, torch.nn.Linear):
            yield path, module.in_features, module.out_features
        elif type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) \
                and weight.dim() == 2:
            yield path, weight.shape[0], weight.shape[1]


def report(model_or_program: torch.nn.Module | torch.export.ExportedProgram,
           *example_args: Any, config: QSparseConfig | None = None,
           calibration: Any = None, **options: Any) -> Report:
    """Report every projection of a model or exported program under the given options.

    * an ``ExportedProgram``: the projections the pass finds in its graph;
    * a module with ``example_args``: the module is exported first, so functional projections
      (``x @ W.t()``) are found as the compiler finds them;
    * a module alone: its ``nn.Linear`` and ``Conv1D`` submodules.

    ``calibration`` (a :class:`~qsparse_compile.Calibration` or the path of a saved one)
    counts the rotations the compiler would insert for it (``rotation_macs``).
    """
    from .calibration import as_calibration
    from .export import _sparsify_exported

    config = QSparseConfig.from_options(config, **options)
    cal = None if calibration is None else as_calibration(calibration, "report: calibration")
    if isinstance(model_or_program, torch.export.ExportedProgram):
        _, records, rotations = _sparsify_exported(model_or_program, config, True, cal)
        return rows_from_records(records, rotations)
    if not isinstance(model_or_program, torch.nn.Module):
        raise TypeError(f"report: expected an nn.Module or an ExportedProgram, got "
                        f"{type(model_or_program).__name__}")
    if example_args:
        ep = torch.export.export(model_or_program, tuple(example_args), strict=False)
        _, records, rotations = _sparsify_exported(ep, config, True, cal)
        return rows_from_records(records, rotations)
    from .passes.rewrite import plan_projection

    rows = []
    for path, in_f, out_f in _module_projections(model_or_program):
        probe = _PathOnly(path, in_f, out_f)
        plan, k, note = plan_projection(probe, config)
        rows.append(projection_row(path, in_f, out_f, plan, k, note))
    return Report(with_rotations(rows, _calibrated_rotations(cal, config)))


def _calibrated_rotations(calibration: Any, config: QSparseConfig) -> list[RotatedInput]:
    """The rotations a compile with ``calibration`` inserts: one per group of projections
    sharing an input, over the members that are sparsified (top-K or block)."""
    if calibration is None:
        return []
    out = []
    for group in calibration.groups:
        paths = tuple(p for p in group.paths
                      if config.plan_for(p).method in ("topk", "block"))
        if paths:
            out.append(RotatedInput(paths, group.dim))
    return out


class _PathOnly:
    """The fields of a projection that planning needs, for projections found by module walk."""

    def __init__(self, path: str, in_features: int, out_features: int):
        self.path, self.in_features, self.out_features = path, in_features, out_features
