"""Weight formats through the backend: ``weights="int8"/"int4"``, ``head_weights``, bitnet.

Tiny Hugging Face models compiled with ``inner="eager"``, compared with the eager oracle
(``reference_model`` with the same options, whose formats are written independently in
:mod:`qsparse_compile.reference`). What each graph must hold is counted:

* decode graphs (one row, grad off): every group, the head with ``head_weights`` included, is
  one ``cpu_packed_linear`` over packed weights; no fake quantizer is left;
* prefill graphs (many rows, grad off): the products read constants holding the quantizers'
  output (:mod:`qsparse_compile.passes.fold_weights`): no quantizer runs per call;
* training graphs (grad on): the fake quantizers stay, straight-through, and the gradients
  equal the oracle's.
"""

from __future__ import annotations

import pytest
import torch
from hf_models import HF_MODELS, LAYERS, token_ids
from op_counts import CountingBackend
from training import next_token_loss, take_gradients

from qsparse_compile.codegen.cpu.native_dispatch import native_calls, native_library
from qsparse_compile.config import QSparseConfig
from qsparse_compile.passes import cpu_decode
from qsparse_compile.reference import reference_model

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

QUANTIZERS = ("int8_weight_fake_quant", "int4_weight_fake_quant", "ternary_fake_quant")
GROUPS_PER_LAYER = 4  # q/k/v, o, gate/up, down (gpt2: c_attn, c_proj, c_fc, c_proj)

CASES = {
    "llama-int4-head": ("llama", {"sparsity": 0.5, "weights": "int4", "head_weights": "int4"}),
    "llama-int8": ("llama", {"sparsity": 0.4, "weights": "int8"}),
    "llama-int4-dense": ("llama", {"sparsity": 0.0, "weights": "int4"}),
    "llama-int4-block": ("llama", {"method": "block", "block": (2, 4), "weights": "int4"}),
    "llama-int4-l2-int8x": ("llama", {"sparsity": 0.5, "rescale": "l2", "quant": "int8",
                                      "weights": "int4"}),
    "llama-bitnet": ("llama", {"sparsity": 0.4, "quant": "bitnet"}),
    "qwen2-bias-int8-head": ("qwen2", {"sparsity": 0.5, "weights": "int8",
                                       "head_weights": "int8"}),
    "gpt2-conv1d-int4": ("gpt2", {"sparsity": 0.5, "weights": "int4", "head_weights": "int8"}),
}


@pytest.fixture(autouse=True)
def fixed_cost_model(monkeypatch):
    """Every group fits the fused kernel and a dense fp32 head stays a plain product (the
    measured cost model, which decides both per machine, is not under test here)."""
    monkeypatch.setattr(cpu_decode, "_max_sparse_rows", lambda *args: 8)
    monkeypatch.setattr(cpu_decode, "_max_dense_rows", lambda *args: 0)


def _compiled(model, options, ids, grad=False):
    backend = CountingBackend(options, "eager")
    compiled = backend.compiled = torch.compile(model, backend=backend, fullgraph=True)
    with torch.set_grad_enabled(grad):
        out = compiled(ids, use_cache=False).logits
    return out, backend


def _reference(model, options, ids):
    with torch.no_grad(), reference_model(model, **options):
        return model(ids, use_cache=False).logits


@pytest.mark.parametrize("name,options", list(CASES.values()), ids=list(CASES))
def test_decode_groups_read_packed_weights(name, options):
    model = HF_MODELS[name].build()
    ids = token_ids(batch=1, seq=1)
    out, backend = _compiled(model, options, ids)
    after = backend.after[0]
    head = 1 if "head_weights" in options else 0
    assert after["cpu_packed_linear"] == GROUPS_PER_LAYER * LAYERS + head
    assert after["sparse_linear"] == after["cpu_topk_linear"] == 0
    assert sum(after[q] for q in QUANTIZERS) == 0
    assert after["topk_sparsify"] == after["block_sparsify"] == after["int8_fake_quant"] == 0
    torch.testing.assert_close(out, _reference(model, options, ids), atol=1e-5, rtol=1e-5)
    # the graph's calls, once the first has published their kernels, skip Python entirely
    before = native_calls()
    with torch.no_grad():
        again = backend.compiled(ids, use_cache=False).logits
    assert torch.equal(again, out)
    if native_library() is not None:
        assert native_calls() - before == after["cpu_packed_linear"]


