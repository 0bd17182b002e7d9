"""``normalise``: Dynamo and exported graphs traced to a few ATen ops, same calling convention."""

from __future__ import annotations

import warnings

import pytest
import torch
from hf_models import HF_MODELS, Logits, token_ids
from op_counts import op_counts
from torch import nn
from tracers import trace_dynamo

from qsparse_compile.passes.normalise import dedupe_views, normalise_exported

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


class Spelled(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.w = nn.Parameter(torch.randn(8, 8))

    def forward(self, x):
        h = self.lin(x).to(torch.float32).reshape(-1, 8)
        return torch.einsum("td,od->to", torch.matmul(h, self.w.T), self.w).contiguous()


def test_products_casts_and_reshapes_are_decomposed():
    module, x = Spelled(), torch.randn(2, 3, 8)
    traced = trace_dynamo(module, x)
    counts = op_counts(traced.gm)
    for composite in ("linear", "matmul", "einsum", "reshape", "to", "contiguous"):
        assert counts[composite] == 0, composite
    assert counts["mm"] + counts["addmm"] + counts["bmm"] == 3
    with torch.no_grad():
        torch.testing.assert_close(traced.run(), module(x))
    # every node carries its fake value (the passes read shapes and dtypes from it)
    assert all("val" in n.meta for n in traced.gm.graph.nodes if n.op == "call_function")


def test_norms_and_attention_stay_whole():
    traced = trace_dynamo(nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8)), torch.randn(3, 8))
    assert op_counts(traced.gm)["layer_norm"] == 1


def test_repeated_views_are_merged():
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    a = graph.call_function(torch.ops.aten.view.default, (x, [4]))
    b = graph.call_function(torch.ops.aten.view.default, (x, [4]))
    graph.output((a, b))
    assert dedupe_views(graph) == 1
    assert [n.op for n in graph.nodes] == ["placeholder", "call_function", "output"]


def test_exported_program_keeps_its_signature_and_runs():
    model = Logits(HF_MODELS["llama"].build())
    ids = token_ids()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(model, (ids,), strict=False)
    normal = normalise_exported(ep)
    assert [s.target for s in normal.graph_signature.input_specs] == [
        s.target for s in ep.graph_signature.input_specs]
    assert [n.name for n in normal.graph.nodes if n.op == "placeholder"] == [
        n.name for n in ep.graph.nodes if n.op == "placeholder"]
    counts = op_counts(normal.graph_module)
    assert counts["linear"] == 0 and counts["_assert_tensor_metadata"] == 0
    with torch.no_grad():
        torch.testing.assert_close(normal.module()(ids), model(ids))
