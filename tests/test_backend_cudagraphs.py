"""CUDA graphs through the backend (``cudagraphs=True`` / ``mode="reduce-overhead"``), checked
without a GPU.

What can be checked on the CPU: the option is validated like the others; it reaches Inductor
as ``triton.cudagraphs`` in the ``config_patches`` of that graph's ``compile_fx`` call (and only
then); the graph handed to Inductor marks its parameters, static buffers and prepared weights
as fixed-address inputs, as Dynamo does, so CUDA graphs read them in place instead of copying
them at every replay; and the graphs the passes produce for a Hugging Face decode step hold no
op a CUDA graph cannot capture (a host sync, a data-dependent shape). Capturing and replaying
on a device is the GPU suite's part (``benchmarks/gpu_suite.py``).
"""

from __future__ import annotations

import pytest
import torch
import torch._inductor.compile_fx as inductor_compile_fx
from assertions import raises_naming
from devices import selected_device
from hf_models import HF_MODELS, token_ids

from qsparse_compile import Backend
from qsparse_compile.passes import cpu_decode

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.norm = torch.nn.LayerNorm(64)
        self.up = torch.nn.Linear(64, 96)
        self.down = torch.nn.Linear(96, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(self.norm(x))))


# --- the option (its validation, with the other Inductor flags: tests/test_options.py) -------

# --- it reaches Inductor ---------------------------------------------------------------------

@pytest.fixture
def inductor_calls(monkeypatch):
    """Replace Inductor's ``compile_fx`` (which the backend imports at each call) with one that
    records what it was given and runs the graph as is."""
    calls = []

    def record(gm, inputs, config_patches=None, **kwargs):
        calls.append({"gm": gm, "inputs": list(inputs), "patches": dict(config_patches or {})})
        return gm.forward

    monkeypatch.setattr(inductor_compile_fx, "compile_fx", record)
    return calls


def _compile_and_call(backend, grad=False, **compile_kwargs):
    model, x = _Tiny(), torch.randn(1, 64)
    compiled = torch.compile(model, backend=backend, fullgraph=True, **compile_kwargs)
    with torch.set_grad_enabled(grad):
        return compiled(x), model, x


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
def test_option_sets_triton_cudagraphs(inductor_calls, grad):
    _compile_and_call(Backend(sparsity=0.5, cudagraphs=True), grad=grad)
    assert len(inductor_calls) == 1
    patches = inductor_calls[0]["patches"]
    assert patches["triton.cudagraphs"] is True
    assert patches["emulate_precision_casts"] is True  # the other patches stay


def test_absent_by_default(inductor_calls):
    _compile_and_call(Backend(sparsity=0.5))
    _compile_and_call("qsparse", options={"sparsity": 0.5})
    assert len(inductor_calls) == 2
    for call in inductor_calls:
        assert "triton.cudagraphs" not in call["patches"]
        gm = call["gm"]
        assert "dynamo_compile_id" not in gm.meta  # nothing carried over either


def test_by_name_with_options(inductor_calls):
    _compile_and_call("qsparse", options={"sparsity": 0.5, "cudagraphs": True})
    assert inductor_calls[0]["patches"]["triton.cudagraphs"] is True


def test_mode_reduce_overhead(inductor_calls):
    """``mode=`` and ``options=`` exclude each other in ``torch.compile``: the mode works
    alone with the name, or with a :class:`Backend` object that holds the options."""
    _compile_and_call(Backend(sparsity=0.5), mode="reduce-overhead")
    _compile_and_call("qsparse", mode="reduce-overhead")
    _compile_and_call(Backend(sparsity=0.5), mode="default")
    assert [c["patches"].get("triton.cudagraphs") for c in inductor_calls] == [True, True, None]


def test_other_modes_refused():
    backend = Backend(sparsity=0.5)
    with raises_naming(ValueError, "'max-autotune'", "'reduce-overhead'", "cudagraphs"):
        backend(None, [], mode="max-autotune")
    with pytest.raises(Exception) as info:  # Dynamo wraps it (BackendCompilerFailed)
        _compile_and_call(backend, mode="max-autotune-no-cudagraphs")
    assert "max-autotune-no-cudagraphs" in str(info.value)


def test_reduce_overhead_with_eager_inner_refused():
    backend = Backend(sparsity=0.5, inner="eager")
    with raises_naming(ValueError, "'cudagraphs'", "inner='eager'"):
        backend(None, [], mode="reduce-overhead")


