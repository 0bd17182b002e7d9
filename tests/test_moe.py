"""Mixtures of experts: expert weights are projections, routers are found and stay dense.

Tiny Mixtral, Qwen2-MoE and Qwen3-MoE (transformers' 3-D expert weights ``gate_up_proj``
``[E, 2I, D]`` / ``down_proj`` ``[E, D, I]``), compiled with the default experts
implementation (``grouped_mm``: under ``torch.compile`` with fp32 weights transformers calls its
``grouped_mm_fallback`` op), with ``batched_mm`` (``bmm`` on per-token gathered weights) and with
``eager`` (a Python loop over the experts that breaks the graph, so its products run outside
the compiled graphs: recorded dense, with a warning). Every compile is compared with the eager
reference, which runs the plain per-expert loop with each expert's input rows sparsified.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from hf_models import EXPERTS, EXPERTS_PER_TOKEN, HIDDEN, LAYERS, MOE_MODELS, token_ids

import qsparse_compile as qc
from qsparse_compile.config import topk_count
from qsparse_compile.modules import expert_weights, moe_blocks
from qsparse_compile.reference import reference_model
from qsparse_compile.roles import projection_roles

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

MOE_IDS = list(MOE_MODELS)


def _compile(model, options, **kwargs):
    backend = qc.Backend({**options, "inner": options.get("inner", "eager")})
    return torch.compile(model, backend=backend, **kwargs), backend


def _records(backend) -> dict:
    return {r.path: r for result in backend.results for r in result.records}


def _reference(model, ids, **options):
    with torch.no_grad(), reference_model(model, **options):
        return model(ids, use_cache=False).logits


@pytest.mark.parametrize("name", MOE_IDS)
def test_structure_finds_experts_and_routers(name):
    spec = MOE_MODELS[name]
    model = spec.build()
    blocks = moe_blocks(model)
    assert [b.path for b in blocks] == [f"model.layers.{i}.mlp" for i in range(LAYERS)]
    assert {b.num_experts for b in blocks} == {EXPERTS}
    assert {b.experts_per_token for b in blocks} == {EXPERTS_PER_TOKEN}
    weights = {w.path: w for w in expert_weights(model)}
    gate_up = weights["model.layers.0.mlp.experts.gate_up_proj"]
    assert (gate_up.layout, gate_up.in_features, gate_up.num_experts) == ("out_in", HIDDEN,
                                                                          EXPERTS)
    assert torch.equal(gate_up.expert_out_in(1), model.model.layers[0].mlp.experts.gate_up_proj[1])
    roles = projection_roles(model)
    for path, role in spec.block_paths(0).items():
        assert roles.role(path) == role, path
    assert roles.role("lm_head") == "head"


@pytest.mark.parametrize("impl", [None, "batched_mm"], ids=["default", "batched_mm"])
@pytest.mark.parametrize("name", MOE_IDS)
def test_expert_inputs_are_sparsified_as_the_reference_does(name, impl):
    spec = MOE_MODELS[name]
    model = spec.build(experts_implementation=impl)
    ids = token_ids()
    compiled, backend = _compile(model, {"sparsity": 0.5}, fullgraph=True)
    with torch.no_grad():
        got = compiled(ids, use_cache=False).logits
    records = _records(backend)
    for i in range(LAYERS):  # one graph: every layer's block is recorded
        for path, role in spec.block_paths(i).items():
            record = records[path]
            assert record.role == role, path
            if role == "router":
                assert record.plan.dense, path  # routers stay dense by default
                continue
            assert record.plan.method == "topk" and not record.note, path
            assert record.k == topk_count(record.projection.in_features, 0.5)
        gate_up = records[f"model.layers.{i}.mlp.experts.gate_up_proj"].projection
        assert (gate_up.experts, gate_up.experts_per_token) == (EXPERTS, EXPERTS_PER_TOKEN)
        assert gate_up.in_features == HIDDEN
    assert records["lm_head"].plan.dense and records["lm_head"].role == "head"
    torch.testing.assert_close(got, _reference(model, ids, sparsity=0.5), rtol=1e-5, atol=1e-5)
    dense = model(ids, use_cache=False).logits
    assert not torch.allclose(got, dense, atol=1e-3)  # the experts' inputs were sparsified


def test_eager_experts_are_recorded_dense_with_a_warning():
    """The eager implementation loops over experts in Python: Dynamo breaks the graph and runs
    the loop outside it, so its products cannot be rewritten. Never skipped silently."""
    spec = MOE_MODELS["mixtral"]
    model = spec.build(experts_implementation="eager")
    ids = token_ids()
    compiled, backend = _compile(model, {"sparsity": 0.5})
    with pytest.warns(UserWarning, match=r"experts\.gate_up_proj.*left dense") as caught, \
            torch.no_grad():
        got = compiled(ids, use_cache=False).logits
    named = {str(w.message).split("'")[1] for w in caught if "left dense" in str(w.message)}
    # layer 1 runs the graphs Dynamo compiled for layer 0's modules (same code): no records
    assert named == {f"model.layers.0.mlp.experts.{p}" for p in ("gate_up_proj", "down_proj")}
    records = _records(backend)
    for path in named:
        assert records[path].plan.dense and "outside the compiled graphs" in records[path].note
        assert records[path].projection.experts == EXPERTS
    expected = _reference(model, ids, sparsity=0.5, overrides={"*.experts.*": None})
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_routers_are_sparsified_when_no_role_is_dense(name):
    model = MOE_MODELS[name].build(layers=1)
    ids = token_ids()
    options = {"sparsity": 0.5, "dense_roles": ()}
    compiled, backend = _compile(model, options)
    with torch.no_grad():
        got = compiled(ids, use_cache=False).logits
    records = _records(backend)
    routers = [r for r in records.values() if r.role == "router"]
    assert len(routers) == (2 if name == "qwen2_moe" else 1)
    assert all(r.plan.method == "topk" for r in routers)
    assert records["lm_head"].plan.method == "topk"
    torch.testing.assert_close(got, _reference(model, ids, **options), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options", [
    {"sparsity": 0.4, "quant": "bitnet"},
    {"method": "block", "block": (2, 4), "rescale": "l2", "quant": "int8"},
], ids=["bitnet", "block-2:4-l2-int8"])
def test_expert_quantization_and_block_patterns(options):
    """bitnet: one ternary scale per expert weight tensor (all experts), in both."""
    model = MOE_MODELS["qwen3_moe"].build(layers=1)
    ids = token_ids()
    compiled, _ = _compile(model, options)
    with torch.no_grad():
        got = compiled(ids, use_cache=False).logits
    torch.testing.assert_close(got, _reference(model, ids, **options), rtol=1e-5, atol=1e-5)


def test_training_gradients_reach_the_experts():
    model = MOE_MODELS["mixtral"].build(layers=1)
    ids = token_ids()
    compiled, _ = _compile(model, {"sparsity": 0.5})

    def loss_of(logits):
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    loss_of(compiled(ids, use_cache=False).logits).backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    with reference_model(model, sparsity=0.5):
        loss_of(model(ids, use_cache=False).logits).backward()
    expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert "model.layers.0.mlp.experts.down_proj" in got
    assert got.keys() == expected.keys()
    for name in got:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5)


def test_inductor_end_to_end():
    model = MOE_MODELS["mixtral"].build(layers=1)
    ids = token_ids()
    compiled, backend = _compile(model, {"sparsity": 0.5, "inner": "inductor"})
    with torch.no_grad():
        got = compiled(ids, use_cache=False).logits
    assert _records(backend)["model.layers.0.mlp.experts.down_proj"].plan.method == "topk"
    torch.testing.assert_close(got, _reference(model, ids, sparsity=0.5), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", MOE_IDS)
def test_report_counts_every_expert_and_the_experts_a_token_reads(name):
    model = MOE_MODELS[name].build(layers=1)
    walked = qc.report(model, sparsity=0.5)
    rows = {r["path"]: r for r in walked}
    gate_up = rows["model.layers.0.mlp.experts.gate_up_proj"]
    in_f, out_f = gate_up["in_features"], gate_up["out_features"]
    assert (gate_up["experts"], gate_up["experts_per_token"]) == (EXPERTS, EXPERTS_PER_TOKEN)
    assert gate_up["shape"] == f"{EXPERTS}x{out_f}x{in_f}"
    assert gate_up["params"] == EXPERTS * in_f * out_f
    assert gate_up["activated_params"] == EXPERTS_PER_TOKEN * topk_count(in_f, 0.5) * out_f
    router = rows["model.layers.0.mlp.gate"]
    assert (router["role"], router["method"], router["out_features"]) == ("router", "dense",
                                                                          EXPERTS)
    # a dense MoE still reads only top_k of E experts per token
    dense = qc.report(model, sparsity=0.0)
    assert dense.totals["activated_fraction"] < 1.0

    compiled, _ = _compile(model, {"sparsity": 0.5})
    with torch.no_grad():
        compiled(token_ids(), use_cache=False)
    from_compile = qc.report(compiled)
    assert sorted(from_compile, key=lambda r: r["path"]) == sorted(walked,
                                                                    key=lambda r: r["path"])
    assert from_compile.totals == walked.totals


def test_mixtral_8x7b_report_on_the_meta_device():
    """Mixtral-8x7B's shapes: 46.7B parameters, of which 46.57B are projection weights (the
    rest: input embeddings and norms); a token reads 2 of 8 experts."""
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(
                transformers.AutoConfig.for_model("mixtral"))
    rep = qc.report(model, sparsity=0.5)
    assert rep.totals["params"] == 46_571_454_464
    total = sum(p.numel() for p in model.parameters())
    assert round(total / 1e9, 1) == 46.7
    assert rep.model_params == total and str(rep).endswith("parameters (46.7B)")
    experts = [r for r in rep if r["experts"]]
    assert len(experts) == 2 * 32 and {r["experts_per_token"] for r in experts} == {2}
    dense = qc.report(model, sparsity=0.0)
    # Mixtral's 12.9B active parameters: the projections' share (embeddings not included)
    assert round(dense.totals["activated_params"] / 1e9, 2) == 12.75
