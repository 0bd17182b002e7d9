"""The Triton decode path: projection groups collapse to ``qsparse_triton.sparse_gemv``.

Tiny Hugging Face models compiled through the backend under ``torch.no_grad()``, one token per
call (decode), ``inner="eager"``. ``kernels="triton"`` forces the Triton path on the test device
(``QSPARSE_TEST_DEVICE``, see ``tests/devices.py``): on the CPU the kernels run in Triton's
interpreter (``TRITON_INTERPRET=1``, set by ``tests/conftest.py``), which is how a machine without
a GPU checks what ``kernels="auto"`` selects for CUDA weights; on ``cuda`` they run compiled. The
reference model runs on the same device as the compiled one.
Per layer of a Llama-family model there are four groups: q/k/v, o, gate/up and down; the two
norms before q/k/v and gate/up fuse with their sparsify (``norm_sparsify``). With a weight
format (``weights=``, ``head_weights=``, ``quant="bitnet"``) each group becomes one
``qsparse_triton::packed_gemv`` over its packed weights instead of ``sparse_gemv``.
"""

from __future__ import annotations

import collections

import pytest

pytest.importorskip("triton", reason="triton is not installed: the Triton path needs it")

import torch  # noqa: E402
from devices import selected_device  # noqa: E402
from hf_models import HF_MODELS, LAYERS, token_ids  # noqa: E402
from op_counts import CountingBackend, dense_projections  # noqa: E402

from qsparse_compile.options import CompileOptions  # noqa: E402
from qsparse_compile.passes import cpu_decode, cuda_decode  # noqa: E402
from qsparse_compile.reference import reference_model  # noqa: E402

GROUPS = 4 * LAYERS
SLICES = {"llama": 5 * LAYERS, "qwen2": 5 * LAYERS, "gpt2": 0}  # q/k/v: 3 views, gate/up: 2
TRITON = {"kernels": "triton"}
DEVICE = selected_device()

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


@pytest.fixture(autouse=True)
def _kernel_cache(tmp_path_factory, monkeypatch, fresh_dynamo):
    monkeypatch.setenv("QSPARSE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "kernels"))


def by_namespace(gm: torch.fx.GraphModule) -> collections.Counter:
    """``namespace::name`` counts of the ``torch.ops`` calls in a graph."""
    return collections.Counter(
        f"{n.target.namespace}::{n.target._opname}" for n in gm.graph.nodes
        if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload))


class GraphKeeper(CountingBackend):
    """A counting backend whose rewritten graphs are at hand."""

    @property
    def graphs(self) -> list[torch.fx.GraphModule]:
        return [r.graph for r in self.results]


def _run(model, options, ids, grad=False, calls=1):
    backend = GraphKeeper(options)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    with torch.set_grad_enabled(grad):
        outs = [compiled(ids, use_cache=False).logits for _ in range(calls)]
    return outs, backend


def _reference(model, options, ids):
    options = {k: v for k, v in options.items() if k != "kernels"}
    with torch.no_grad(), reference_model(model, **options):
        return model(ids, use_cache=False).logits


CASES = {
    "llama-topk": ("llama", {"sparsity": 0.5}),
    "llama-topk-l2-int8": ("llama", {"sparsity": 0.4, "rescale": "l2", "quant": "int8"}),
    "qwen2-bias": ("qwen2", {"sparsity": 0.5}),
    "gpt2-conv1d-layernorm": ("gpt2", {"sparsity": 0.5}),
}


@pytest.mark.parametrize("name,options", list(CASES.values()), ids=list(CASES))
def test_groups_become_triton_gemv_and_match_reference(name, options):
    model = HF_MODELS[name].build().to(DEVICE)
    ids = token_ids(batch=1, seq=1).to(DEVICE)
    (out,), backend = _run(model, {**options, **TRITON}, ids)
    before, after = backend.before_live[0], backend.after[0]
    ops = by_namespace(backend.graphs[0])
    assert ops["qsparse_triton::sparse_gemv"] == GROUPS
    assert after["sparse_linear"] == after["cpu_topk_linear"] == 0
    assert after["slice"] - before["slice"] == SLICES[name]
    # every projection but the head left the dense products
    assert dense_projections(before) - dense_projections(after) == \
        HF_MODELS[name].per_layer * LAYERS
    # the sparsify ops run the Triton kernels: fused with the norm before q/k/v and gate/up
    assert ops["qsparse_triton::norm_sparsify"] == 2 * LAYERS
    assert ops["qsparse_triton::topk_sparsify"] == 2 * LAYERS  # o and down
    assert not any(op.startswith("qsparse::") and op.endswith("sparsify") for op in ops)
    result = backend.results[0]
    assert (result.triton, result.decode, result.lowered) == (DEVICE.type, GROUPS, 4 * LAYERS)
    tolerance = 1e-4 if options.get("quant") else 2e-5
    torch.testing.assert_close(out, _reference(model, options, ids), atol=tolerance,
                               rtol=tolerance)


