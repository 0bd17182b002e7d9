"""``sparsify_exported``: rewrite a ``torch.export`` program; run, compare, save and load it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from hf_models import HF_MODELS, LAYERS, VOCAB, Logits, token_ids
from op_counts import QSPARSE_OPS, dense_projections, op_counts

import qsparse_compile as qc
from qsparse_compile.export import sparsify_exported_with_result
from qsparse_compile.passes.normalise import normalise_exported
from qsparse_compile.reference import reference_model
from qsparse_compile.research.models.tiny_llama import TinyLlama, TinyLlamaConfig


def _tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    return TinyLlama(TinyLlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                     num_layers=LAYERS, num_heads=4, num_kv_heads=2)).eval()


#: name -> (builder of a module returning a logits tensor, projections per layer, path prefix)
MODELS = {
    "tiny_llama": (_tiny_llama, 7, ""),
    "hf_llama": (lambda: Logits(HF_MODELS["llama"].build()), 7, "inner.model."),
    "hf_gpt2": (lambda: Logits(HF_MODELS["gpt2"].build()), 4, "inner.transformer."),
}


def export(model: torch.nn.Module, ids: torch.Tensor) -> torch.export.ExportedProgram:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(model, (ids,), strict=False)


def qsparse_count(gm: torch.fx.GraphModule) -> int:
    counts = op_counts(gm)
    return sum(counts[name] for name in QSPARSE_OPS)


@pytest.fixture(scope="module", params=list(MODELS))
def case(request):
    build, per_layer, prefix = MODELS[request.param]
    model = build()
    ids = token_ids()
    return request.param, model, ids, export(model, ids), per_layer * LAYERS, prefix


@pytest.fixture(scope="module")
def llama_case():
    build, per_layer, _ = MODELS["tiny_llama"]
    model = build()
    ids = token_ids()
    return model, ids, export(model, ids), per_layer * LAYERS


def _reference(model, ids, **options):
    with torch.no_grad(), reference_model(model, **options):
        return model(ids)


def test_rewrites_every_projection_and_matches_reference(case):
    name, model, ids, ep, n, prefix = case
    before = op_counts(normalise_exported(ep).graph_module)  # the graph the passes read
    ep2, result = sparsify_exported_with_result(ep, qc.QSparseConfig(sparsity=0.5))
    records = result.records
    after = op_counts(ep2.graph_module)

    assert isinstance(ep2, torch.export.ExportedProgram)
    assert len(records) == n + 1 and before["sparse_linear"] == 0
    assert after["sparse_linear"] == n
    # every projection but the head left the dense products
    assert dense_projections(before) - dense_projections(after) == n
    sparse_paths = [r.projection.path for r in records if not r.plan.dense]
    assert len(sparse_paths) == n and all(p.startswith(prefix) for p in sparse_paths)
    assert [r.projection.role for r in records if r.plan.dense] == ["head"]

    with torch.no_grad():
        out = ep2.module()(ids)
    torch.testing.assert_close(out, _reference(model, ids, sparsity=0.5), atol=1e-5, rtol=1e-5)
    # the input program is left as it was
    assert qsparse_count(ep.graph_module) == 0
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(ids), model(ids), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", ["tiny_llama", "hf_llama"])
def test_decomposed_program_mm_form(name):
    """After ``run_decompositions`` projections are ``mm`` / ``addmm`` on flattened inputs, or
    ``bmm`` against the broadcast weight when the input is not contiguous (o_proj)."""
    build, per_layer, _ = MODELS[name]
    model = build()
    ids = token_ids()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = export(model, ids).run_decompositions()
    before = op_counts(ep.graph_module)
    n = per_layer * LAYERS
    assert before["linear"] == 0 and before["mm"] + before["addmm"] > 0

    options = {"method": "block", "block": (2, 4)}
    ep2 = qc.sparsify_exported(ep, **options)
    after = op_counts(ep2.graph_module)
    assert after["sparse_linear"] == n
    assert after["mm"] + after["addmm"] == 1  # the head
    # attention's own batched products (and a rotary embedding's) are not projections and stay
    assert after["bmm"] == before["bmm"] - LAYERS >= 2 * LAYERS
    with torch.no_grad():
        out = ep2.module()(ids)
    torch.testing.assert_close(out, _reference(model, ids, **options), atol=1e-5, rtol=1e-5)


def test_accepts_a_config_as_well_as_options(llama_case):
    model, ids, ep, n = llama_case
    config = qc.QSparseConfig(sparsity=0.4, rescale="l2", quant="int8",
                              overrides={"layers.1.mlp.*": 0.7})
    from_config = qc.sparsify_exported(ep, config)
    from_options = qc.sparsify_exported(ep, sparsity=0.4, rescale="l2", quant="int8",
                                        overrides={"layers.1.mlp.*": 0.7})
    with torch.no_grad():
        a, b = from_config.module()(ids), from_options.module()(ids)
    assert torch.equal(a, b)
    assert op_counts(from_config.graph_module) == op_counts(from_options.graph_module)
    torch.testing.assert_close(a, _reference(model, ids, config=config), atol=1e-5, rtol=1e-5)
    # keyword options override the config's fields
    overridden = qc.sparsify_exported(ep, config, sparsity=0.0, overrides={}, quant=None)
    assert op_counts(overridden.graph_module)["sparse_linear"] == 0
    # sparsity 0 with a quantizer: every input quantized, none masked
    quantized = op_counts(qc.sparsify_exported(ep, config, sparsity=0.0, overrides={}).graph_module)
    assert quantized["topk_sparsify"] == 0 and quantized["int8_fake_quant"] > 0


def test_bitnet_program_quantizes_weights_and_inputs(llama_case):
    model, ids, ep, n = llama_case
    ep2 = qc.sparsify_exported(ep, sparsity=0.5, quant="bitnet", fuse=False)
    after = op_counts(ep2.graph_module)
    assert after["ternary_fake_quant"] == n and after["sparse_linear"] == n
    assert after["int8_fake_quant"] == after["topk_sparsify"] == 4 * LAYERS
    with torch.no_grad():
        out = ep2.module()(ids)
    expected = _reference(model, ids, sparsity=0.5, quant="bitnet")
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_rejects_what_is_not_an_exported_program():
    with pytest.raises(TypeError, match="ExportedProgram.*TinyLlama"):
        qc.sparsify_exported(_tiny_llama(), sparsity=0.5)
    with pytest.raises(ValueError, match="'sparsity'.*1.5"):
        qc.sparsify_exported(export(torch.nn.Linear(4, 4), torch.randn(2, 4)), sparsity=1.5)


_LOAD_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    import qsparse_compile  # registers torch.ops.qsparse, which the loader needs

    program, io = sys.argv[1], sys.argv[2]
    ep = torch.export.load(program)
    saved = torch.load(io)
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    print("sparse_linear", sum(t.startswith("qsparse.sparse_linear") for t in targets))
    with torch.no_grad():
        out = ep.module()(saved["ids"])
    print("identical", torch.equal(out, saved["out"]))
""")


