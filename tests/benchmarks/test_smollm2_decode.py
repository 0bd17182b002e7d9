"""The byte counts of ``benchmarks/smollm2_decode.py``: what each path reads per token.

The script's byte-count limit and roofline fractions are only as good as these counts, so they
are checked against the layouts the kernels read, on a tiny Llama (no SmolLM2 download).
"""

from __future__ import annotations

import pytest
import torch
from hf_models import HF_MODELS, VOCAB
from smollm2_decode import weight_bytes

from qsparse_compile.codegen.cpu.packed_weights import PackedLayout
from qsparse_compile.config import topk_count


@pytest.mark.parametrize("weights,head", [(None, None), ("int8", None), ("int4", "int4")])
def test_weight_bytes_follow_the_formats(weights, head):
    model = HF_MODELS["llama"].build()
    got = weight_bytes(model, 0.5, weights, head)
    expected_proj, dense_proj = 0.0, 0.0
    for path, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or path == "lm_head":
            continue
        N, D = module.weight.shape
        k = topk_count(D, 0.5)
        dense_proj += 4 * N * D
        expected_proj += 4 * N * k if weights is None else \
            PackedLayout(weights, D, N).read_bytes(k)
    N, D = model.lm_head.weight.shape
    assert got["projections_dense"] == dense_proj
    assert got["projections_sparse"] == pytest.approx(expected_proj)
    assert got["head"] == 4 * N * D
    assert got["head_sparse"] == (4 * N * D if head is None else
                                  PackedLayout(head, D, N).read_bytes(D))
    assert got["limit"] == pytest.approx(got["dense"] / got["sparse"])
    assert got["sparse"] < got["dense"]


def test_profile_breaks_a_decode_step_down(monkeypatch):
    from smollm2_decode import GreedyDecoder, profile_steps

    from qsparse_compile.passes import cpu_decode

    # the measured cost model decides per machine; fix it: every group fused, the head mm
    monkeypatch.setattr(cpu_decode, "_max_sparse_rows", lambda *args: 8)
    monkeypatch.setattr(cpu_decode, "_max_dense_rows", lambda *args: 0)
    torch.manual_seed(0)
    model = HF_MODELS["llama"].build().eval()
    compiled = torch.compile(model.forward, backend="qsparse", dynamic=False,
                             options={"sparsity": 0.5, "inner": "eager"})
    decoder = GreedyDecoder(model, compiled, torch.randint(0, VOCAB, (1, 5)), new_tokens=4)
    decoder.run()  # compiles prefill and decode
    text, parts = profile_steps(decoder, "qsparse", steps=2)
    assert "per decode step (qsparse)" in text and "prefill" not in text
    step = parts["step (profiled)"]
    assert step["calls"] == 1 and step["ms"] > 0
    # a decode step runs the fused kernel once per fused group (q/k/v, o, gate/up, down)
    layers = model.config.num_hidden_layers
    assert parts["fused top-K linear"]["calls"] == 4 * layers
    named = sum(parts[name]["ms"] for name in ("packed linear", "fused top-K linear",
                                               "attention"))
    region = parts["compiled region"]["ms"]
    assert parts["rest of the compiled region"]["ms"] == pytest.approx(region - named)
    assert parts["outside the compiled region"]["ms"] == pytest.approx(
        step["ms"] - region - parts["Dynamo cache look-up"]["ms"])
    assert 0 < named <= region <= step["ms"]
