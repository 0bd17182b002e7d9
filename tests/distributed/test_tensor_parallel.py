"""Tensor parallelism (DTensor) is refused with an error that says so, on 2 gloo ranks.

A row-parallel projection's input is sharded across ranks, so a per-rank top-K is not the
token's top-K; until the compiler implements semantics for it, compiling such a program must
fail loudly, naming the sharded parameters, instead of running another model.
"""

from __future__ import annotations

import pytest
from dist_cases import tensor_parallel_rank
from ranks import run_ranks

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def test_tensor_parallel_is_refused_clearly():
    for message in run_ranks(tensor_parallel_rank):
        assert "NotImplementedError" in message, message
        assert "tensor-parallel programs are not supported yet" in message
        assert "model.layers.0.self_attn.q_proj.weight" in message
