"""What the backend did, kept with what was compiled.

Every graph the ``qsparse`` backend compiles yields a :class:`~.passes.GraphResult` (the
projections found, the plan of each, what each pass changed). The results are kept

* by the :class:`~qsparse_compile.backend.Backend` object, when one was passed to
  ``torch.compile``;
* for what was compiled, held weakly: the module ``torch.compile`` returned (so two
  compilations of one model keep apart), or the compiled function; so that
  ``qsparse_compile.report(compiled)`` reads them and they go when the model goes.

There is no process-wide list of "the last graphs compiled".
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

from .passes import GraphResult, RewrittenProjection
from .passes.rotate import RotatedInput

__all__ = ["CompileRecords", "compiled_key", "records_of", "remember"]


class CompileRecords:
    """The graphs compiled for one object, oldest first."""

    def __init__(self) -> None:
        self.graphs: list[GraphResult] = []

    def add(self, result: GraphResult) -> None:
        self.graphs.append(result)

    def projections(self) -> list[RewrittenProjection]:
        """Each projection once (by path), as the most recent graph holding it planned it,
        in the order first seen. Recompilations and graph breaks meet a projection several
        times; a report lists it once."""
        latest: dict[str, RewrittenProjection] = {}
        for result in self.graphs:
            for record in result.records:
                latest[record.path] = record
        order = list(dict.fromkeys(r.path for g in self.graphs for r in g.records))
        return [latest[p] for p in order]

    def rotations(self) -> list[RotatedInput]:
        """The rotations of the most recent graph holding each rotated input."""
        seen: dict[tuple[str, ...], RotatedInput] = {}
        for result in self.graphs:
            for rotation in result.rotations:
                seen[rotation.paths] = rotation
        return list(seen.values())


_BY_OBJECT: weakref.WeakKeyDictionary[Any, CompileRecords] = weakref.WeakKeyDictionary()


def compiled_key(obj: Any) -> Any:
    """The object records are kept for: what was passed to ``torch.compile``, seen through
    the compiled wrapper (a compiled module's original module, a compiled function's
    original callable) and bound methods (their object)."""
    seen = set()
    while id(obj) not in seen:
        seen.add(id(obj))
        inner = getattr(obj, "_orig_mod", None)
        if inner is not None:
            obj = inner
            continue
        original = getattr(obj, "_torchdynamo_orig_callable", None)
        if original is not None:
            obj = original
            continue
        owner = getattr(obj, "__self__", None)
        if owner is not None and callable(obj) and not isinstance(owner, type):
            obj = owner
            continue
        break
    return obj


def remember(objects: Iterable[Any], result: GraphResult) -> None:
    """Keep ``result`` for each of ``objects`` that can be held weakly."""
    for obj in {id(o): o for o in objects if o is not None}.values():
        try:
            records = _BY_OBJECT.get(obj)
        except TypeError:  # not weakly referenceable (or unhashable): nothing to keep it by
            continue
        if records is None:
            records = CompileRecords()
            try:
                _BY_OBJECT[obj] = records
            except TypeError:
                continue
        records.add(result)


def records_of(obj: Any) -> CompileRecords | None:
    """The records kept for a compiled object: what ``torch.compile`` returned for a module,
    or a compiled function (or the function itself); None if there are none."""
    for key in (obj, compiled_key(obj)):
        try:
            found = _BY_OBJECT.get(key)
        except TypeError:
            continue
        if found is not None:
            return found
    return None
