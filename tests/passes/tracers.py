"""Small graphs from every tracer the compiler meets, each with its table of weights.

``symbolic_trace`` (``get_attr`` weights, shapes from fake-tensor propagation), Dynamo
(lifted parameters), ``torch.export`` and ``torch.export`` after ``run_decompositions``.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from qsparse_compile.passes import WeightTable


class _NoLeaves(torch.fx.Tracer):
    """Trace through ``nn.Linear`` too, so its ``F.linear`` call is in the graph."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return False


def trace_symbolic(module: nn.Module, x: torch.Tensor):
    gm = torch.fx.GraphModule(module, _NoLeaves().trace(module))
    # symbolic_trace records no shapes; the pass reads them from fake values
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    FakeTensorProp(gm, mode).propagate(mode.from_tensor(x))
    return gm, WeightTable.from_graph_module(gm)


def trace_dynamo(module: nn.Module, x: torch.Tensor):
    captured = []

    def backend(gm, example_inputs):
        captured.append((gm, WeightTable.from_dynamo(gm, example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(module, backend=backend, fullgraph=True)(x)
    torch._dynamo.reset()
    assert len(captured) == 1
    return captured[0]


def trace_export(module: nn.Module, x: torch.Tensor):
    ep = torch.export.export(module, (x,))
    return ep.graph_module, WeightTable.from_export(ep)


def trace_export_decomposed(module: nn.Module, x: torch.Tensor):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(module, (x,)).run_decompositions()
    return ep.graph_module, WeightTable.from_export(ep)


TRACERS = {
    "symbolic_trace": trace_symbolic,
    "dynamo": trace_dynamo,
    "export": trace_export,
    "export-aten": trace_export_decomposed,
}
