"""Tensor parallelism (DTensor) on 2 gloo ranks: inference with both row-parallel semantics.

Column-parallel projections (q/k/v/gate/up) read whole rows; row-parallel ones (o/down) read
a shard of each row. ``tensor_parallel="exact"`` keeps the row's global top-K (the ranks agree
with one all-gather), so the sharded model's logits equal one process's;
``tensor_parallel="per_shard"`` keeps ``max(1, round(k * D_s / D))`` of each shard, checked
against that definition written out on one process. Training under tensor parallelism is
refused with an error that says so.
"""

from __future__ import annotations

import pytest
import torch
from dist_cases import (
    OPTIONS,
    per_shard_reference_logits,
    sharded_topk_rank,
    single_process_logits,
    tensor_parallel_rank,
)
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from ranks import run_ranks
from strategies import DTYPES, activations

from qsparse_compile import reference

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

WORLD = 2


@st.composite
def sharded_cases(draw):
    """Rows whose width is a multiple of the world size, a k over the whole row, rescale."""
    x = draw(activations(draw(st.sampled_from(DTYPES)), multiple_of=WORLD, max_rows=8))
    k = draw(st.integers(1, x.shape[-1]))
    return x, k, draw(st.booleans())


# each example starts two processes: no shrinking (a failure prints its cases in full)
@settings(max_examples=2, deadline=None, phases=(Phase.explicit, Phase.generate))
@given(st.lists(sharded_cases(), min_size=24, max_size=24))
def test_exact_op_keeps_the_global_top_k(cases):
    """Each rank's output is its shard of the single-device top-K: the same entries (ties to
    the lower global index, NaN kept) with their exact values; with the L2 rescale, equal up
    to the order the squared norms are summed in."""
    shards = run_ranks(sharded_topk_rank, cases, world=WORLD)
    for i, (x, k, rescale) in enumerate(cases):
        got = torch.cat([shards[r][i] for r in range(WORLD)], dim=-1)
        want = reference.topk_sparsify(x, k, "l2" if rescale else "none")
        if rescale:  # (an inf kept makes the factor inf/inf: NaN rows on both sides)
            torch.testing.assert_close(got, want, equal_nan=True, rtol=1e-5, atol=1e-6)
        else:
            torch.testing.assert_close(got, want, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("rescale", ["none", "l2"])
def test_exact_mode_equals_one_process(rescale):
    options = {**OPTIONS, "rescale": rescale, "tensor_parallel": "exact"}
    ranks = run_ranks(tensor_parallel_rank, options, world=WORLD)
    want = single_process_logits({**OPTIONS, "rescale": rescale})
    for got in ranks:
        torch.testing.assert_close(got["logits"], want, rtol=1e-5, atol=1e-5)
    rows = {r["path"]: r for r in ranks[0]["rows"]}
    assert "exact: top-16 of the 32-wide row" in rows["model.layers.0.self_attn.o_proj"]["note"]
    assert "exact: top-32 of the 64-wide row" in rows["model.layers.1.mlp.down_proj"]["note"]
    assert rows["model.layers.0.self_attn.q_proj"]["note"] == ""  # column-parallel: whole rows
    # what the exact mode adds, measured: per token and row-parallel projection,
    # world * min(k, D_s) keys (4 bytes each in fp32); o (k=16, D_s=16) and down (k=32,
    # D_s=32) in each of 2 layers
    received = ranks[0]["received"]
    assert received["all_gather_into_tensor"] / ranks[0]["tokens"] == \
        2 * (WORLD * 16 + WORLD * 32)
    # DTensor's own all-reduce of o's and down's outputs (hidden 32, 2 layers), and with the
    # rescale two norms per row and row-parallel projection
    extra = 2 * 2 * 2 if rescale == "l2" else 0
    assert received["all_reduce"] / ranks[0]["tokens"] == 2 * 2 * 32 + extra


def test_per_shard_mode_is_its_definition():
    options = {**OPTIONS, "tensor_parallel": "per_shard"}
    ranks = run_ranks(tensor_parallel_rank, options, world=WORLD)
    want = per_shard_reference_logits(WORLD, OPTIONS)
    exact = single_process_logits(OPTIONS)
    for got in ranks:
        assert "all_gather_into_tensor" not in got["received"]  # no communication of its own
        torch.testing.assert_close(got["logits"], want, rtol=1e-5, atol=1e-5)
    # and it is another model: the logits move away from the exact mode's
    assert (ranks[0]["logits"] - exact).abs().max() > 1e-3
    rows = {r["path"]: r for r in ranks[0]["rows"]}
    assert rows["model.layers.0.mlp.down_proj"]["k"] == 16
    assert "per-shard: 16 of 32 per rank" in rows["model.layers.0.mlp.down_proj"]["note"]


def test_tensor_parallel_training_is_refused_clearly():
    for got in run_ranks(tensor_parallel_rank, OPTIONS, True, world=WORLD):
        message = got["error"]
        assert "NotImplementedError" in message, message
        assert "tensor-parallel training is not supported yet" in message
        assert "model.layers.0.self_attn.q_proj.weight" in message
