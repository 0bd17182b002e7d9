"""The built-in TinyLlama: shapes, configuration checks, causality, and compiled vs reference."""

from __future__ import annotations

import pytest
import torch
from op_counts import CountingBackend, dense_projections

from qsparse_compile.reference import reference_model
from qsparse_compile.research.models.tiny_llama import TinyLlama, TinyLlamaConfig

SMALL = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_layers": 2,
         "num_heads": 4, "num_kv_heads": 2}


def _model(**changes) -> TinyLlama:
    torch.manual_seed(0)
    return TinyLlama(TinyLlamaConfig(**{**SMALL, **changes})).eval()


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


@pytest.mark.parametrize("shape", [(1, 1), (2, 7), (3, 16)], ids=lambda s: "x".join(map(str, s)))
def test_logits_shape(shape):
    model = _model()
    with torch.no_grad():
        out = model(torch.randint(0, 64, shape))
    assert out.shape == (*shape, 64) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_projections_are_named_as_in_llama_checkpoints():
    model = _model(num_layers=1)
    linears = [p for p, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert linears == [
        "layers.0.self_attn.q_proj", "layers.0.self_attn.k_proj", "layers.0.self_attn.v_proj",
        "layers.0.self_attn.o_proj", "layers.0.mlp.gate_proj", "layers.0.mlp.up_proj",
        "layers.0.mlp.down_proj", "lm_head"]
    attn = model.layers[0].self_attn
    assert attn.k_proj.out_features == 32 // 4 * 2  # grouped KV heads


def test_tied_embeddings_share_one_tensor():
    model = _model(tie_embeddings=True)
    assert model.lm_head.weight is model.embed_tokens.weight


@pytest.mark.parametrize(("changes", "message"), [
    ({"hidden_size": 30}, "hidden_size"),
    ({"num_kv_heads": 3}, "num_kv_heads"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_bad_config_is_rejected(changes, message):
    with pytest.raises(ValueError, match=message):
        TinyLlamaConfig(**{**SMALL, **changes})


def test_causal():
    """Changing a later token never changes an earlier position's logits."""
    model = _model()
    ids = torch.randint(0, 64, (1, 9))
    changed = ids.clone()
    changed[0, 6] = (ids[0, 6] + 1) % 64
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


@pytest.mark.parametrize("hidden_act", ["silu", "relu2"])
def test_compiled_matches_reference(hidden_act):
    model = _model(hidden_act=hidden_act)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    options = {"sparsity": 0.4}
    backend = CountingBackend(options)
    with torch.no_grad():
        out = torch.compile(model, backend=backend, fullgraph=True)(ids)
        with reference_model(model, **options):
            expected = model(ids)
        dense = model(ids)
    assert dense_projections(backend.before[0]) == 7 * 2 + 1
    assert backend.after[0]["sparse_linear"] == 7 * 2
    assert dense_projections(backend.after[0]) == 1
    assert [r.projection.path for r in backend.records() if r.plan.dense] == ["lm_head"]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert (out - dense).abs().max() > 1e-3
