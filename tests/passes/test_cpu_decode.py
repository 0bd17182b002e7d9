"""``prepare_cpu_decode``: projection groups collapse to ``cpu_topk_linear``, outputs unchanged.

Tiny Hugging Face models compiled through the backend under ``torch.no_grad()``, one token per
call (decode), ``inner="eager"`` unless said otherwise. The measured cost model is replaced by a
fixed decision (``_max_sparse_rows`` monkeypatched), so which groups are taken does not depend
on how busy the machine is. Per layer of a Llama-family model there are four groups: q/k/v,
o, gate/up and down.
"""

from __future__ import annotations

import pytest
import torch
from hf_models import HF_MODELS, LAYERS, token_ids
from op_counts import CountingBackend, dense_projections

from qsparse_compile.options import CompileOptions
from qsparse_compile.passes import cpu_decode
from qsparse_compile.reference import reference_model

GROUPS_PER_LAYER = {"llama": 4, "qwen2": 4, "gpt2": 4}  # gpt2: c_attn, c_proj, c_fc, c_proj
SLICES_PER_LAYER = {"llama": 5, "qwen2": 5, "gpt2": 0}  # q/k/v -> 3 views, gate/up -> 2


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


@pytest.fixture
def decide(monkeypatch):
    """Fix the cost model's answers (max rows for the fused kernel on sparsified groups, and
    on dense products: 0 unless given, the head stays ``mm``); record what it was asked."""
    asked = []

    def set_rows(rows: int, dense_rows: int = 0) -> list:
        def fake(in_features, out_features, dtype, density):
            asked.append((in_features, out_features, dtype, density))
            return rows

        def fake_dense(in_features, out_features, dtype):
            asked.append(("dense", in_features, out_features, dtype))
            return dense_rows

        monkeypatch.setattr(cpu_decode, "_max_sparse_rows", fake)
        monkeypatch.setattr(cpu_decode, "_max_dense_rows", fake_dense)
        return asked

    return set_rows


def _run(model, options, ids, inner="eager", grad=False):
    backend = CountingBackend(options, inner)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    with torch.set_grad_enabled(grad):
        out = compiled(ids, use_cache=False).logits
    return out, backend


def _reference(model, options, ids):
    with torch.no_grad(), reference_model(model, **options):
        return model(ids, use_cache=False).logits


CASES = {
    "llama-topk": ("llama", {"sparsity": 0.5}),
    "llama-block-2:4": ("llama", {"method": "block", "block": (2, 4)}),
    "llama-topk-l2": ("llama", {"sparsity": 0.4, "rescale": "l2"}),
    "qwen2-bias": ("qwen2", {"sparsity": 0.5}),
    "gpt2-conv1d": ("gpt2", {"sparsity": 0.5}),
}


@pytest.mark.parametrize("name,options", list(CASES.values()), ids=list(CASES))
def test_groups_collapse_and_outputs_match_reference(name, options, decide):
    asked = decide(8)
    model = HF_MODELS[name].build()
    ids = token_ids(batch=1, seq=1)
    out, backend = _run(model, options, ids)
    before, after = backend.before_live[0], backend.after[0]
    groups = GROUPS_PER_LAYER[name] * LAYERS
    assert after["cpu_topk_linear"] == groups
    assert after["sparse_linear"] == after["topk_sparsify"] == after["block_sparsify"] == 0
    assert after["norm_sparsify"] == 0  # the norms before taken groups stay ordinary ops
    assert after["slice"] - before["slice"] == SLICES_PER_LAYER[name] * LAYERS
    # every projection but the head left the dense products
    assert dense_projections(before) - dense_projections(after) == \
        HF_MODELS[name].per_layer * LAYERS
    assert backend.results[0].decode == groups
    assert len([a for a in asked if a[0] != "dense"]) == groups
    torch.testing.assert_close(out, _reference(model, options, ids), atol=2e-5, rtol=2e-5)


def test_grad_enabled_changes_nothing(decide):
    decide(8)
    model = HF_MODELS["llama"].build()
    ids = token_ids(batch=1, seq=1)
    _, backend = _run(model, {"sparsity": 0.5}, ids, grad=True)
    after = backend.after[0]
    assert after["cpu_topk_linear"] == 0
    assert after["sparse_linear"] == HF_MODELS["llama"].per_layer * LAYERS
    assert backend.results[0].decode == 0
    assert not backend.results[0].inference


def test_decode_option_off_changes_nothing(decide):
    decide(8)
    model = HF_MODELS["llama"].build()
    _, backend = _run(model, {"sparsity": 0.5, "decode": False}, token_ids(batch=1, seq=1))
    assert backend.after[0]["cpu_topk_linear"] == 0
    assert CompileOptions.parse({"sparsity": 0.5}).decode is True  # on by default
    with pytest.raises(TypeError, match="option 'decode': must be True or False, got 'yes'"):
        CompileOptions.parse({"sparsity": 0.5, "decode": "yes"})


