"""What the backend did is kept with what was compiled, and with a Backend object."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

import qsparse_compile as qc
from qsparse_compile.compile_records import compiled_key, records_of

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def test_each_compilation_keeps_its_own_records():
    model, x = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4)), torch.randn(3, 8)
    first = torch.compile(model, backend="qsparse", options={"sparsity": 0.5, "inner": "eager"})
    second = torch.compile(model, backend="qsparse",
                           options={"sparsity": 0.25, "inner": "eager", "exclude": ["1"]})
    first(x)
    torch._dynamo.reset()
    second(x)
    assert [r["sparsity"] for r in qc.report(first)] == [0.5, 0.5]
    assert [r["method"] for r in qc.report(second)] == ["topk", "dense"]
    assert len(records_of(first).graphs) == len(records_of(second).graphs) == 1


def test_a_backend_object_and_a_compiled_function():
    model, x = nn.Linear(8, 4), torch.randn(3, 8)
    backend = qc.Backend(sparsity=0.5, inner="eager")
    fn = torch.compile(lambda t: model(t) * 2, backend=backend)
    fn(x)
    assert len(backend.results) == 1 and "graphs=1" in repr(backend)
    assert qc.report(backend).totals == qc.report(fn).totals
    assert compiled_key(fn) is fn._torchdynamo_orig_callable


def test_records_go_with_the_model():
    model = nn.Linear(8, 4)
    compiled = torch.compile(model, backend="qsparse", options={"inner": "eager"})
    compiled(torch.randn(2, 8))
    records = records_of(compiled)
    assert records is not None
    import weakref

    ref = weakref.ref(records)
    del compiled, records
    torch._dynamo.reset()
    gc.collect()
    assert ref() is None
