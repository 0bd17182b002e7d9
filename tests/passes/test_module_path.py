"""Module paths and roles of projections: what globs match against and what reports show."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qsparse_compile.backend import last_compiled
from qsparse_compile.models.tiny_llama import TinyLlama, TinyLlamaConfig
from qsparse_compile.passes.module_path import normalise_path, role_of
from qsparse_compile.passes.weights import source_to_path

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


@pytest.mark.parametrize(("raw", "path"), [
    ("L['self'].model.layers[0].self_attn.q_proj", "model.layers.0.self_attn.q_proj"),
    ("L['self'].transformer.h['1'].mlp.c_fc", "transformer.h.1.mlp.c_fc"),
    ("L['fn'].0", "0"),
    ("L['fn']", ""),
    ("L['self']", ""),
    ("self.blocks.2.w1", "blocks.2.w1"),
    ("model.layers.0.mlp.down_proj", "model.layers.0.mlp.down_proj"),
], ids=["dynamo-llama", "dynamo-quoted-index", "nn-root-child", "nn-root", "root", "self",
        "already-normal"])
def test_normalise_path(raw, path):
    assert normalise_path(raw) == path


@pytest.mark.parametrize(("source", "path"), [
    ("L['self']._modules['model']._modules['layers']._modules['0']._modules['mlp']"
     "._modules['up_proj']._parameters['weight']", "model.layers.0.mlp.up_proj.weight"),
    ("L['fn']._modules['0']._parameters['weight']", "0.weight"),
    ("L['fn']._parameters['bias']", "bias"),
    ("L['self'].blocks[1]._parameters['w_in_out']", "blocks.1.w_in_out"),
], ids=["nested", "nn-root-child", "nn-root", "indexed"])
def test_source_to_path(source, path):
    assert source_to_path(source) == path


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


def _compiled_paths(model: nn.Module, x: torch.Tensor, **options) -> dict[str, bool]:
    """Path -> sparsified?, for every projection the backend found."""
    torch.compile(model, backend="qsparse", options={**options, "inner": "eager"})(x)
    return {r.projection.path: not r.plan.dense for r in last_compiled()}


def test_tied_head_is_still_called_lm_head_and_stays_dense():
    """The tied head reads the embedding's weight; the calling module names it."""
    torch.manual_seed(0)
    model = TinyLlama(TinyLlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_layers=1, num_heads=4, num_kv_heads=2,
                                      tie_embeddings=True))
    assert model.lm_head.weight is model.embed_tokens.weight
    paths = _compiled_paths(model, torch.randint(0, 64, (1, 5)), sparsity=0.5)
    assert paths.pop("lm_head") is False
    assert len(paths) == 7 and all(paths.values())


def test_sequential_root_paths_match_named_modules():
    """A torch.nn container at the root is traced as ``L['fn']``; paths must not say so."""
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    paths = _compiled_paths(model, torch.randn(3, 8), sparsity=0.5, overrides={"2": None})
    assert paths == {"0": True, "2": False}


def test_root_linear_is_the_empty_path():
    assert _compiled_paths(nn.Linear(8, 4), torch.randn(3, 8), sparsity=0.5) == {"": True}


class _Block(nn.Module):
    """Two bare parameters used functionally in one module."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(12, 8))
        self.w2 = nn.Parameter(torch.randn(12, 8))

    def forward(self, x):
        return x @ self.w1.t() + x @ self.w2.t()


class _Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_Block(), nn.Linear(12, 8)])

    def forward(self, x):
        return self.blocks[1](self.blocks[0](x))


def test_bare_parameters_are_named_by_the_parameter():
    paths = _compiled_paths(_Blocks(), torch.randn(3, 8), sparsity=0.5,
                            overrides={"blocks.0.w2": None})
    assert paths == {"blocks.0.w1": True, "blocks.0.w2": False, "blocks.1": True}


def test_export_and_dynamo_agree_on_paths():
    from qsparse_compile.config import QSparseConfig
    from qsparse_compile.export import sparsify_exported_with_records

    module, x = _Blocks(), torch.randn(3, 8)
    ep = torch.export.export(module, (x,))
    _, records = sparsify_exported_with_records(ep, QSparseConfig(sparsity=0.5))
    exported = [r.projection.path for r in records]
    assert exported == ["blocks.0.w1", "blocks.0.w2", "blocks.1"]
    assert list(_compiled_paths(module, x, sparsity=0.5)) == exported
