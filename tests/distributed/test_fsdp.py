"""The backend under FSDP2 (``fully_shard``), each decoder layer compiled, on 2 gloo ranks.

The order torchtitan uses: compile each block, then shard it. Under FSDP2 a layer's forward runs
on its unsharded parameters, which the backend names by identity like any other; the losses of
several straight-through training steps must equal one process training on the global batch,
with no recompilation after the first step.
"""

from __future__ import annotations

import pytest
import torch
from dist_cases import (
    OPTIONS,
    build_llama,
    compile_layers,
    compiled_after_fully_shard_rank,
    fsdp_rank,
    llama_batch,
    train_steps,
)
from ranks import run_ranks

from qsparse_compile import Backend

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

STEPS = 10
LAYER_PATHS = ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj",
               "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"]


def _single_process(steps: int) -> list[float]:
    model = build_llama()
    compile_layers(model, Backend(OPTIONS))
    return train_steps(model, llama_batch(), steps)


@pytest.mark.parametrize("mixed", [False, True], ids=["fp32", "bf16-params-fp32-reduce"])
def test_fsdp_losses_equal_single_process(mixed):
    expected = _single_process(STEPS)
    # the run trains: a test of equal losses means nothing if nothing moves
    assert expected[-1] < expected[0] - 0.05, expected
    ranks = run_ranks(fsdp_rank, mixed, STEPS)
    # bf16 compute rounds every product; fp32 differs only in the order of the reductions
    rel = 2e-2 if mixed else 1e-5
    for got in ranks:
        assert got["sparse_paths"] == LAYER_PATHS
        first, last = got["graphs"]
        assert first >= 1 and last == first, f"recompiled after the first step: {got['graphs']}"
        for step, (a, b) in enumerate(zip(got["losses"], expected, strict=True)):
            assert abs(a - b) <= rel * abs(b), f"step {step}: {a} vs {b} (losses {got['losses']})"


def test_model_compiled_after_fully_shard():
    """The whole model compiled after ``fully_shard``: Dynamo breaks the graph at FSDP2's
    hooks, so each graph reads unsharded plain parameters, which the backend names as in one
    process; inference equals one process's. (Were DTensor parameters of a sharded model
    ever to reach the backend, it refuses them rather than take them for tensor-parallel.)"""
    from dist_cases import single_process_logits

    want = single_process_logits(OPTIONS)
    for got in run_ranks(compiled_after_fully_shard_rank):
        # one graph per decoder-layer frame, reused for the second layer (whose sparsity
        # the logits show)
        assert got["sparse_paths"] == [f"model.layers.0.{p}" for p in LAYER_PATHS]
        torch.testing.assert_close(got["logits"], want, rtol=1e-5, atol=1e-5)