@pytest.mark.parametrize("rows,batch,taken", [(0, 1, False), (1, 2, False), (4, 3, True)])
def test_cost_model_gate(decide, rows, batch, taken):
    """A group is taken iff the graph's rows per call fit the decided max_sparse_rows, and the
    op receives that maximum."""
    decide(rows)
    model = HF_MODELS["llama"].build()
    ids = token_ids(batch=batch, seq=1)
    out, backend = _run(model, {"sparsity": 0.5}, ids)
    expected = 4 * LAYERS if taken else 0
    assert backend.after[0]["cpu_topk_linear"] == expected
    torch.testing.assert_close(out, _reference(model, {"sparsity": 0.5}, ids), atol=2e-5,
                               rtol=2e-5)


def test_prefill_graph_is_left_alone(decide):
    """More rows per call than the kernel ever takes (prefill): no weights are prepared."""
    decide(8)
    _, backend = _run(HF_MODELS["llama"].build(), {"sparsity": 0.5},
                      token_ids(batch=1, seq=9))
    assert backend.after[0]["cpu_topk_linear"] == 0


def test_quantized_groups_are_left_alone(decide):
    decide(8)
    _, backend = _run(HF_MODELS["llama"].build(), {"sparsity": 0.5, "quant": "int8"},
                      token_ids(batch=1, seq=1))
    assert backend.after[0]["cpu_topk_linear"] == 0


def _prepared(backend: CountingBackend) -> list:
    """The prepared weights of the graph's ``cpu_topk_linear`` calls, in graph order."""
    result = backend.results[0]
    nodes = [n for n in result.graph.graph.nodes
             if n.target == torch.ops.qsparse.cpu_topk_linear.default]
    return [result.constants[n.kwargs.get("weight_t", n.args[5]).name] for n in nodes]


def test_prepared_weights(decide):
    """Concatenated K-major weights for groups; a single [in, out] weight is used in place."""
    decide(8)
    model = HF_MODELS["gpt2"].build()
    _, backend = _run(model, {"sparsity": 0.5, "fuse": False}, token_ids(1, 1))
    c_attn = model.transformer.h[0].attn.c_attn.weight  # Conv1D: [in, out], K-major already
    assert _prepared(backend)[0].data_ptr() == c_attn.data_ptr()

    llama = HF_MODELS["llama"].build()
    _, backend = _run(llama, {"sparsity": 0.5, "fuse": False}, token_ids(1, 1))
    attn = llama.model.layers[0].self_attn
    qkv = _prepared(backend)[0]
    assert qkv.is_contiguous()
    assert torch.equal(qkv, torch.cat([attn.q_proj.weight.t(), attn.k_proj.weight.t(),
                                       attn.v_proj.weight.t()], dim=1))


def test_inductor_end_to_end(decide):
    """Inductor takes the prepared weights as inputs and calls the op per group."""
    decide(1)
    model = HF_MODELS["llama"].build()
    ids = token_ids(batch=1, seq=1)
    out, backend = _run(model, {"sparsity": 0.5}, ids, inner="inductor")
    assert backend.after[0]["cpu_topk_linear"] == 4 * LAYERS
    torch.testing.assert_close(out, _reference(model, {"sparsity": 0.5}, ids), atol=2e-5,
                               rtol=2e-5)


def test_in_place_cache_writes_survive(decide):
    """Dead-code elimination must keep in-place methods whose result is unused (a static KV
    cache is written with ``keys.index_copy_(...)``), in every pass of the pipeline."""
    decide(8)
    from transformers import StaticCache

    model = HF_MODELS["llama"].build()
    ids = token_ids(batch=1, seq=1)

    def decode(fn) -> torch.Tensor:
        cache = StaticCache(config=model.config, max_cache_len=4)
        steps = [fn(input_ids=ids, past_key_values=cache, cache_position=torch.tensor([i]),
                    use_cache=True).logits for i in range(3)]
        return torch.cat(steps)

    backend = CountingBackend({"sparsity": 0.5})
    with torch.no_grad():
        got = decode(torch.compile(model, backend=backend, fullgraph=True))
        with reference_model(model, sparsity=0.5):
            expected = decode(model)
    assert backend.after[0]["cpu_topk_linear"] == 4 * LAYERS
    assert backend.after[0]["index_copy_"] == backend.before[0]["index_copy_"] > 0
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)


