"""Roles of projections from their module paths (descriptive: reports, per-role statistics)."""

from __future__ import annotations

import pytest

from qsparse_compile.roles import role_of


@pytest.mark.parametrize(("path", "role"), [
    ("model.layers.3.self_attn.q_proj", "q"),
    ("model.layers.3.self_attn.k_proj", "k"),
    ("model.layers.3.self_attn.v_proj", "v"),
    ("model.layers.3.self_attn.o_proj", "o"),
    ("model.layers.3.mlp.gate_proj", "gate"),
    ("model.layers.3.mlp.up_proj", "up"),
    ("model.layers.3.mlp.down_proj", "down"),
    ("model.layers.3.mlp.gate_up_proj", "gate_up"),
    ("transformer.h.0.attn.c_attn", "qkv"),
    ("transformer.h.0.attn.c_proj", "o"),
    ("transformer.h.0.mlp.c_fc", "up"),
    ("transformer.h.0.mlp.c_proj", "down"),
    ("bert.encoder.layer.0.attention.self.query", "q"),
    ("bert.encoder.layer.0.attention.output.dense", "o"),
    ("bert.encoder.layer.0.intermediate.dense", "up"),
    ("bert.encoder.layer.0.output.dense", "down"),
    ("lm_head", "head"),
    ("gpt_neox.embed_out", "head"),
    ("classifier", "other"),
    ("pooler.dense", "other"),
])
def test_role_of(path, role):
    assert role_of(path) == role
