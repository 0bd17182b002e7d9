"""Count the ops of FX graphs, and a backend that records counts before and after the passes.

Tests compare counts taken before and after the passes, so a pass that silently stops firing
(or starts rewriting things it must not) fails a test rather than leaving a dense model behind.
The graphs counted are the normalised ATen graphs the passes work on: a dense projection is
an ``mm``, ``addmm`` or ``bmm`` there, whatever the model's spelling.
"""

from __future__ import annotations

import collections
from typing import Any

from qsparse_compile.backend import Backend
from qsparse_compile.passes.graph_utils import op_counts, op_name

__all__ = ["CountingBackend", "DENSE_PROJECTIONS", "dense_projections", "op_counts", "op_name",
           "without"]

#: Names under which a graph spells a dense projection (a normalised one: only the products).
DENSE_PROJECTIONS = ("linear", "mm", "addmm", "bmm")
QSPARSE_OPS = ("topk_sparsify", "block_sparsify", "int8_fake_quant", "ternary_fake_quant",
               "sparse_linear", "norm_sparsify")


def dense_projections(counts: collections.Counter) -> int:
    return sum(counts[name] for name in DENSE_PROJECTIONS)


def without(counts: collections.Counter, *names: str) -> collections.Counter:
    return collections.Counter({k: v for k, v in counts.items() if k not in names})


class CountingBackend(Backend):
    """The backend with ``inner="eager"`` by default and per-graph op counts at hand.

    ``calls`` is the number of graphs compiled; ``before`` / ``after`` hold one Counter per
    graph: the normalised graph before the passes and the graph they produced.
    """

    def __init__(self, options: dict[str, Any] | None = None, inner: str = "eager"):
        super().__init__({**(options or {}), "inner": inner})

    @property
    def calls(self) -> int:
        return len(self.results)

    @property
    def before(self) -> list[collections.Counter]:
        return [r.before for r in self.results]

    @property
    def before_live(self) -> list[collections.Counter]:
        return self.before  # the normalised graph holds no dead code

    @property
    def after(self) -> list[collections.Counter]:
        return [r.after for r in self.results]

    def records(self, graphs: int | None = None) -> list:
        """Projection records of the last ``graphs`` graphs (all by default), in order."""
        chosen = self.results if graphs is None else self.results[-graphs:]
        return [r for result in chosen for r in result.records]
