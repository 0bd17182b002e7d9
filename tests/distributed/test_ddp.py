"""The backend under DDP, both wrap orders, on 2 real gloo ranks.

``torch.compile(DDP(model))`` and ``DDP(torch.compile(model))`` both let Dynamo's DDP graph
splitting cut the graph at gradient-bucket boundaries and compile each piece separately, on fake
copies of the pieces' inputs. Each piece must still have every projection rewritten, named
without DDP's ``module.`` prefix, and the averaged straight-through gradients must equal those of
one process training on the global batch.
"""

from __future__ import annotations

import pytest
import torch
from dist_cases import OPTIONS, build_mlp, ddp_rank, gradients, mlp_batch, mlp_loss
from ranks import run_ranks

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def _single_process() -> dict[str, torch.Tensor]:
    model = build_mlp()
    mlp_loss(torch.compile(model, backend="qsparse", options=OPTIONS), mlp_batch()).backward()
    return gradients(model)


@pytest.mark.parametrize("order", ["compile(ddp)", "ddp(compile)"])
def test_ddp_gradients_equal_single_process(order):
    expected = _single_process()
    ranks = run_ranks(ddp_rank, order)
    for got in ranks:
        # the bucket split happened: the backend compiled more than one piece
        assert got["graphs"] >= 2, got["graphs"]
        assert got["sparse_paths"] == ["a", "b", "c"]
        assert got["grads"].keys() == expected.keys()
        for name, grad in expected.items():
            torch.testing.assert_close(got["grads"][name], grad, rtol=1e-5, atol=1e-6,
                                       msg=f"{order}: gradient of {name}")


def test_dense_run_would_differ():
    """The comparison can fail: the same step without sparsity gives other gradients."""
    model = build_mlp()
    mlp_loss(model, mlp_batch()).backward()
    dense = gradients(model)
    sparse = _single_process()
    assert max((dense[n] - sparse[n]).abs().max().item() for n in dense) > 1e-4
