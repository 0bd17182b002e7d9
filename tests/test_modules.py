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
