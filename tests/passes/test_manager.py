"""The pass manager: the order of the passes, what each did, and one clean-up that keeps
side effects (a static KV cache's in-place writes)."""

from __future__ import annotations

import pytest
import torch
from hf_models import HF_MODELS, token_ids
from op_counts import CountingBackend
from torch import nn

from qsparse_compile.passes import cpu_decode

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def _compile(model, options, *args, grad=False, **kwargs):
    backend = CountingBackend(options)
    with torch.set_grad_enabled(grad):
        torch.compile(model, backend=backend, fullgraph=True)(*args, **kwargs)
    return backend.results[0]


def test_passes_run_in_order_and_report_what_they_changed(monkeypatch):
    monkeypatch.setattr(cpu_decode, "_max_sparse_rows", lambda *args: 8)
    monkeypatch.setattr(cpu_decode, "_max_dense_rows", lambda *args: 1)
    model = HF_MODELS["llama"].build()
    result = _compile(model, {"sparsity": 0.5}, token_ids(1, 1), use_cache=False)
    assert list(result.passes) == ["rewrite", "share", "cpu_decode", "dense_decode", "fuse",
                                   "fold_weights"]
    assert result.passes["rewrite"] == 14 and result.passes["cpu_decode"] == 8
    assert result.passes["dense_decode"] == 1  # the head
    assert result.passes["fold_weights"] == 0  # no weight format: nothing to fold
    assert result.inference and result.triton is None
    assert sum(r.plan.dense for r in result.records) == 1  # the head


def test_training_graphs_take_no_lowering():
    model = HF_MODELS["llama"].build().train()
    ids = token_ids()
    result = _compile(model, {"sparsity": 0.5}, ids, grad=True, use_cache=False)
    assert list(result.passes) == ["rewrite", "share", "fuse"]
    assert not result.inference and result.constants == {}


def test_nothing_to_rewrite_runs_no_other_pass():
    result = _compile(nn.Linear(4, 4), {"sparsity": 0.5, "exclude": ["*"]}, torch.randn(2, 4))
    assert result.passes == {"rewrite": 0} and result.after == result.before


def test_clean_up_keeps_in_place_writes():
    class Cache(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.register_buffer("cache", torch.zeros(3, 4))

        def forward(self, x):
            self.cache.index_copy_(0, torch.tensor([1]), x)  # result unused: a side effect
            return self.proj(x)

    module = Cache()
    result = _compile(module, {"sparsity": 0.5}, torch.ones(1, 4))
    assert result.after["index_copy_"] == result.before["index_copy_"] == 1
    assert torch.equal(module.cache[1], torch.ones(4))