@pytest.mark.parametrize("name,options", list(CASES.values()), ids=list(CASES))
def test_prefill_reads_folded_constants(name, options):
    model = HF_MODELS[name].build()
    ids = token_ids(batch=2, seq=7)
    out, backend = _compiled(model, options, ids)
    before, after = backend.before_live[0], backend.after[0]
    assert after["cpu_packed_linear"] == 0
    assert sum(after[q] for q in QUANTIZERS) == 0
    projections = HF_MODELS[name].per_layer * LAYERS + (1 if "head_weights" in options else 0)
    assert backend.results[0].passes["fold_weights"] == projections
    assert sum(before[q] for q in QUANTIZERS) == 0  # the model had none: the rewrite added them
    torch.testing.assert_close(out, _reference(model, options, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("options", [CASES["llama-int4-head"][1], CASES["llama-bitnet"][1]],
                         ids=["int4-head", "bitnet"])
def test_training_keeps_straight_through_quantizers(options):
    model = HF_MODELS["llama"].build()
    ids = token_ids(batch=2, seq=6)
    out, backend = _compiled(model, options, ids, grad=True)
    after = backend.after[0]
    assert sum(after[q] for q in QUANTIZERS) == HF_MODELS["llama"].per_layer * LAYERS + (
        1 if "head_weights" in options else 0)
    next_token_loss(out, ids).backward()
    got = take_gradients(model)
    with reference_model(model, **options):
        next_token_loss(model(ids, use_cache=False).logits, ids).backward()
    expected = take_gradients(model)
    assert got.keys() == expected.keys()
    for path in got:
        torch.testing.assert_close(got[path], expected[path], atol=1e-5, rtol=1e-4)


def test_packed_weights_follow_new_weights():
    """The packed buffer is prepared again when the model's weights change."""
    model = HF_MODELS["llama"].build()
    ids = token_ids(batch=1, seq=1)
    options = {"sparsity": 0.5, "weights": "int4", "head_weights": "int4"}
    backend = CountingBackend(options, "eager")
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    with torch.no_grad():
        compiled(ids, use_cache=False)
        for p in model.parameters():
            p.mul_(1.5)
        out = compiled(ids, use_cache=False).logits
    assert backend.calls == 1
    torch.testing.assert_close(out, _reference(model, options, ids), atol=1e-5, rtol=1e-5)


def test_head_weights_plan():
    config = QSparseConfig(sparsity=0.5, head_weights="int4")
    head = config.plan_for("lm_head", "head")
    assert head.method is None and head.weights == "int4" and not head.dense
    assert config.plan_for("model.layers.0.mlp.up_proj").weights is None
    both = QSparseConfig(sparsity=0.5, weights="int8", head_weights="int4", dense_roles=())
    assert both.plan_for("lm_head", "head").weights == "int4"
    assert both.plan_for("lm_head", "head").method == "topk"
    assert both.plan_for("model.layers.0.mlp.up_proj").weights == "int8"
    assert QSparseConfig(sparsity=0.5, weights="int8").plan_for("lm_head", "head").dense
    assert QSparseConfig(weights="int8", exclude=("*up*",)).plan_for("m.up_proj").dense


def test_bad_weight_options_name_the_option():
    with pytest.raises(ValueError, match=r"option 'weights': got 'int2', allowed: None, "
                                         r"'int8', 'int4'"):
        QSparseConfig(weights="int2")
    with pytest.raises(ValueError, match="option 'head_weights'"):
        QSparseConfig(head_weights="fp8")
    with pytest.raises(ValueError, match="quant='bitnet'"):
        QSparseConfig(weights="int4", quant="bitnet")


@pytest.mark.slow
def test_smollm2_int4_decodes_the_reference_tokens(monkeypatch):
    """SmolLM2-135M (real weights), ``weights="int4"`` with an int4 head, top-K 50%, greedy
    decoding with a static cache through the packed kernels: the tokens are the eager
    reference model's (same dequantised weights, same masks)."""
    from transformers import StaticCache

    from qsparse_compile.research.data.shakespeare import shakespeare_split
    from qsparse_compile.research.models.smollm2 import load_smollm2

    monkeypatch.undo()  # the real cost model: the benchmark's configuration
    model, tokenizer = load_smollm2(torch.float32)
    ids = tokenizer(shakespeare_split().validation[:2000], return_tensors="pt").input_ids[:, :24]
    options = {"sparsity": 0.5, "weights": "int4", "head_weights": "int4"}

    def greedy(forward, steps: int = 24) -> list[int]:
        cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + steps)
        with torch.no_grad():
            out = forward(input_ids=ids, past_key_values=cache,
                          cache_position=torch.arange(ids.shape[1]), use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens = [int(token)]
            for i in range(steps - 1):
                out = forward(input_ids=token, past_key_values=cache,
                              cache_position=torch.tensor([ids.shape[1] + i]), use_cache=True)
                token = out.logits[:, -1].argmax(-1, keepdim=True)
                tokens.append(int(token))
        return tokens

    backend = CountingBackend({**options, "inner": "eager"})
    got = greedy(torch.compile(model.forward, backend=backend, dynamic=False))
    with reference_model(model, **options):
        expected = greedy(model.forward)
    decode = [r for r in backend.results if r.inference and r.after["cpu_packed_linear"]]
    assert decode and decode[0].after["cpu_packed_linear"] == 4 * 30 + 1  # 30 layers + head
    assert got == expected


def test_report_shows_each_projections_weight_format():
    from qsparse_compile import report

    model = HF_MODELS["llama"].build()
    options = {"sparsity": 0.5, "weights": "int8", "head_weights": "int4"}
    _, backend = _compiled(model, options, token_ids(batch=1, seq=1))
    rows = {r["path"]: r for r in report(backend)}
    assert rows["lm_head"]["weights"] == "int4" and rows["lm_head"]["method"] == "dense"
    layer = [r for p, r in rows.items() if p != "lm_head"]
    assert len(layer) == HF_MODELS["llama"].per_layer * LAYERS
    assert all(r["weights"] == "int8" and r["method"] == "topk" for r in layer)
    assert "int4" in str(report(backend))
