"""Count the ops of FX graphs, and a Dynamo backend that counts before and after the passes.

Tests compare counts taken before and after a pass, so a pass that silently stops firing (or
starts rewriting things it must not) fails a test rather than leaving a dense model behind.
"""

from __future__ import annotations

import collections
import operator
from typing import Any

import torch
import torch.fx

from qsparse_compile.backend import qsparse_backend

#: Names under which the graphs we see spell a dense projection.
DENSE_PROJECTIONS = ("linear", "addmm", "mm", "bmm")
QSPARSE_OPS = ("topk_sparsify", "block_sparsify", "int8_fake_quant", "ternary_fake_quant",
               "sparse_linear", "norm_sparsify")


def op_name(node: torch.fx.Node) -> str:
    """A short, stable name for a node's target.

    ``qsparse.sparse_linear.default`` -> ``sparse_linear``; ``aten.mm.default`` -> ``mm``;
    ``torch._C._nn.linear`` / ``F.linear`` -> ``linear``; ``operator.matmul`` -> ``matmul``;
    methods keep their name (``"t"``, ``"view"``).
    """
    target = node.target
    if isinstance(target, str):
        return target
    if isinstance(target, torch._ops.OpOverload):
        return target._opname
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name.split("::")[-1]
    if target is operator.matmul:
        return "matmul"
    return getattr(target, "__name__", str(target))


def op_counts(gm: torch.fx.GraphModule) -> collections.Counter:
    """How many times each op is called in ``gm`` (placeholders, outputs, attributes skipped)."""
    return collections.Counter(
        op_name(n) for n in gm.graph.nodes if n.op in ("call_function", "call_method"))


def live_op_counts(gm: torch.fx.GraphModule) -> collections.Counter:
    """:func:`op_counts` of a dead-code-eliminated copy of ``gm`` (``gm`` is left untouched).

    The passes end with dead-code elimination, so "before" counts taken this way differ from
    "after" counts only by what the passes themselves did.
    """
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    graph.eliminate_dead_code()
    return collections.Counter(
        op_name(n) for n in graph.nodes if n.op in ("call_function", "call_method"))


def dense_projections(counts: collections.Counter) -> int:
    return sum(counts[name] for name in DENSE_PROJECTIONS)


def without(counts: collections.Counter, *names: str) -> collections.Counter:
    return collections.Counter({k: v for k, v in counts.items() if k not in names})


class CountingBackend:
    """``qsparse_backend`` wrapped to record op counts before and after, per compiled graph.

    ``calls`` is the number of graphs compiled (a compile counter); ``before`` / ``after``
    hold one Counter per graph; ``before_live`` leaves out nodes that were dead already.
    """

    def __init__(self, options: dict[str, Any] | None = None, inner: str = "eager"):
        self.options = {**(options or {}), "inner": inner}
        self.before: list[collections.Counter] = []
        self.after: list[collections.Counter] = []
        self.before_live: list[collections.Counter] = []

    @property
    def calls(self) -> int:
        return len(self.before)

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list):
        self.before.append(op_counts(gm))
        self.before_live.append(live_op_counts(gm))
        compiled = qsparse_backend(gm, example_inputs, options=self.options)
        self.after.append(op_counts(gm))
        return compiled
