"""The ``qsparse`` torch.compile backend on real model families, inference and training.

Most compiles use ``inner="eager"`` (the rewritten graph runs uncompiled): the passes are what
is under test, and Inductor costs seconds per graph on a small CPU. One training test runs the
default Inductor inner compiler end to end (AOTAutograd through the ops' gradients).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from hf_models import HF_MODELS, LAYERS, VOCAB, token_ids
from op_counts import DENSE_PROJECTIONS, CountingBackend, dense_projections, without
from training import next_token_loss, take_gradients

from qsparse_compile.config import topk_count
from qsparse_compile.glob_check import UnmatchedGlobWarning
from qsparse_compile.reference import reference_model
from qsparse_compile.research.models.tiny_llama import TinyLlama, TinyLlamaConfig

MODEL_IDS = list(HF_MODELS)

#: The four sparsity settings every model is checked under.
CONFIGS = {
    "topk-0.4": {"sparsity": 0.4},
    "topk-0.6": {"sparsity": 0.6},
    "block-2:4": {"method": "block", "block": (2, 4)},
    "block-16:32": {"method": "block", "block": (16, 32)},
}

#: Rescale and quantization variants, checked on one model of each weight layout.
VARIANTS = {
    "l2": {"sparsity": 0.5, "rescale": "l2"},
    "int8": {"sparsity": 0.5, "quant": "int8"},
    "bitnet": {"sparsity": 0.4, "quant": "bitnet"},
    "bitnet-dense": {"sparsity": 0.0, "quant": "bitnet"},
    "bitnet-l2-block-2:4": {"method": "block", "block": (2, 4), "quant": "bitnet",
                            "rescale": "l2"},
    "int8-nofuse": {"sparsity": 0.6, "quant": "int8", "fuse": False},
}


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def compile_counting(model, options, inner="eager", **kwargs):
    backend = CountingBackend(options, inner)
    return torch.compile(model, backend=backend, **kwargs), backend


def reference_options(options: dict) -> dict:
    return {k: v for k, v in options.items() if k not in ("inner", "fuse")}


def module_projection_paths(model: torch.nn.Module) -> list[str]:
    """Paths of the ``nn.Linear`` and ``Conv1D`` modules, by walking the model."""
    return [path for path, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"]


# --- every attention and MLP projection, and nothing else ------------------------------------


@pytest.mark.parametrize("name", MODEL_IDS)
def test_every_attention_and_mlp_projection_is_rewritten(name):
    spec = HF_MODELS[name]
    model = spec.build()
    compiled, backend = compile_counting(model, {"sparsity": 0.5}, fullgraph=True)
    with torch.no_grad():
        compiled(token_ids(), use_cache=False)

    assert backend.calls == 1
    before, after = backend.before[0], backend.after[0]
    n = spec.per_layer * LAYERS
    # products that are not projections (a rotary embedding's, in some versions) stay
    assert dense_projections(before) - dense_projections(after) == n
    assert after["sparse_linear"] == n

    records = backend.records()
    assert len(records) == n + 1  # the layers' projections and the head
    sparse = [r for r in records if not r.plan.dense]
    assert [r.projection.path for r in sparse] == spec.expected_paths()
    assert [r.projection.role for r in sparse] == list(spec.layer_roles) * LAYERS
    assert all(r.plan.method == "topk" and r.k == topk_count(r.projection.in_features, 0.5)
               for r in sparse)
    assert [(r.projection.path, r.projection.role) for r in records if r.plan.dense] == [
        ("lm_head", "head")]
    # the expected list agrees with the model's own modules
    assert sorted(module_projection_paths(model)) == sorted(spec.expected_paths() + ["lm_head"])


@pytest.mark.parametrize("name", MODEL_IDS)
def test_rewrite_changes_nothing_but_the_projections(name):
    """Without fusion, the only differences are: dense projection -> sparse_linear, one
    topk_sparsify per distinct input (4 per layer: q/k/v and gate/up share theirs), and the
    transposes: ``sparse_linear`` takes ``[out, in]``, so an ``nn.Linear`` weight loses the
    ``t`` its product had and a ``Conv1D`` weight (``[in, out]``) gains one. Attention products
    are untouched."""
    spec = HF_MODELS[name]
    model = spec.build()
    compiled, backend = compile_counting(model, {"sparsity": 0.5, "fuse": False}, fullgraph=True)
    with torch.no_grad():
        compiled(token_ids(), use_cache=False)

    before, after = backend.before_live[0], backend.after[0]
    n = spec.per_layer * LAYERS
    assert after["sparse_linear"] == n
    assert after["topk_sparsify"] == 4 * LAYERS
    transposed = n if name == "gpt2" else -n
    assert after["t"] - before["t"] == transposed
    added = ("sparse_linear", "topk_sparsify", "t")
    assert without(after, *DENSE_PROJECTIONS, *added) == without(before, *DENSE_PROJECTIONS, *added)
    assert dense_projections(before) - dense_projections(after) == n


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_overrides_and_exclusions_by_glob(name):
    spec = HF_MODELS[name]
    model = spec.build()
    first_layer = "model.layers.0.*" if name == "llama" else "transformer.h.0.*"
    options = {"sparsity": 0.4, "overrides": {"*.mlp.*": 0.75, first_layer: None}}
    compiled, backend = compile_counting(model, options, fullgraph=True)
    ids = token_ids()
    with torch.no_grad():
        out = compiled(ids, use_cache=False).logits
        with reference_model(model, **options):
            expected = model(ids, use_cache=False).logits
    assert backend.after[0]["sparse_linear"] == spec.per_layer * (LAYERS - 1)
    plans = {r.projection.path: r.plan for r in backend.records()}
    for path in spec.layer_paths(0):
        assert plans[path].dense
    for path in spec.layer_paths(1):
        assert plans[path].sparsity == (0.75 if ".mlp." in path else 0.4)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


class _RotatedInput(torch.nn.Module):
    """A fixed rotation buffer multiplied functionally before a projection."""

    def __init__(self):
        super().__init__()
        self.register_buffer("rotation", torch.linalg.qr(torch.randn(16, 16))[0])
        self.proj = torch.nn.Linear(16, 8)

    def forward(self, x):
        return self.proj(x @ self.rotation)


def test_exclusion_of_a_functional_buffer_product_applies_and_is_not_called_unmatched():
    # the pass takes `x @ buffer` as a projection named by the buffer's path; a glob naming it
    # changes the graph, so reporting it as matching nothing would be false
    torch.manual_seed(0)
    model, x = _RotatedInput(), torch.randn(3, 16)
    options = {"sparsity": 0.5, "exclude": ("rotation",)}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnmatchedGlobWarning)  # a false report fails the test
        compiled, backend = compile_counting(model, options, fullgraph=True)
        out = compiled(x)
    assert {r.projection.path: r.plan.dense for r in backend.records()} == {
        "rotation": True, "proj": False}
    with reference_model(model, sparsity=0.5):
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
    with pytest.warns(UserWarning, match="'rotaton'.*nearest.*rotation"):
        compile_counting(model, {"sparsity": 0.5, "exclude": ("rotaton",)})[0](x)


# --- compiled outputs equal the eager reference ----------------------------------------------


def _check_against_reference(model, options, per_layer, ids=None):
    ids = token_ids() if ids is None else ids
    compiled, backend = compile_counting(model, options, fullgraph=True)
    with torch.no_grad():
        out = compiled(ids, use_cache=False).logits
        with reference_model(model, **reference_options(options)):
            expected = model(ids, use_cache=False).logits
        dense = model(ids, use_cache=False).logits
    assert backend.after[0]["sparse_linear"] == per_layer * LAYERS
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # the comparison is not vacuous: sparsifying changes the logits far beyond the tolerance
    assert (out - dense).abs().max() > 1e-3


@pytest.mark.parametrize("options", list(CONFIGS.values()), ids=list(CONFIGS))
@pytest.mark.parametrize("name", MODEL_IDS)
def test_compiled_matches_eager_reference(name, options):
    spec = HF_MODELS[name]
    _check_against_reference(spec.build(), options, spec.per_layer)


@pytest.mark.parametrize("options", list(VARIANTS.values()), ids=list(VARIANTS))
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_rescale_and_quant_variants_match_reference(name, options):
    spec = HF_MODELS[name]
    _check_against_reference(spec.build(), options, spec.per_layer)


BLOCK_16_32 = {"method": "block", "block": (16, 32)}


def test_block_pattern_that_does_not_divide_leaves_projection_dense_with_warning():
    model = HF_MODELS["llama"].build(intermediate_size=48)  # down_proj reads 48 features
    ids = token_ids()
    compiled, backend = compile_counting(model, BLOCK_16_32, fullgraph=True)
    with pytest.warns(UserWarning, match="not a multiple") as caught:
        with torch.no_grad():
            out = compiled(ids, use_cache=False).logits
    messages = [str(w.message) for w in caught if "not a multiple" in str(w.message)]
    assert len(messages) == LAYERS
    for i, message in enumerate(messages):
        assert f"'model.layers.{i}.mlp.down_proj'" in message
        assert "48" in message and "m=32" in message and "left dense" in message
    assert backend.after[0]["sparse_linear"] == 6 * LAYERS
    # the down projections and the head stay dense products
    assert dense_projections(backend.before[0]) - dense_projections(backend.after[0]) == \
        6 * LAYERS
    records = {r.projection.path: r for r in backend.records()}
    for i in range(LAYERS):
        down = records[f"model.layers.{i}.mlp.down_proj"]
        assert down.plan.dense and "multiple" in down.note
        assert records[f"model.layers.{i}.mlp.up_proj"].plan.block == (16, 32)
    with torch.no_grad(), reference_model(model, **BLOCK_16_32):
        expected = model(ids, use_cache=False).logits
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_block_pattern_that_does_not_divide_raises_when_strict():
    model = HF_MODELS["llama"].build(intermediate_size=48)
    compiled = torch.compile(model, backend="qsparse",
                             options={**BLOCK_16_32, "strict": True, "inner": "eager"})
    with pytest.raises(Exception) as info:
        compiled(token_ids(), use_cache=False)
    inner = getattr(info.value, "inner_exception", info.value)
    assert isinstance(inner, ValueError)
    assert "model.layers.0.mlp.down_proj" in str(inner) and "strict" in str(inner)


# --- training -------------------------------------------------------------------------------


@pytest.mark.parametrize("ste", [True, False], ids=["ste", "masked-grad"])
def test_training_gradients_match_reference(ste):
    model = HF_MODELS["llama"].build().train()
    ids = token_ids(2, 12)
    options = {"sparsity": 0.5, "ste": ste}
    compiled, backend = compile_counting(model, options, fullgraph=True)
    next_token_loss(compiled(ids, use_cache=False).logits, ids).backward()
    got = take_gradients(model)
    assert backend.after[0]["sparse_linear"] == 7 * LAYERS

    with reference_model(model, **options):
        next_token_loss(model(ids, use_cache=False).logits, ids).backward()
    expected = take_gradients(model)
    next_token_loss(model(ids, use_cache=False).logits, ids).backward()
    dense = take_gradients(model)

    assert got.keys() == expected.keys()
    for name in got:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")
    assert max((got[n] - dense[n]).abs().max() for n in got) > 1e-3


def test_training_end_to_end_with_inductor():
    """Default inner compiler: AOTAutograd + Inductor; same gradients, then the loss falls."""
    torch.manual_seed(0)
    model = TinyLlama(TinyLlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                      num_layers=1, num_heads=4, num_kv_heads=2)).train()
    ids = token_ids(2, 12)
    options = {"sparsity": 0.5}
    compiled, backend = compile_counting(model, options, inner="inductor")
    next_token_loss(compiled(ids), ids).backward()
    got = take_gradients(model)
    assert backend.after[0]["sparse_linear"] == 7
    with reference_model(model, **options):
        next_token_loss(model(ids), ids).backward()
    expected = take_gradients(model)
    for name in got:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss = next_token_loss(compiled(ids), ids)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert backend.calls == 1  # optimizer steps do not trigger recompilation


@pytest.mark.parametrize("ste", [True, False], ids=["ste", "masked-grad"])
def test_loss_decreases_over_twenty_steps(ste):
    model = HF_MODELS["llama"].build().train()
    ids = token_ids(2, 16)
    compiled, backend = compile_counting(model, {"sparsity": 0.5, "ste": ste}, fullgraph=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss = next_token_loss(compiled(ids, use_cache=False).logits, ids)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert backend.calls == 1


# --- dynamic shapes --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_sequence_length_changes_recompile_at_most_once(name):
    spec = HF_MODELS[name]
    model = spec.build()
    options = {"sparsity": 0.4}
    compiled, backend = compile_counting(model, options)
    for seq in (5, 7, 9, 11):
        # batch 2: at least 10 rows per call, so every graph keeps the generic sparse_linear
        # ops counted below (graphs with few rows may go to the fused CPU decode op instead)
        ids = token_ids(2, seq, seed=seq)
        with torch.no_grad():
            out = compiled(ids, use_cache=False).logits
            with reference_model(model, **options):
                expected = model(ids, use_cache=False).logits
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert 1 <= backend.calls <= 2
    for after in backend.after:  # the dynamic-shape graph is rewritten as well
        assert after["sparse_linear"] == spec.per_layer * LAYERS


# --- option errors surface at compile time ---------------------------------------------------

BAD_OPTIONS = {
    "sparsity-1.5": ({"sparsity": 1.5}, ("'sparsity'", "1.5", "[0, 1)")),
    "method-blok": ({"method": "blok"}, ("'method'", "'blok'", "'topk'", "'block'")),
    "unknown-sparsty": ({"sparsty": 0.5}, ("'sparsty'", "allowed", "sparsity", "method",
                                           "inner", "fuse", "decode", "kernels",
                                           "calibration")),
    "kernels-cuda": ({"kernels": "cuda"}, ("'kernels'", "'cuda'", "'auto'", "'triton'",
                                           "'aten'")),
    "inner-tvm": ({"inner": "tvm"}, ("'inner'", "'tvm'", "'inductor'", "'eager'")),
}


@pytest.mark.parametrize(("options", "parts"), list(BAD_OPTIONS.values()),
                         ids=list(BAD_OPTIONS))
def test_bad_options_fail_at_first_call_with_clear_error(options, parts):
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    compiled = torch.compile(model, backend="qsparse", options=options)  # lazy: no error yet
    with pytest.raises(Exception) as info:
        compiled(torch.randn(3, 8))
    inner = getattr(info.value, "inner_exception", info.value)
    assert isinstance(inner, ValueError), repr(info.value)
    for part in parts:
        assert part in str(inner), (part, str(inner))
        assert part in str(info.value), (part, str(info.value))


# --- entry point: no import needed ----------------------------------------------------------

_NO_IMPORT_SCRIPT = textwrap.dedent("""
    import sys
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 8)).eval()
    x = torch.randn(12, 16)
    assert "qsparse_compile" not in sys.modules
    compiled = torch.compile(model, backend="qsparse",
                             options={"sparsity": 0.5, "inner": "eager"})
    with torch.no_grad():
        out, dense = compiled(x), model(x)

    def keep_top(t, k):  # written out here: nothing from the package is imported
        idx = t.abs().topk(k, dim=-1).indices
        return torch.zeros_like(t).scatter(-1, idx, t.gather(-1, idx))

    with torch.no_grad():
        h = torch.relu(torch.nn.functional.linear(keep_top(x, 8), model[0].weight, model[0].bias))
        expected = torch.nn.functional.linear(keep_top(h, 16), model[2].weight, model[2].bias)
    print("differs-from-dense", not torch.allclose(out, dense, atol=1e-4))
    print("matches-top-k", torch.allclose(out, expected, atol=1e-6))
    print("loaded-by-entry-point", "qsparse_compile" in sys.modules)
""")


def test_backend_name_works_without_importing_the_package(tmp_path):
    result = subprocess.run([sys.executable, "-c", _NO_IMPORT_SCRIPT], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.split()
    assert "differs-from-dense" in lines
    for line in result.stdout.strip().splitlines():
        assert line.endswith("True"), result.stdout


def test_no_left_dense_warning_when_every_projection_fits():
    model = HF_MODELS["llama"].build()
    compiled, backend = compile_counting(model, BLOCK_16_32, fullgraph=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            compiled(token_ids(), use_cache=False)
    assert backend.after[0]["sparse_linear"] == 7 * LAYERS
    assert not [w for w in caught if "left dense" in str(w.message)]