FORMAT_CASES = {
    "llama-int4-head-int8": ("llama", {"sparsity": 0.5, "weights": "int4",
                                       "head_weights": "int8"}),
    "llama-bitnet": ("llama", {"sparsity": 0.4, "quant": "bitnet"}),
    "qwen2-bias-int8": ("qwen2", {"sparsity": 0.5, "weights": "int8"}),
    "gpt2-conv1d-int4": ("gpt2", {"sparsity": 0.5, "weights": "int4"}),
}
QUANTIZERS = ("int8_weight_fake_quant", "int4_weight_fake_quant", "ternary_fake_quant")


@pytest.mark.parametrize("name,options", list(FORMAT_CASES.values()), ids=list(FORMAT_CASES))
def test_format_groups_become_packed_gemv_and_match_reference(name, options):
    """Weight formats on the Triton path: every group (the head with ``head_weights`` too)
    reads its packed weights with one ``qsparse_triton.packed_gemv``; no quantizer, dense
    GEMV or ``sparse_linear`` is left, and the logits equal the eager oracle's with the same
    formats."""
    model = HF_MODELS[name].build().to(DEVICE)
    ids = token_ids(batch=1, seq=1).to(DEVICE)
    (out,), backend = _run(model, {**options, **TRITON}, ids)
    before, after = backend.before_live[0], backend.after[0]
    ops = by_namespace(backend.graphs[0])
    head = 1 if "head_weights" in options else 0
    assert ops["qsparse_triton::packed_gemv"] == GROUPS + head
    assert ops["qsparse_triton::sparse_gemv"] == 0
    assert after["sparse_linear"] == 0 and sum(after[q] for q in QUANTIZERS) == 0
    assert backend.results[0].passes["fold_weights"] == 0  # nothing left to fold
    assert dense_projections(before) - dense_projections(after) == \
        HF_MODELS[name].per_layer * LAYERS + head
    assert ops["qsparse_triton::norm_sparsify"] == 2 * LAYERS
    tolerance = 1e-4 if options.get("quant") else 2e-5
    torch.testing.assert_close(out, _reference(model, options, ids), atol=tolerance,
                               rtol=tolerance)


def test_weights_prepared_once(monkeypatch):
    """K-major group weights are built at compile time, once per group, and bound to the
    graph as constants; calling the compiled model again neither rebuilds them nor
    recompiles."""
    prepared = []
    real = cuda_decode.k_major_weight

    def spy(members, dtype):
        prepared.append(len(members))
        return real(members, dtype)

    monkeypatch.setattr(cuda_decode, "k_major_weight", spy)
    model = HF_MODELS["llama"].build().to(DEVICE)
    ids = token_ids(batch=1, seq=1).to(DEVICE)
    (first, second), backend = _run(model, {"sparsity": 0.5, **TRITON}, ids, calls=2)
    assert backend.calls == 1
    assert prepared == [3, 1, 2, 1] * LAYERS  # q/k/v, o, gate/up, down
    gm = backend.graphs[0]
    constants = backend.results[0].constants
    assert len(constants) == GROUPS  # Llama has no biases
    attn = model.model.layers[0].self_attn
    gemv = next(n for n in gm.graph.nodes
                if n.target == torch.ops.qsparse_triton.sparse_gemv.default)
    qkv = constants[gemv.args[1].name]
    assert qkv.is_contiguous()
    assert torch.equal(qkv, torch.cat([attn.q_proj.weight.t(), attn.k_proj.weight.t(),
                                       attn.v_proj.weight.t()], dim=1))
    pointers = {name: t.data_ptr() for name, t in constants.items()}
    with torch.no_grad():
        third = torch.compile(model, backend=backend, fullgraph=True)(ids, use_cache=False)
    assert prepared == [3, 1, 2, 1] * LAYERS and backend.calls == 1
    assert pointers == {name: t.data_ptr() for name, t in backend.results[0].constants.items()}
    assert torch.equal(first, second) and torch.equal(first, third.logits)


