"""Roles of projections: from the model's structure (heads, routers, expert weights), then names."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qsparse_compile.roles import (
    ROLE_NAMES,
    ProjectionRoles,
    projection_roles,
    role_of,
    roles_from_parameters,
)


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


# --- structural roles ------------------------------------------------------------------------


class _Router(nn.Module):
    def __init__(self, experts: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(experts, dim))


class _Experts(nn.Module):
    def __init__(self, experts: int, dim: int, hidden: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(experts, 2 * hidden, dim))
        self.down_proj = nn.Parameter(torch.randn(experts, dim, hidden))


class _Block(nn.Module):
    def __init__(self, router: bool = True):
        super().__init__()
        if router:
            self.gate = _Router(4, 8)
        self.experts = _Experts(4, 8, 6)
        self.shared_gate = nn.Linear(8, 1)


class _Model(nn.Module):
    def __init__(self, router: bool = True):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.block = _Block(router)
        self.conv = nn.Conv1d(8, 8, 3)  # a 3-D weight that is no expert weight
        self.out = nn.Linear(8, 10)
        self.out.weight = self.embed.weight  # tied: the head, whatever its name


def test_structure_decides_before_names():
    roles = projection_roles(_Model())
    assert roles.role("block.gate") == "router"  # named like a GLU gate, scores 4 experts
    assert roles.role("block.shared_gate") == "router"  # a scalar gate beside the experts
    assert roles.role("block.experts.gate_up_proj") == "gate_up"
    assert roles.role("block.experts.down_proj") == "down"
    assert roles.role("out") == "head"  # tied to the embedding
    assert roles.role("model.layers.0.mlp.up_proj") == "up"  # names: the fallback
    count = roles.expert_count("block.experts.down_proj")
    assert (count.num_experts, count.block, count.in_features, count.out_features) == (
        4, "block", 6, 8)
    assert roles.expert_count("conv") is None and roles.expert_count("out") is None


def test_three_d_parameters_without_a_router_are_not_experts():
    roles = projection_roles(_Model(router=False))
    assert roles.experts == {} and roles.routers == {}
    assert roles.role("block.shared_gate") == "other"


def test_roles_from_parameter_names_and_shapes():
    model = _Model()
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    roles = roles_from_parameters(shapes)
    assert not roles.structural
    assert set(roles.routers) == {"block.gate", "block.shared_gate"}
    assert set(roles.experts) == {"block.experts.gate_up_proj", "block.experts.down_proj"}
    assert roles.role("block.gate") == "router"
    assert roles.heads == frozenset()  # the graph decides the head there


def test_merged_roots_and_role_names():
    merged = ProjectionRoles.merged([projection_roles(_Model(), "a"),
                                     projection_roles(nn.Linear(2, 2), "b")])
    assert merged.role("a.block.gate") == "router" and merged.role("a.out") == "head"
    assert {"head", "router", "other", "gate_up"} <= set(ROLE_NAMES)
