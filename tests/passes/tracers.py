"""Small normalised graphs from both entry points of the compiler, each with its weight table.

Dynamo (a graph captured by ``torch.compile``, parameters named by identity) and
``torch.export`` (before and after ``run_decompositions``), each traced to the normalised ATen
the passes read (:mod:`qsparse_compile.passes.normalise`). ``run()`` executes the graph as it
is now (after a pass rewrote it) on the example input and returns the module's output.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable

import torch
from torch import nn

from qsparse_compile.passes import WeightTable
from qsparse_compile.passes.identity import ParameterNames, compiled_call, roots_for
from qsparse_compile.passes.manager import clean_up
from qsparse_compile.passes.normalise import normalise, normalise_exported


@dataclasses.dataclass
class Traced:
    gm: torch.fx.GraphModule
    weights: WeightTable
    run: Callable[[], torch.Tensor]


def trace_dynamo(module: nn.Module, x: torch.Tensor) -> Traced:
    captured = []

    def backend(gm, example_inputs):
        names = ParameterNames(roots_for(compiled_call(), [
            t for t in example_inputs if isinstance(t, torch.Tensor)]))
        graph = normalise(gm, example_inputs)
        captured.append((graph, WeightTable.for_dynamo(graph, example_inputs, names),
                         list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(module, backend=backend, fullgraph=True)(x)
    torch._dynamo.reset()
    assert len(captured) == 1
    gm, weights, inputs = captured[0]

    def run() -> torch.Tensor:
        clean_up(gm)
        out = gm(*inputs)
        return out[0] if isinstance(out, (tuple, list)) else out

    return Traced(gm, weights, run)


def _from_program(ep: torch.export.ExportedProgram, x: torch.Tensor) -> Traced:
    ep = normalise_exported(ep)

    def run() -> torch.Tensor:
        clean_up(ep.graph_module)
        return ep.module()(x)

    return Traced(ep.graph_module, WeightTable.from_export(ep), run)


def trace_export(module: nn.Module, x: torch.Tensor) -> Traced:
    return _from_program(torch.export.export(module, (x,)), x)


def trace_export_decomposed(module: nn.Module, x: torch.Tensor) -> Traced:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(module, (x,)).run_decompositions()
    return _from_program(ep, x)


TRACERS = {
    "dynamo": trace_dynamo,
    "export": trace_export,
    "export-aten": trace_export_decomposed,
}
