"""``dims``: which source dimension each dimension of a view is, through view-like ATen ops."""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from qsparse_compile.passes.dims import feature_view, trace_dims
from qsparse_compile.passes.normalise import trace_normalised


def _graph(fn, *shapes):
    mode = FakeTensorMode()
    with mode:
        gm = trace_normalised(fn, [torch.empty(*s) for s in shapes])
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    output = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    return placeholders, output[0] if isinstance(output, (tuple, list)) else output


def test_transposes_permutes_and_broadcasts_are_followed():
    (w,), out = _graph(lambda w: w.t().unsqueeze(0).expand(3, 4, 5), (5, 4))
    traced = trace_dims(out, lambda n: n is w)
    assert traced.source is w and traced.labels == (None, 1, 0)
    (w,), out = _graph(lambda w: w.permute(1, 0).reshape(4, 1, 5), (5, 4))
    assert trace_dims(out, lambda n: n is w).labels == (1, None, 0)


def test_views_that_move_data_between_tracked_dims_are_refused():
    (w,), out = _graph(lambda w: w.reshape(20), (5, 4))
    assert trace_dims(out, lambda n: n is w) is None
    (w,), out = _graph(lambda w: w.expand(2, 5, 4).sum(0), (1, 5, 4))
    assert trace_dims(out, lambda n: n is w) is None  # not a view


def test_feature_views_keep_the_features_last():
    (x,), out = _graph(lambda x: x.reshape(-1, 8), (2, 3, 8))
    traced = feature_view(out, lambda n: n is x)
    assert traced is not None and traced.labels[-1] == 2
    (x,), out = _graph(lambda x: x.transpose(-1, -2), (2, 3, 8))
    assert feature_view(out, lambda n: n is x) is None  # features moved
    (x,), out = _graph(lambda x: x.to(torch.bfloat16), (2, 8))
    assert feature_view(out, lambda n: n is x) is None  # a cast is not a view of the rows