class _Block(torch.nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.norm = torch.nn.LayerNorm(64)
        self.proj = torch.nn.Linear(64, 48)

    def forward(self, x):
        return self.proj(self.norm(x))


def _expected(block, x, sparsity=0.5):
    with torch.no_grad(), reference_model(block, sparsity=sparsity):
        return block(x)


def test_prepared_weights_follow_the_weights_the_graph_runs_with(decide):
    """Dynamo reuses one graph for every instance of a class, and weights change in place:
    the prepared copies are made again from the weights of each call where those differ."""
    decide(8)
    first, second, x = _Block(0), _Block(1), torch.randn(1, 64)
    backend = CountingBackend({"sparsity": 0.5})
    with torch.no_grad():
        out_first = torch.compile(first, backend=backend)(x)
        out_second = torch.compile(second, backend=backend)(x)
        assert backend.calls == 1  # one graph serves both instances
        assert backend.after[0]["cpu_topk_linear"] == 1
        torch.testing.assert_close(out_first, _expected(first, x))
        torch.testing.assert_close(out_second, _expected(second, x))
        first.proj.weight.mul_(2)  # an in-place update (an optimizer step, load_state_dict)
        torch.testing.assert_close(torch.compile(first, backend=backend)(x),
                                   _expected(first, x))


@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2"])
def test_dense_head_takes_the_kernel_with_every_feature(name, decide):
    """The head the configuration leaves dense becomes ``cpu_topk_linear`` with ``k = D`` over
    its K-major weight where the cost model says so; the logits are the dense product's."""
    asked = decide(8, dense_rows=1)
    model = HF_MODELS[name].build()
    ids = token_ids(batch=1, seq=1)
    out, backend = _run(model, {"sparsity": 0.5}, ids)
    groups = GROUPS_PER_LAYER[name] * LAYERS
    before, after = backend.before_live[0], backend.after[0]
    assert after["cpu_topk_linear"] == groups + 1
    # every projection's product left the graph, the head's mm too (what stays, e.g. a
    # rotary embedding's bmm in some transformers versions, is no projection)
    assert dense_projections(before) - dense_projections(after) == \
        HF_MODELS[name].per_layer * LAYERS + 1
    head = model.get_output_embeddings().weight
    assert ("dense", head.shape[1], head.shape[0], torch.float32) in asked
    result = backend.results[0]
    (call,) = [n for n in result.graph.graph.nodes
               if n.target == torch.ops.qsparse.cpu_topk_linear.default
               and n.kwargs.get("k", n.args[1]) == head.shape[1]
               and result.constants[n.kwargs.get("weight_t", n.args[5]).name].shape[1]
               == head.shape[0]]
    assert torch.equal(result.constants[call.kwargs.get("weight_t", call.args[5]).name],
                       head.t())
    torch.testing.assert_close(out, _reference(model, {"sparsity": 0.5}, ids), atol=2e-5,
                               rtol=2e-5)


@pytest.mark.parametrize("rows,batch,taken", [(0, 1, False), (1, 2, False), (2, 2, True)])
def test_dense_cost_model_gate(decide, rows, batch, taken):
    decide(8, dense_rows=rows)
    model = HF_MODELS["llama"].build()
    ids = token_ids(batch=batch, seq=1)
    out, backend = _run(model, {"sparsity": 0.5}, ids)
    assert backend.after[0]["cpu_topk_linear"] == 4 * LAYERS + taken
    assert dense_projections(backend.before_live[0]) - dense_projections(backend.after[0]) \
        == HF_MODELS["llama"].per_layer * LAYERS + taken
    torch.testing.assert_close(out, _reference(model, {"sparsity": 0.5}, ids), atol=2e-5,
                               rtol=2e-5)


def test_dense_excluded_projection_with_bias(decide):
    """An excluded biased projection (``addmm``) takes the kernel with its bias; the sparse
    one beside it keeps its own group."""
    decide(8, dense_rows=8)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.ReLU(),
                                torch.nn.Linear(40, 16))
    options = {"sparsity": 0.5, "exclude": ("0",), "dense_roles": ()}
    backend = CountingBackend(options, "eager")
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    x = torch.randn(3, 24)
    with torch.no_grad():
        out = compiled(x)
        with reference_model(model, **options):
            expected = model(x)
    assert backend.after[0]["cpu_topk_linear"] == 2
    assert dense_projections(backend.after[0]) == 0
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_dense_left_alone_in_training_graphs(decide):
    decide(8, dense_rows=8)
    model = HF_MODELS["llama"].build()
    _, backend = _run(model, {"sparsity": 0.5}, token_ids(batch=1, seq=1), grad=True)
    assert backend.after[0]["cpu_topk_linear"] == 0
    # the projections became sparse_linear; the head's mm stays
    assert dense_projections(backend.before_live[0]) - dense_projections(backend.after[0]) \
        == HF_MODELS["llama"].per_layer * LAYERS
