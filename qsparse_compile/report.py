"""Per-projection report: what is sparsified, how much, and what fraction of weights is read.

``report(model_or_program, ...)`` returns a :class:`Report`: a list of JSON-serialisable dicts
(one per projection) with ``totals``; ``print(report)`` shows an aligned table.

A row's ``role`` is the projection's role (:mod:`qsparse_compile.roles`). An expert weight (one
matrix per expert) is one row: ``params`` counts every expert (``experts * in * out``) and
``activated_params`` the experts a token reads (``experts_per_token``, the model's
``num_experts_per_tok``) times the kept inputs (``k * out`` each); where the model does not say
how many experts a token reads, every expert is counted (an upper bound, noted).

With a calibration (rotated inputs), each inserted ``x @ Q`` costs ``D * D`` multiply-adds per
token; that cost is on the row of the first projection reading the rotated input
(``rotation_macs``, with a note naming the others sharing it) and in the totals, beside the
weights the sparse products read (``activated_params``, also multiply-adds per token).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable
from typing import Any

import torch

from .config import ProjectionPlan, QSparseConfig
from .modules import all_projections
from .passes.rewrite import RewrittenProjection
from .passes.rotate import RotatedInput
from .plan import resolve_plan
from .roles import ProjectionRoles, projection_roles, role_of

COLUMNS = ("path", "role", "shape", "method", "quant", "weights", "sparsity", "k", "params",
           "activated_params")


def projection_row(path: str, in_features: int, out_features: int, plan: ProjectionPlan,
                   k: int | None, note: str = "", role: str | None = None, experts: int = 0,
                   experts_per_token: int | None = None) -> dict[str, Any]:
    """One row: ``activated_params`` counts the weights a sparse product reads (``k * out``),
    times the experts a token reads for an expert weight (``experts > 0``). ``role`` None:
    read off the path's names."""
    count = max(experts, 1)
    read = 1 if not experts else experts_per_token
    if read is None:
        read = count
        unknown = "experts per token unknown: every expert counted as read"
        note = f"{note}; {unknown}" if note else unknown
    params = count * in_features * out_features
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
        "role": role_of(path) if role is None else role,
        "in_features": in_features,
        "out_features": out_features,
        "experts": experts,
        "experts_per_token": read if experts else 0,
        "shape": (f"{experts}x" if experts else "") + f"{out_features}x{in_features}",
        "method": method,
        "quant": plan.quant,
        "weights": plan.weights,
        "sparsity": round(float(sparsity), 6),
        "k": int(kept),
        "params": params,
        "activated_params": read * int(kept) * out_features,
        "rotation_macs": 0,
        "note": note,
    }


class Report(list):
    """Rows (dicts) of a projection report, with ``totals`` and a printable table.

    ``model_params`` (the report of a module: every parameter, embeddings and norms too) is
    shown beside the projections' count; it is not part of ``totals``, which every way of
    reporting a model agrees on.
    """

    def __init__(self, rows: Iterable[dict[str, Any]], model_params: int | None = None):
        super().__init__(rows)
        self.model_params = model_params
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
        if self.model_params:
            lines[-1] += (f"; the model has {self.model_params:,} parameters "
                          f"({self.model_params / 1e9:.1f}B)")
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
    """A report of what the passes did (a compilation's records, ``sparsify_exported``);
    ``rotations`` (``GraphResult.rotations``) adds the cost of rotated inputs."""
    rows = [projection_row(r.projection.path, r.projection.in_features,
                           r.projection.out_features, r.plan, r.k, r.note, r.role,
                           r.projection.experts, r.projection.experts_per_token)
            for r in records]
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


def compiled_report(compiled: Any) -> Report | None:
    """The report of what the backend did for a compiled object (a ``torch.compile``'d module
    or function, or a :class:`~qsparse_compile.backend.Backend`), or None if it compiled
    nothing for it (yet: compilation happens at the first call)."""
    from .compile_records import CompileRecords, records_of

    if _is_backend(compiled):
        records = CompileRecords()
        for result in compiled.results:
            records.add(result)
    else:
        records = records_of(compiled)
    if records is None or not records.graphs:
        return None
    seen = records.projections()
    report = rows_from_records(seen, records.rotations())
    unseen = unseen_projections(records.graphs, seen)
    if not unseen:
        return report
    warnings.warn(
        f"report: {len(unseen)} projection(s) of the compiled model are read by no compiled "
        f"graph (they ran outside the graphs Dynamo captured, dense, or did not run): "
        f"{', '.join(p.path for p in unseen[:8])}{' ...' if len(unseen) > 8 else ''}",
        stacklevel=3)
    dense = ProjectionPlan(None, None, None)
    return Report([*report, *(projection_row(
        p.path, p.in_features, p.out_features, dense, None,
        "read by no compiled graph: ran uncompiled (dense), or not at all", None, p.experts,
        p.experts_per_token)
        for p in unseen)])


