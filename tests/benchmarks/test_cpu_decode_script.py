"""The helpers of ``benchmarks/cpu_decode.py``: options, byte counts, the int8 baseline, verdicts.

Nothing here compiles or times anything (the script itself does, ``--quick``); these check that
the rows ask the backend for what they claim, count the bytes the kernels read, and that the
``aten._weight_int8pack_mm`` baseline computes the product it stands for.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from cpu_decode import (
    GOAL_FRACTION,
    backend_options,
    check_graph,
    expected_op,
    format_table,
    goal_report,
    int8pack_weight,
    kept_rows,
    weight_bytes,
)

from qsparse_compile.codegen.cpu.packed_weights import PackedLayout
from qsparse_compile.options import CompileOptions


@pytest.mark.parametrize("fmt", ["fp32", "int8", "int4", "ternary"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5])
def test_options_are_valid_and_keep_the_lone_projection_sparse(fmt, sparsity):
    options = backend_options(fmt, sparsity)
    config = CompileOptions.parse(options).config
    assert config.dense_roles == ()
    assert config.weights == (fmt if fmt in ("int8", "int4") else None)
    assert config.quant == ("bitnet" if fmt == "ternary" else None)
    expected = expected_op(fmt, sparsity)
    assert expected == (None if (fmt, sparsity) == ("fp32", 0.0) else
                        "cpu_topk_linear" if fmt == "fp32" else "cpu_packed_linear")


def test_weight_bytes():
    D, N = 4096, 11008
    assert weight_bytes("fp32", D, N, 2048) == 4 * N * 2048
    for fmt in ("int8", "int4", "ternary"):
        layout = PackedLayout(fmt, D, N)
        assert weight_bytes(fmt, D, N, 2048) == layout.read_bytes(2048)
        # a mean row count interpolates between whole ones
        assert weight_bytes(fmt, D, N, 2048.5) == pytest.approx(
            (layout.read_bytes(2048) + layout.read_bytes(2049)) / 2)


def test_int8pack_mm_baseline_is_the_dequantised_product():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 96, generator=g)
    codes, scales = int8pack_weight(weight)
    assert codes.dtype == torch.int8 and scales.shape == (48,) and scales.dtype == weight.dtype
    x = torch.randn(3, 96, generator=g)
    got = torch.ops.aten._weight_int8pack_mm(x, codes, scales)
    want = F.linear(x, codes.float() * scales[:, None])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (codes.float() * scales[:, None] - weight).abs().max() <= scales.max() / 2 + 1e-6
    with pytest.raises(RuntimeError):  # the scales must be in x's dtype
        torch.ops.aten._weight_int8pack_mm(x, codes, scales.bfloat16())


def test_kept_rows_is_the_union_of_each_tokens_top_k():
    x = torch.tensor([[5.0, 0.1, -4.0, 0.2], [0.1, 3.0, -0.2, -6.0]])
    assert kept_rows(x[:1], 2) == 2
    assert kept_rows(x, 2) == 4
    assert kept_rows(x, 4) == 4


def _row(fraction: float, sparsity: float = 0.5, fmt: str = "fp32", tokens: int = 1) -> dict:
    return {"out_features": 4096, "in_features": 4096, "tokens": tokens, "format": fmt,
            "sparsity": sparsity, "dense_ms": 4.0, "int8mm_ms": 3.0, "ours_ms": 2.0,
            "speedup_vs_dense": 2.0 * fraction, "speedup_vs_int8mm": 1.5, "ours_bytes": 2**25,
            "limit": 2.0, "fraction_of_limit": fraction, "ours_gb_per_s": 16.0,
            "contended_repeats": 0}


def test_goal_report_verdicts():
    shape = [(4096, 4096)]
    good, bad = GOAL_FRACTION + 0.01, GOAL_FRACTION - 0.01
    assert goal_report([_row(good, 0.4), _row(good, 0.5)], shape)[0].endswith("-> met")
    assert "NOT met" in goal_report([_row(good, 0.4), _row(bad, 0.5)], shape)[0]
    assert "open" in goal_report([_row(good, 0.5)], shape)[0]
    assert "NOT met" in goal_report([_row(bad, 0.5)], shape)[0]
    # other formats and several tokens do not count toward the fp32 decode goal
    others = [_row(good, 0.4, "int4"), _row(good, 0.5, tokens=8)]
    assert goal_report(others, shape)[0].endswith("not measured")


def test_format_table_has_a_line_per_row():
    table = format_table([_row(0.95), _row(0.5, fmt="ternary")])
    lines = table.splitlines()
    assert len(lines) == 4 and "ternary" in lines[3] and "95%" in lines[2]


def test_check_graph_fails_loudly_without_records():
    with pytest.raises(SystemExit, match="expected one graph"):
        check_graph(torch.nn.Linear(4, 4), "cpu_topk_linear", "row")
