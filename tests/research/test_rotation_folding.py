"""Rotation folding: the folded model is the same function, and top-K acts in the rotated basis.

At sparsity 0 the folded model's logits equal the original's (fp32, 1e-4 relative to the
largest logit) on tiny Llama, Qwen2 (q/k/v biases), Mistral, a tied-head Llama and a Llama with
o/down biases. Every RMSNorm weight is set away from ones first, so the norm fold is exercised.
With sparsity, the compiled folded model equals the eager reference that applies the same
rotation explicitly (``sparsify(n Q) (W Q)^T``) to the q/k/v/gate/up inputs of the model whose
norm weights were folded but whose residual stream was not rotated.
"""

from __future__ import annotations

import pytest
import torch
from hf_models import HF_MODELS, LAYERS, logits, perturb_norms_and_biases, relative_error, token_ids
from op_counts import CountingBackend
from rotated_reference import rotated_reference

from qsparse_compile.reference import reference_model
from qsparse_compile.research.rotation_folding import (
    ORTHOGONALITY_TOLERANCE,
    check_orthogonal,
    fold_norm_weights,
    fold_rotation,
    hadamard,
    random_orthogonal,
)
from qsparse_compile.rotations import RotationGroup, Rotations

HIDDEN = 32
#: (builder family, builder options) of each tiny model under test.
MODELS = {
    "llama": ("llama", {}),
    "qwen2": ("qwen2", {}),
    "mistral": ("mistral", {}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "llama-biases": ("llama", {"attention_bias": True, "mlp_bias": True}),
}


def _build(name: str) -> torch.nn.Module:
    family, options = MODELS[name]
    model = HF_MODELS[family].build(**options)
    return perturb_norms_and_biases(model)




ROTATIONS = {"random": lambda: random_orthogonal(HIDDEN, seed=3),
             "hadamard": lambda: hadamard(HIDDEN)}


@pytest.mark.parametrize("rotation", sorted(ROTATIONS))
@pytest.mark.parametrize("name", list(MODELS))
def test_folded_model_has_the_originallogits(name, rotation):
    model = _build(name)
    ids = token_ids()
    before = logits(model, ids)
    folded = fold_rotation(model, ROTATIONS[rotation]())
    assert relative_error(logits(folded, ids), before) <= 1e-4
    # the original is untouched (a deep copy was folded), the folded norms are weightless
    assert torch.equal(logits(model, ids), before)
    for path, param in folded.named_parameters():
        if path.endswith("norm.weight"):
            assert torch.equal(param, torch.ones_like(param)), path
    # the rotation really moved the residual stream: embeddings differ
    assert not torch.allclose(folded.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_tied_head_is_untied_and_the_original_stays_tied():
    model = _build("llama-tied")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    folded = fold_rotation(model, random_orthogonal(HIDDEN))
    assert folded.lm_head.weight is not folded.model.embed_tokens.weight
    assert folded.config.tie_word_embeddings is False
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.config.tie_word_embeddings is True


def test_norm_fold_alone_keeps_the_logits_and_inplace_returns_the_model():
    model = _build("qwen2")
    ids = token_ids()
    before = logits(model, ids)
    folded = fold_norm_weights(model, inplace=True)
    assert folded is model
    assert relative_error(logits(model, ids), before) <= 1e-5


def _reader_rotations(model: torch.nn.Module, q: torch.Tensor) -> Rotations:
    """One rotation group per shared input that the residual rotation reaches: q/k/v, gate/up."""
    groups = []
    for i in range(len(model.model.layers)):
        attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        groups.append(RotationGroup((f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj"), q))
        groups.append(RotationGroup((f"{mlp}.gate_proj", f"{mlp}.up_proj"), q))
    return Rotations(groups)


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("name", ["llama", "qwen2", "llama-tied"])
def test_compiled_folded_model_equals_the_explicitly_rotated_reference(name):
    sparsity = 0.4
    model = _build(name)
    q = random_orthogonal(HIDDEN, seed=5)
    folded = fold_rotation(model, q)
    ids = token_ids()
    compiled = torch.compile(folded, backend="qsparse",
                             options={"sparsity": sparsity, "inner": "eager"})
    out = logits(compiled, ids)
    # Reference: norm weights folded (so q/k/v/gate/up read the weightless norm's output n),
    # residual not rotated, and ``sparsify(n Q) (W Q)^T + b`` computed explicitly there.
    normed = fold_norm_weights(model)
    with torch.no_grad(), rotated_reference(normed, _reader_rotations(normed, q),
                                            sparsity=sparsity):
        expected = normed(ids, use_cache=False).logits
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad(), reference_model(model, sparsity=sparsity):
        plain = model(ids, use_cache=False).logits
    assert not torch.allclose(out, plain, rtol=1e-3, atol=1e-3)  # the rotation changed top-K


@pytest.mark.usefixtures("fresh_dynamo")
def test_folding_adds_no_runtime_op():
    """The compiled folded model is op for op the compiled plain model: no ``x @ Q`` product,
    and every RMSNorm still fuses with the top-K that reads it."""
    model = _build("llama")
    folded = fold_rotation(model, random_orthogonal(HIDDEN))
    ids = token_ids()
    counts = []
    for candidate in (model, folded):
        torch._dynamo.reset()
        backend = CountingBackend({"sparsity": 0.4})
        logits(torch.compile(candidate, backend=backend, fullgraph=True, dynamic=False), ids)
        counts.append((backend.before, backend.after, backend.results[0].rotations))
    assert counts[0] == counts[1]
    assert counts[1][1][0]["norm_sparsify"] == 2 * LAYERS and counts[1][2] == []


def test_helpers_build_orthogonal_matrices():
    for q in (random_orthogonal(24, seed=2), hadamard(16), hadamard(1)):
        eye = torch.eye(q.shape[0], dtype=torch.float64)
        assert q.dtype == torch.float64
        torch.testing.assert_close(q.T @ q, eye, rtol=0, atol=1e-12)
    assert torch.equal(random_orthogonal(8, seed=4), random_orthogonal(8, seed=4))


def test_bad_input_is_named():
    model = HF_MODELS["llama"].build()
    with pytest.raises(ValueError, match=r"shape \[32, 32\].*got \[16, 16\]"):
        fold_rotation(model, random_orthogonal(16))
    with pytest.raises(ValueError, match=r"not orthogonal \(max \|Q\^T Q - I\| = "):
        fold_rotation(model, 2 * random_orthogonal(HIDDEN))
    with pytest.raises(TypeError, match="must be a torch.Tensor.*got list"):
        fold_rotation(model, [[1.0]])
    with pytest.raises(TypeError, match="floating-point.*torch.int64"):
        check_orthogonal(torch.eye(4, dtype=torch.int64), 4)
    nan = torch.eye(4)
    nan[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        check_orthogonal(nan, 4)
    with pytest.raises(ValueError, match=r"supports model types \['llama', 'mistral', "
                                         r"'qwen2'\], got 'gpt2' \(GPT2LMHeadModel\)"):
        fold_rotation(HF_MODELS["gpt2"].build(), random_orthogonal(HIDDEN))
    with pytest.raises(ValueError, match=r"causal LM.*LlamaModel lacks \['model', 'lm_head'\]"):
        fold_norm_weights(model.model)
    with pytest.raises(ValueError, match="power of two, got 576"):
        hadamard(576)
    with pytest.raises(ValueError, match="positive int, got 0"):
        random_orthogonal(0)
    assert ORTHOGONALITY_TOLERANCE < 1e-3
    assert len(model.model.layers) == LAYERS