def unseen_projections(graphs: Iterable[Any], seen: Iterable[RewrittenProjection]) -> list:
    """The compiled root's projections (``GraphResult.model_projections``) that no record
    names: modules the compiled graphs never read."""
    names = {p for r in seen for p in (r.path, *r.projection.aliases)}
    candidates = {p.path: p for g in graphs for p in g.model_projections}
    return [p for path, p in candidates.items() if path not in names]


def report(model_or_program: Any, *example_args: Any, config: QSparseConfig | None = None,
           calibration: Any = None, **options: Any) -> Report:
    """Report every projection of a model, compiled model or exported program.

    * a compiled model or function, or a :class:`~qsparse_compile.backend.Backend`: what the
      backend did to the graphs it compiled (paths, plans, ``k``), as it recorded them;
      no options may be given (the compilation's own options apply);
    * an ``ExportedProgram``: the projections the passes find in its graph;
    * a module with ``example_args``: the module is exported first, so functional projections
      (``x @ W.t()``) are found as the compiler finds them;
    * a module alone: its ``nn.Linear`` and ``Conv1D`` submodules.

    ``calibration`` (a calibration or the path of a saved one) counts the rotations the
    compiler would insert for it (``rotation_macs``).
    """
    from torch.nn.parallel import DistributedDataParallel

    from .export import sparsify_exported_with_result
    from .rotations import as_rotations

    while isinstance(model_or_program, DistributedDataParallel):
        # DDP(torch.compile(model)): DDP adds no name; what it wraps was compiled
        model_or_program = model_or_program.module
    if _is_compiled(model_or_program) or _is_backend(model_or_program) or hasattr(
            model_or_program, "_torchdynamo_orig_callable"):
        if options or config is not None or calibration is not None or example_args:
            raise ValueError("report: a compiled model reports what its compilation did, under "
                             "its own options; give the uncompiled model to report other options")
        compiled = compiled_report(model_or_program)
        if compiled is None:
            raise ValueError(f"report: nothing was compiled for this "
                             f"{type(model_or_program).__name__} with backend='qsparse': "
                             f"torch.compile compiles at the first call, and Dynamo reuses a "
                             f"graph compiled for another instance of the same class")
        return compiled
    config = QSparseConfig.from_options(config, **options)
    rotations = None if calibration is None else as_rotations(calibration,
                                                              "report: calibration")
    if isinstance(model_or_program, torch.export.ExportedProgram):
        _, result = sparsify_exported_with_result(model_or_program, config, True, rotations)
        return rows_from_records(result.records, result.rotations)
    if not isinstance(model_or_program, torch.nn.Module):
        raise TypeError(f"report: expected an nn.Module or an ExportedProgram, a compiled model "
                        f"or function, or a Backend; got {type(model_or_program).__name__}")
    if example_args:
        ep = torch.export.export(model_or_program, tuple(example_args), strict=False)
        _, result = sparsify_exported_with_result(ep, config, True, rotations)
        return rows_from_records(result.records, result.rotations)
    roles = projection_roles(model_or_program)
    rows = []
    for proj in all_projections(model_or_program):
        role = roles.role(proj.path)
        resolved = resolve_plan(proj.path, proj.in_features, config, role=role)
        rows.append(projection_row(proj.path, proj.in_features, proj.out_features,
                                   resolved.plan, resolved.k, resolved.note, role,
                                   proj.experts, proj.experts_per_token))
    every = {id(p): p.numel() for p in model_or_program.parameters()}  # tied ones once
    return Report(with_rotations(rows, _calibrated_rotations(rotations, config, roles)),
                  model_params=sum(every.values()))


def _is_backend(obj: Any) -> bool:
    from .backend import Backend

    return isinstance(obj, Backend)


def _is_compiled(obj: Any) -> bool:
    """Whether ``obj`` is what ``torch.compile`` returned for a module."""
    return isinstance(getattr(obj, "_orig_mod", None), torch.nn.Module)


def _calibrated_rotations(calibration: Any, config: QSparseConfig, roles: ProjectionRoles
                          ) -> list[RotatedInput]:
    """The rotations a compile with ``calibration`` inserts: one per group of projections
    sharing an input, over the members that are sparsified (top-K or block)."""
    if calibration is None:
        return []
    out = []
    for group in calibration.groups:
        paths = tuple(p for p in group.paths
                      if config.plan_for(p, roles.role(p)).method in ("topk", "block"))
        if paths:
            out.append(RotatedInput(paths, group.dim))
    return out