def test_fixed_address_inputs_marked(inductor_calls):
    """Parameters and prepared weights are static inputs of the graph Inductor gets; the
    activation is not."""
    backend = Backend(sparsity=0.5, cudagraphs=True)
    out, model, x = _compile_and_call(backend)
    call = inductor_calls[0]
    gm, inputs = call["gm"], call["inputs"]
    assert "dynamo_compile_id" in gm.meta and gm._param_name_to_source == {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert len(placeholders) == len(inputs)
    constants = set(backend.results[0].constants)
    params = {id(p) for p in model.parameters()}
    static = []
    for node, value in zip(placeholders, inputs, strict=True):
        assert hasattr(node, "_dynamo_source")
        is_static = node.meta.get("tensor_dict", {}).get("_dynamo_static_input_type") is not None
        static.append(is_static)
        if id(value) in params or node.name in constants:
            assert is_static, node.name
        elif value is x:
            assert not is_static, node.name
    assert sum(not s for s in static) == 1
    torch.testing.assert_close(out, _compile_and_call(Backend(sparsity=0.5))[0])


def test_real_inductor_on_cpu_compiles_and_keeps_static_indices(monkeypatch):
    """The metadata carried over passes AOTAutograd's own checks: the real ``compile_fx``
    compiles the graph (on the CPU Inductor skips the capture itself), AOTAutograd finds the
    static inputs, and the result equals the graph compiled without CUDA graphs."""
    import torch._functorch.aot_autograd as aot

    real = getattr(aot, "_try_get_metadata_from_dynamo", None)
    if real is None:
        pytest.skip("this PyTorch's AOTAutograd reads Dynamo's metadata elsewhere")
    seen = []

    def spy(mod, keys, count, *args, **kwargs):
        result = real(mod, keys, count, *args, **kwargs)
        seen.append((count, list(result[1])))
        return result

    monkeypatch.setattr(aot, "_try_get_metadata_from_dynamo", spy)
    with _no_warning():
        out, model, x = _compile_and_call(Backend(sparsity=0.5, cudagraphs=True))
    (count, static), = seen
    assert count - len(static) == 1  # only the activation is copied at each replay
    torch._dynamo.reset()
    torch.testing.assert_close(out, _compile_and_call(Backend(sparsity=0.5))[0])


class _no_warning:
    """No qsparse warning (e.g. 'inputs cannot be matched with Dynamo's') while compiling."""

    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings(record=True)
        self._seen = self._catch.__enter__()
        warnings.simplefilter("always")

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)
        ours = [str(w.message) for w in self._seen if str(w.message).startswith("qsparse")]
        assert not ours, ours
        return False


# --- decode graphs stay capturable -----------------------------------------------------------

#: ops that read a device value on the host (a sync inside a capture) or give shapes that
#: depend on data
UNCAPTURABLE = {"nonzero", "nonzero_static", "item", "_local_scalar_dense", "masked_select",
                "unique", "_unique", "_unique2", "unique_dim", "unique_consecutive",
                "is_nonzero", "equal", "allclose", "masked_scatter", "repeat_interleave",
                "argwhere", "bincount", "histc", "tolist"}


def _graphs(gm: torch.fx.GraphModule):
    yield gm
    for child in gm.children():
        if isinstance(child, torch.fx.GraphModule):
            yield from _graphs(child)


def _uncapturable(gm: torch.fx.GraphModule) -> list[str]:
    problems = []
    for graph in _graphs(gm):
        for node in graph.graph.nodes:
            if node.op == "call_function":
                target = node.target
                name = getattr(target, "_opname", None) or getattr(target, "__name__", "")
                if name in UNCAPTURABLE:
                    problems.append(f"{node.name}: {target}")
            if node.op == "call_method" and node.target in UNCAPTURABLE | {"cpu", "numpy"}:
                problems.append(f"{node.name}: .{node.target}()")
            vals = node.meta.get("val")
            for val in vals if isinstance(vals, (list, tuple)) else [vals]:
                if isinstance(val, torch.Tensor):
                    if not all(type(d) is int for d in val.shape):
                        problems.append(f"{node.name}: symbolic shape {tuple(val.shape)}")
                elif isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool)):
                    problems.append(f"{node.name}: symbolic scalar {val}")
    return problems


@pytest.mark.parametrize("kernels", ["auto", "triton"])
def test_hf_decode_graph_is_capturable(kernels, monkeypatch, tmp_path):
    """Prefill and a one-token decode step of a tiny Llama with a static cache, grad off: every
    graph the passes produce is free of host syncs and data-dependent shapes, on the CPU decode
    path and on the Triton path (the one CUDA weights take). The Triton case runs on the test
    device (``QSPARSE_TEST_DEVICE``: kernels compiled on ``cuda``); the CPU decode path is CPU's."""
    device = torch.device("cpu")
    if kernels == "triton":
        pytest.importorskip("triton", reason="triton is not installed: the Triton path needs it")
        monkeypatch.setenv("QSPARSE_CACHE_DIR", str(tmp_path / "kernels"))
        device = selected_device()
    else:
        monkeypatch.setattr(cpu_decode, "_max_sparse_rows", lambda *args: 8)  # decode sparse
    from transformers import StaticCache

    model = HF_MODELS["llama"].build().to(device)
    prompt = token_ids(batch=1, seq=3).to(device)
    backend = Backend(sparsity=0.5, inner="eager", kernels=kernels)
    forward = torch.compile(model.forward, backend=backend, dynamic=False, fullgraph=True)
    with torch.no_grad():
        cache = StaticCache(config=model.config, max_cache_len=prompt.shape[1] + 2)
        out = forward(input_ids=prompt, past_key_values=cache,
                      cache_position=torch.arange(prompt.shape[1], device=device), use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        forward(input_ids=token, past_key_values=cache,
                cache_position=torch.tensor([prompt.shape[1]], device=device), use_cache=True)
    assert len(backend.results) == 2  # prefill, decode
    decode = backend.results[-1]
    assert decode.inference
    if kernels == "triton":
        assert decode.passes.get("cuda_decode", 0) > 0, decode.passes
    else:
        assert decode.passes.get("cpu_decode", 0) > 0, decode.passes
    for result in backend.results:
        assert _uncapturable(result.graph) == []
