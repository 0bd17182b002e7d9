"""``node_args``: op arguments by schema name, however a node spells them."""

from __future__ import annotations

import pytest
import torch
import torch.fx

import qsparse_compile  # noqa: F401  (registers torch.ops.qsparse)
from qsparse_compile.passes.node_args import arguments, call_args, freeze, retarget

aten, qsparse = torch.ops.aten, torch.ops.qsparse


def _node(target, args, kwargs=None):
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    return graph.call_function(target, (x, *args), kwargs or {}), x


def test_positional_keyword_and_default_arguments():
    node, x = _node(aten.addmm.default, (None, None), {"alpha": 2})
    assert arguments(node) == {"self": x, "mat1": None, "mat2": None, "beta": 1, "alpha": 2}
    node, x = _node(qsparse.topk_sparsify.default, (4,), {"rescale": True, "ste": False})
    assert arguments(node) == {"x": x, "k": 4, "rescale": True, "ste": False}


def test_calls_are_built_in_schema_order():
    args, kwargs = call_args(aten.mean.dim, {"self": 1, "dim": [-1], "keepdim": True})
    assert args == (1, [-1], True) and kwargs == {}
    args, kwargs = call_args(aten.mean.dim, {"self": 1, "dim": [-1], "dtype": torch.float32})
    assert args == (1, [-1]) and kwargs == {"dtype": torch.float32}
    node, x = _node(qsparse.topk_sparsify.default, (4, False, True))
    retarget(node, qsparse.block_sparsify.default,
             {"x": x, "n": 2, "m": 4, "rescale": False, "ste": True})
    assert node.target is qsparse.block_sparsify.default and node.args == (x, 2, 4, False, True)


def test_errors_and_keys():
    with pytest.raises(ValueError, match="has no argument"):
        call_args(aten.mm.default, {"self": 1, "other": 2})
    with pytest.raises(ValueError, match="needs 'mat2'"):
        call_args(aten.mm.default, {"self": 1})
    with pytest.raises(TypeError, match="not an operator overload"):
        arguments(_node(torch.relu, ())[0])
    assert freeze({"a": [1, [2]]}) == (("a", (1, (2,))),)
