"""The byte counts of ``benchmarks/smollm2_decode.py``: what each path reads per token.

The script's byte-count limit and roofline fractions are only as good as these counts, so they
are checked against the layouts the kernels read, on a tiny Llama (no SmolLM2 download).
"""

from __future__ import annotations

import pytest
import torch
from hf_models import HF_MODELS
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