def test_auto_on_cpu_does_not_pick_triton(monkeypatch):
    """The default ``kernels="auto"`` keeps CPU graphs on the CPU path (CPU decode op).

    CPU tensors whatever the test device: this is about CPU weights."""
    monkeypatch.setattr(cpu_decode, "_max_sparse_rows", lambda *args: 8)
    monkeypatch.setattr(cpu_decode, "_max_dense_rows", lambda *args: 0)  # the head: mm
    model = HF_MODELS["llama"].build()
    ids = token_ids(batch=1, seq=1)
    (out,), backend = _run(model, {"sparsity": 0.5}, ids)
    ops = by_namespace(backend.graphs[0])
    assert not any(op.startswith("qsparse_triton::") for op in ops)
    assert ops["qsparse::cpu_topk_linear"] == GROUPS
    assert backend.results[0].triton is None
    torch.testing.assert_close(out, _reference(model, {"sparsity": 0.5}, ids), atol=2e-5,
                               rtol=2e-5)


def test_grad_enabled_keeps_differentiable_ops():
    """Compiled with grad on, the graph keeps sparse_linear and the qsparse sparsify ops (the
    GEMV and the qsparse_triton ops have no backward)."""
    model = HF_MODELS["llama"].build().to(DEVICE)
    ids = token_ids(batch=1, seq=1).to(DEVICE)
    (out,), backend = _run(model, {"sparsity": 0.5, **TRITON}, ids, grad=True)
    ops = by_namespace(backend.graphs[0])
    assert ops["qsparse::sparse_linear"] == HF_MODELS["llama"].per_layer * LAYERS
    assert not any(op.startswith("qsparse_triton::") for op in ops)
    result = backend.results[0]
    assert (result.triton, result.decode, result.lowered) == (DEVICE.type, 0, 0)
    torch.testing.assert_close(out.detach(), _reference(model, {"sparsity": 0.5}, ids),
                               atol=2e-5, rtol=2e-5)


def test_kernels_option_is_validated():
    assert CompileOptions.parse({"sparsity": 0.5}).kernels == "auto"
    assert CompileOptions.parse({"kernels": "triton"}).kernels == "triton"
    assert CompileOptions.parse({"kernels": "aten"}).kernels == "aten"
    with pytest.raises(ValueError, match=r"option 'kernels': got 'cuda', allowed: 'auto', "
                                         r"'triton', 'aten'"):
        CompileOptions.parse({"kernels": "cuda"})
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    compiled = torch.compile(model, backend="qsparse",
                             options={"sparsity": 0.5, "kernels": None, "inner": "eager"})
    with pytest.raises(Exception, match="option 'kernels': got None"):
        compiled(torch.randn(2, 8))


@pytest.mark.skipif(DEVICE.type != "cuda", reason="needs QSPARSE_TEST_DEVICE=cuda (a CUDA "
                    "device, kernels compiled with TRITON_INTERPRET=0)")
def test_auto_on_cuda_selects_triton():
    """GPU only: ``kernels="auto"`` on CUDA weights retargets the graph's sparsify ops (fused
    with the norms) to the Triton kernels and takes every decode group with the Triton GEMV;
    ``kernels="aten"`` keeps the ATen ops."""
    model = HF_MODELS["llama"].build().cuda()
    ids = token_ids(batch=1, seq=1).cuda()
    (out,), backend = _run(model, {"sparsity": 0.5}, ids)
    ops = by_namespace(backend.graphs[0])
    assert ops["qsparse_triton::sparse_gemv"] == GROUPS
    assert ops["qsparse_triton::norm_sparsify"] == 2 * LAYERS
    assert ops["qsparse_triton::topk_sparsify"] == 2 * LAYERS
    assert (backend.results[0].triton, backend.results[0].lowered) == ("cuda", 4 * LAYERS)
    torch.testing.assert_close(out, _reference(model, {"sparsity": 0.5}, ids), atol=1e-4,
                               rtol=1e-4)
    torch._dynamo.reset()
    (aten,), backend = _run(model, {"sparsity": 0.5, "kernels": "aten"}, ids)
    assert not any(op.startswith("qsparse_triton::") for op in by_namespace(backend.graphs[0]))
    torch.testing.assert_close(aten, out, atol=1e-4, rtol=1e-4)
