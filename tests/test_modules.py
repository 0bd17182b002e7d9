"""The one walker over projection modules: ``nn.Linear`` and ``Conv1D``, as every tool sees them."""

from __future__ import annotations

import torch
from hf_models import HF_MODELS
from torch import nn

from qsparse_compile.modules import projection_layout, projection_modules


def test_linear_and_conv1d_with_their_layouts():
    from transformers.pytorch_utils import Conv1D

    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), Conv1D(6, 4), nn.Embedding(3, 4))
    found = [(p.path, p.layout, p.in_features, p.out_features) for p in projection_modules(model)]
    assert found == [("0", "out_in", 8, 4), ("2", "in_out", 4, 6)]
    conv = list(projection_modules(model))[1]
    assert torch.equal(conv.weight_out_in(), model[2].weight.t())
    assert projection_layout(nn.Embedding(3, 4)) is None


def test_gpt2_walk_finds_every_projection():
    model = HF_MODELS["gpt2"].build()
    paths = [p.path for p in projection_modules(model)]
    assert paths == HF_MODELS["gpt2"].expected_paths() + ["lm_head"]


def test_moe_walk_finds_routers_and_expert_weights():
    from hf_models import EXPERTS, MOE_MODELS

    from qsparse_compile.modules import all_projections, expert_weights, moe_blocks

    model = MOE_MODELS["qwen2_moe"].build(layers=1)
    (block,) = moe_blocks(model)
    assert (block.path, block.experts_path, block.num_experts) == (
        "model.layers.0.mlp", "model.layers.0.mlp.experts", EXPERTS)
    assert [r.path for r in block.routers] == ["model.layers.0.mlp.gate",
                                               "model.layers.0.mlp.shared_expert_gate"]
    assert [r.output_is_product for r in block.routers] == [False, True]
    down = next(w for w in expert_weights(model) if w.attr == "down_proj")
    assert (down.in_features, down.out_features, down.experts) == (32, 32, EXPERTS)
    paths = [p.path for p in all_projections(model)]
    walked = [p.path for p in projection_modules(model)]
    assert "model.layers.0.mlp.gate" in walked  # the router module, not an nn.Linear
    assert paths.index("model.layers.0.mlp.experts.gate_up_proj") == \
        paths.index("model.layers.0.mlp.gate") + 1