@pytest.mark.parametrize("name", ["tiny_llama", "hf_llama"])
def test_survives_save_and_load_in_a_fresh_process(name, tmp_path):
    build, per_layer, _ = MODELS[name]
    model = build()
    ids = token_ids()
    ep2 = qc.sparsify_exported(export(model, ids), sparsity=0.5, quant="int8")
    with torch.no_grad():
        out = ep2.module()(ids)
    program, io = tmp_path / "program.pt2", tmp_path / "io.pt"
    torch.export.save(ep2, program)
    torch.save({"ids": ids, "out": out}, io)

    result = subprocess.run([sys.executable, "-c", _LOAD_SCRIPT, str(program), str(io)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines == [f"sparse_linear {per_layer * LAYERS}", "identical True"], result.stdout


def test_sequential_and_a_projection_as_the_output_save_and_load(tmp_path):
    """Input names kept by position (``nn.Sequential`` calls its input ``input``) and output
    specs naming the node the rewritten graph returns (here a projection's)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    x = torch.randn(2, 8)
    ep2 = qc.sparsify_exported(torch.export.export(model, (x,)), sparsity=0.5)
    path = tmp_path / "model.pt2"
    torch.export.save(ep2, path)
    loaded = torch.export.load(path)
    with torch.no_grad(), reference_model(model, sparsity=0.5):
        expected = model(x)
    torch.testing.assert_close(loaded.module()(x), expected)
