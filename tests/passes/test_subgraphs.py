"""Projections inside higher-order ops' bodies: activation checkpointing, ``wrap``.

A checkpointed layer is a ``tag_activation_checkpoint`` subgraph in Dynamo's graph; its
projections must be rewritten there, recomputed in the backward pass with the straight-through
gradient, and give the gradients of the eager straight-through reference.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from hf_models import HF_MODELS, LAYERS, token_ids
from torch.utils.checkpoint import checkpoint
from training import next_token_loss, take_gradients

import qsparse_compile
from qsparse_compile.passes.subgraphs import subgraph_calls
from qsparse_compile.reference import reference_model

OPTIONS = {"sparsity": 0.5}


def _checkpointed_llama(use_reentrant: bool) -> torch.nn.Module:
    model = HF_MODELS["llama"].build().train()
    model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    return model


def _bodies(backend: qsparse_compile.Backend) -> list:
    return [call for result in backend.results for call in subgraph_calls(result.graph)]


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_checkpointed_llama_trains_sparse_with_referencetake_gradients(use_reentrant):
    model = _checkpointed_llama(use_reentrant)
    ids = token_ids(2, 12)
    backend = qsparse_compile.Backend(OPTIONS, inner="eager")
    compiled = torch.compile(model, backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no projection may be left unseen
        next_token_loss(compiled(ids, use_cache=False).logits, ids).backward()
    got = take_gradients(model)

    sparse = [r.path for result in backend.results for r in result.records if r.plan.sparse]
    assert sorted(sparse) == sorted(HF_MODELS["llama"].expected_paths())
    # the layers stay checkpointed: one body per layer, the projections rewritten inside
    bodies = _bodies(backend)
    assert len(bodies) == LAYERS
    assert all(call.kind == "tag_activation_checkpoint" for call in bodies)
    inside = [n for call in bodies for n in call.body.graph.nodes
              if n.op == "call_function" and n.target is torch.ops.qsparse.sparse_linear.default]
    assert len(inside) == 7 * LAYERS

    with reference_model(model, **OPTIONS):
        next_token_loss(model(ids, use_cache=False).logits, ids).backward()
    expected = take_gradients(model)
    next_token_loss(model(ids, use_cache=False).logits, ids).backward()
    dense = take_gradients(model)
    assert got.keys() == expected.keys()
    for name in got:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")
    assert max((got[n] - dense[n]).abs().max() for n in got) > 1e-3


class _CheckpointedMLP(torch.nn.Module):
    """Two projections in a ``torch.utils.checkpoint`` region, one outside."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up = torch.nn.Linear(32, 64)
        self.down = torch.nn.Linear(64, 32)
        self.out = torch.nn.Linear(32, 32)

    def block(self, x):
        return self.down(F.relu(self.up(x)))

    def forward(self, x):
        return self.out(checkpoint(self.block, x, use_reentrant=False))


def test_checkpointed_region_under_inductor_matches_reference():
    """End to end through AOTAutograd and Inductor: the recomputed body keeps its ops."""
    model = _CheckpointedMLP()
    x = torch.randn(4, 32, requires_grad=True)
    backend = qsparse_compile.Backend(OPTIONS)
    out = torch.compile(model, backend=backend)(x)
    out.square().sum().backward()
    got = {**take_gradients(model), "x": x.grad.clone()}
    assert sorted(r.path for res in backend.results for r in res.records if r.plan.sparse) == \
        ["down", "out", "up"]
    assert len(_bodies(backend)) == 1

    x.grad = None
    with reference_model(model, **OPTIONS):
        model(x).square().sum().backward()
    expected = {**take_gradients(model), "x": x.grad.clone()}
    for name in got:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-5)


def test_checkpointed_inference_matches_reference():
    model = _CheckpointedMLP().eval()
    x = torch.randn(4, 32)
    with torch.no_grad():
        got = torch.compile(model, backend="qsparse",
                            options={**OPTIONS, "inner": "eager"})(x)
        with reference_model(model, **OPTIONS):
            expected = model(x)
    torch.testing.assert_close(got, expected)


def test_calibration_inside_a_checkpointed_region_is_an_error():
    from qsparse_compile.rotations import RotationGroup, Rotations

    model = _CheckpointedMLP()
    q = torch.linalg.qr(torch.randn(32, 32))[0]
    rotations = Rotations([RotationGroup(("up",), q), RotationGroup(("out",), q)])
    compiled = torch.compile(model, backend="qsparse",
                             options={**OPTIONS, "inner": "eager", "calibration": rotations})
    with pytest.raises(Exception, match="cannot be rotated"):
        compiled(torch.randn(4, 32))


class _Branches(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(32, 32)
        self.b = torch.nn.Linear(32, 32)

    def forward(self, x):
        return torch.cond(x.sum() > 0, lambda x: self.a(x), lambda x: self.b(x), (x,))


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["true", "false"])
def test_cond_branches_are_rewritten(sign):
    model = _Branches().eval()
    x = torch.randn(4, 32).abs() * sign
    backend = qsparse_compile.Backend(OPTIONS, inner="eager")
    with torch.no_grad():
        got = torch.compile(model, backend=backend)(x)
        with reference_model(model, **OPTIONS):
            expected = model(x)
    assert sorted(r.path for res in backend.results for r in res.records if r.plan.sparse) == \
        ["a", "b"]
    assert len(_bodies(backend)) == 2
    torch.testing.assert_close(got, expected)


class _MergedWeights(torch.nn.Module):
    """``a`` and ``b``'s weights reach a product only through their own product (a merged
    projection): no pass rewrites that."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(32, 32)
        self.b = torch.nn.Linear(32, 32)

    def forward(self, x):
        return x @ (self.a.weight @ self.b.weight).t()


def test_a_projection_weight_no_pass_rewrote_is_named_in_a_warning():
    compiled = torch.compile(_MergedWeights(), backend="qsparse",
                             options={**OPTIONS, "inner": "eager"})
    with pytest.warns(UserWarning, match=r"2 projection module\(s\).*stay dense: a, b$"):
        compiled(torch.randn(4, 32))


class _WeightReadAfterABreak(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(32, 32)

    def forward(self, x):
        out = self.a(x).sum()
        torch._dynamo.graph_break()
        return out + (self.a.weight ** 2).sum()  # a regulariser: not a projection read


def test_a_weight_read_by_no_product_is_not_warned_about():
    compiled = torch.compile(_WeightReadAfterABreak(), backend="qsparse",
                             options={**OPTIONS, "inner": "eager"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled(torch.randn(4, 32))
    assert not [w for w in caught if "qsparse" in str(w.message)]
