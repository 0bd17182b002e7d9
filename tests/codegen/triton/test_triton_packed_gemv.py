"""Decode GEMV over packed int8 / int4 / ternary weights against its pure-PyTorch reference.

The reference is ``F.linear(x_s, dequantize(packed))`` in fp32, rounded once to ``x.dtype``
(``packed_gemv_reference``; the weights unpacked by plain indexing). The kernel sums in another
order and takes the int8 / ternary scale out of the sum, so the bound is that of two fp32
summation orders over ``K + 2`` terms, ``2 (K + 2) u sum|x| |w|``, where for int4 ``|w|`` is
``|d| q + |m|`` (the kernel forms ``d q + m`` in registers, perhaps with an FMA), plus one
rounding of the output dtype.

Shapes are small (the interpreter is slow) and reach every edge of the layout: K not a multiple
of the int4 group of 32 (a short last group), K = 1, N = 1 and N past one panel (128 int8,
256 int4, 512 ternary columns); 1-8 tokens (11: two launches); masks that drop whole groups and
keep the rows at group boundaries; one program per panel row or several (``block_bytes``), one
K range or a split; the selection kernel in front with ties and NaN (the decode path).
Inputs are built on ``triton_cases.DEVICE``; the reference runs on the CPU.
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton", reason="triton is not installed: the Triton kernel tests need it")

import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch.library import opcheck  # noqa: E402
from triton_cases import DTYPES, cpu_reference, on_device, rows_of, ulp  # noqa: E402

from qsparse_compile import reference  # noqa: E402
from qsparse_compile.codegen.cpu import packed_linear_op  # noqa: E402
from qsparse_compile.codegen.cpu.packed_weights import (  # noqa: E402
    FORMATS,
    PANEL_ROW_BYTES,
    dequantize,
    pack,
    quantize,
)
from qsparse_compile.codegen.triton import packed_gemv as pg  # noqa: E402
from qsparse_compile.codegen.triton import row_sparsify  # noqa: E402
from qsparse_compile.codegen.triton.gemv import ACC_ELEMENTS, MAX_TOKENS  # noqa: E402

formats = pytest.mark.parametrize("fmt", list(FORMATS))
U32 = 2.0**-24
GROUP_WIDTHS = [1, 7, 31, 32, 33, 40, 70]
#: tiling overrides: the heuristic's; several programs per panel row and a K split; tiny tiles
TILINGS = [{}, {"splits": 2, "block_k": 8, "block_bytes": 8},
           {"splits": 3, "block_k": 4, "block_bytes": 16}]


def _panel_cols(fmt: str) -> int:
    return pg.packed_layout(fmt, 1, 1).panel_cols


def _weight(n: int, k: int, g: torch.Generator, pattern: str) -> torch.Tensor:
    w = torch.randn(n, k, generator=g)
    if pattern == "constant-groups":  # max == min in a group: int4 d == 0, codes 0
        w[:, :min(k, 32)] = 0.5
        w = torch.where(torch.rand(n, k, generator=g) < 0.3, -0.25, w)
    return w


def _activations(tokens: int, k: int, dtype: torch.dtype, pattern: str,
                 g: torch.Generator) -> torch.Tensor:
    x = torch.randn(tokens, k, generator=g)
    if pattern == "zero":
        x.zero_()
    elif pattern == "topk":
        x = reference.topk_sparsify(x, max(1, k // 2))
    elif pattern == "union":  # tokens zero in different places: the union decides
        keep = torch.rand(tokens, k, generator=g) < 0.4
        keep[::3] = False
        x = torch.where(keep, x, 0)
    elif pattern == "groups":  # whole groups dropped; rows at the group edges kept
        keep = torch.zeros(k, dtype=torch.bool)
        keep[[i for i in (0, 31, 32, 33, 63, 64, k - 1) if i < k]] = True
        keep[32:64] &= torch.rand(1, generator=g).item() < 0.5  # the second group: all or edges
        x = torch.where(keep, x, 0)
    return on_device(x.to(dtype))


def _magnitudes(fmt: str, weight: torch.Tensor) -> torch.Tensor:
    """``|w|`` per weight, ``[K, N]``, as the error bound needs it (int4: ``|d| q + |m|``)."""
    wt = weight.t().contiguous()
    layout = pg.packed_layout(fmt, *wt.shape)
    if fmt != "int4":
        buf = packed_linear_op.prepare_packed_weight([weight], fmt)
        return dequantize(layout, buf).abs()
    codes, d, m = quantize(wt, fmt)
    return dequantize(layout, pack(layout, codes, d.abs(), m.abs()))


def _assert_matches(y, x, fmt, n, packed, bias, magnitudes):
    ref = cpu_reference(pg.packed_gemv_reference, x, fmt, n, packed, bias)
    assert y.dtype == ref.dtype and y.shape == ref.shape
    y, ref = y.cpu().double(), ref.cpu().double()
    nan_y, nan_r = torch.isnan(y), torch.isnan(ref)
    assert torch.equal(nan_y, nan_r), f"NaN positions differ:\n{y}\n{ref}"
    inf = torch.isinf(ref)
    assert torch.equal(y[inf], ref[inf]), "infinities differ"
    finite = ~(nan_r | inf)
    scale = x.cpu().double().abs().nan_to_num(posinf=0.0) @ magnitudes.double()
    if bias is not None:
        scale = scale + bias.cpu().double().abs()
    k = x.shape[-1]
    bound = 2 * (k + 2) * U32 * scale + ulp(x.dtype) * ref.abs() + 1e-30
    err = (y - ref).abs()
    bad = finite & (err > bound)
    assert not bad.any(), (f"{x.dtype}: max error {err[bad].max().item()} over the bound, "
                           f"first at {bad.nonzero()[0].tolist()}")


@formats
@settings(max_examples=12, deadline=None)
@given(
    dtype=st.sampled_from(DTYPES),
    k=st.sampled_from(GROUP_WIDTHS),
    n=st.sampled_from([1, 5, 33, "panel+3"]),
    tokens=st.integers(1, MAX_TOKENS),
    pattern=st.sampled_from(["topk", "union", "groups", "zero", "dense"]),
    weights=st.sampled_from(["randn", "constant-groups"]),
    with_bias=st.booleans(),
    tiling=st.sampled_from(range(len(TILINGS))),
    seed=st.integers(0, 2**16),
)
def test_packed_gemv_matches_reference(fmt, dtype, k, n, tokens, pattern, weights, with_bias,
                                       tiling, seed):
    n = _panel_cols(fmt) + 3 if n == "panel+3" else n
    g = torch.Generator().manual_seed(seed)
    x = _activations(tokens, k, dtype, pattern, g)
    weight = _weight(n, k, g, weights)
    packed = pg.prepare_packed_weight([on_device(weight)], fmt)
    bias = on_device(torch.randn(n, generator=g).to(dtype)) if with_bias else None
    y = pg.packed_gemv(x, fmt, n, packed, bias, **TILINGS[tiling])
    _assert_matches(y, x, fmt, n, packed, bias, _magnitudes(fmt, weight))


# inf - inf in the interpreter's numpy sums: deliberate inputs
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@formats
@settings(max_examples=8, deadline=None)
@given(data=st.data(), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       k=st.sampled_from([7, 33, 40]), n=st.sampled_from([3, 17]), seed=st.integers(0, 2**16))
def test_selection_then_packed_gemv(fmt, data, dtype, k, n, seed):
    """The decode path: the Triton top-K kernel, then the packed GEMV, against the reference
    top-K (ties to the lower index, NaN kept) and the dequantised product. Ties, NaN, +-inf
    and -0.0 in the activations."""
    x = data.draw(rows_of(dtype, k, special=True, max_rows=MAX_TOKENS))
    keep = data.draw(st.integers(1, k))
    g = torch.Generator().manual_seed(seed)
    weight = _weight(n, k, g, "randn")
    packed = pg.prepare_packed_weight([on_device(weight)], fmt)
    y = pg.packed_gemv(row_sparsify.topk_sparsify(x, keep), fmt, n, packed, None)
    expected_input = cpu_reference(reference.topk_sparsify, x, keep)
    _assert_matches(y, expected_input, fmt, n, packed, None, _magnitudes(fmt, weight))


def test_nan_activation_propagates_to_its_row_only():
    x = torch.zeros(2, 40)
    x[0, 3] = float("nan")
    x[1, 35] = 1.0
    for fmt in FORMATS:
        packed = pg.prepare_packed_weight([on_device(torch.randn(9, 40))], fmt)
        y = pg.packed_gemv(on_device(x), fmt, 9, packed, splits=2, block_k=4)
        assert y[0].isnan().all() and not y[1].isnan().any(), fmt


def test_dropped_groups_read_no_codes_and_no_scales():
    """Poisoning what a dropped feature owns changes nothing: its codes (every format) and,
    for int4, the scales and minima of a group whose rows are all dropped (NaN there would
    reach the output if they were read). Rows 32 / 63 / 64 / 69 sit at group edges (the
    last group, 64..69, is short); group 0 (rows 0..31) is dropped whole."""
    k, n = 70, 40
    x = torch.zeros(3, k)
    x[0, 32], x[1, 63], x[2, 69], x[0, 64] = 1.5, -2.0, 0.75, 3.0
    live = (x != 0).any(0)
    x = on_device(x)
    for fmt in FORMATS:
        packed = pg.prepare_packed_weight([on_device(torch.randn(n, k))], fmt)
        layout = pg.packed_layout(fmt, k, n)
        poisoned = packed.cpu().clone()
        # [panels, K, bytes of a panel row]
        codes = poisoned[:k * layout.row_bytes].view(-1, k, PANEL_ROW_BYTES)
        codes[:, ~live] = 0x5A
        if fmt == "int4":
            for offset in (layout.scale_offset, layout.min_offset):
                values = poisoned[offset:offset + layout.scale_bytes].view(torch.float16)
                values.view(layout.groups, -1)[0] = float("nan")
        for tiling in TILINGS:
            y = pg.packed_gemv(x, fmt, n, packed, **tiling)
            assert torch.equal(pg.packed_gemv(x, fmt, n, on_device(poisoned), **tiling), y)
            assert not y.isnan().any()


@formats
@pytest.mark.parametrize("leading", [(11,), (2, 3), (0,)], ids=["11rows", "3d", "empty"])
def test_leading_dims_and_token_groups(fmt, leading):
    """More than MAX_TOKENS rows run in groups; any leading shape is flattened."""
    g = torch.Generator().manual_seed(1)
    x = on_device(reference.topk_sparsify(torch.randn(*leading, 40, generator=g), 10))
    weight = torch.randn(21, 40, generator=g)
    packed = pg.prepare_packed_weight([on_device(weight)], fmt)
    bias = on_device(torch.randn(21, generator=g))
    y = pg.packed_gemv(x, fmt, 21, packed, bias)
    assert y.shape == (*leading, 21)
    _assert_matches(y.reshape(-1, 21), x.reshape(-1, 40), fmt, 21, packed, bias,
                    _magnitudes(fmt, weight))


@formats
def test_all_zero_input_gives_bias_exactly(fmt):
    packed = pg.prepare_packed_weight([on_device(torch.randn(33, 17))], fmt)
    bias = on_device(torch.randn(33).bfloat16())
    x = on_device(torch.zeros(3, 17, dtype=torch.bfloat16))
    for tiling in TILINGS[:2]:
        assert torch.equal(pg.packed_gemv(x, fmt, 33, packed, bias, **tiling), bias.expand(3, 33))
        assert torch.equal(pg.packed_gemv(x, fmt, 33, packed, None, **tiling),
                           torch.zeros_like(bias).expand(3, 33))


def test_packing_is_the_cpu_kernels_and_groups_pack_side_by_side():
    """One layout for both kernels; a group's ternary weights keep one scale each."""
    g = torch.Generator().manual_seed(3)
    weights = [torch.randn(5, 40, generator=g), 3 * torch.randn(7, 40, generator=g)]
    for fmt in FORMATS:
        packed = pg.prepare_packed_weight(weights, fmt)
        assert torch.equal(packed, packed_linear_op.prepare_packed_weight(weights, fmt))
    x = on_device(reference.topk_sparsify(torch.randn(2, 40, generator=g), 20))
    packed = pg.prepare_packed_weight([on_device(w) for w in weights], "ternary")
    y = pg.packed_gemv(x, "ternary", 12, packed)
    one_by_one = torch.cat([pg.packed_gemv(x, "ternary", w.shape[0], pg.prepare_packed_weight(
        [on_device(w)], "ternary")) for w in weights], dim=-1)
    torch.testing.assert_close(y, one_by_one, rtol=1e-6, atol=1e-6)


def test_config_for_llama_shapes():
    """Heuristic tilings: K covered, no empty split, accumulators within the dense GEMV's
    budget, int4 tiles inside a group, enough programs for an H100."""
    for fmt in FORMATS:
        per = FORMATS[fmt] // 8
        for k, n in ((4096, 4096), (4096, 11008), (11008, 4096)):
            for tokens in range(1, MAX_TOKENS + 1):
                cfg = pg.packed_gemv_config(fmt, k, n, tokens, num_sms=132)
                assert cfg.k_split % cfg.block_k == 0
                assert cfg.splits * cfg.k_split >= k > (cfg.splits - 1) * cfg.k_split
                tb = 1 << (tokens - 1).bit_length()
                assert tb * cfg.block_k * cfg.block_bytes * per <= ACC_ELEMENTS
                assert cfg.block_k >= pg.MIN_BLOCK_K
                assert fmt != "int4" or 32 % cfg.block_k == 0
                layout = pg.packed_layout(fmt, k, n)
                assert cfg.programs * cfg.block_bytes >= layout.used_row_bytes
                assert cfg.programs * cfg.splits >= 132, (fmt, k, n, tokens, cfg)


def test_rejects_bad_arguments():
    x = on_device(torch.randn(2, 40))
    packed = pg.prepare_packed_weight([on_device(torch.randn(6, 40))], "int4")
    with pytest.raises(ValueError, match="format 'int2'"):
        pg.packed_gemv(x, "int2", 6, packed)
    with pytest.raises(ValueError, match=r"uint8 buffer .* format 'int8'"):
        pg.packed_gemv(x, "int8", 6, packed)
    past = _panel_cols("int4") + 1  # needs a second panel the buffer does not have
    with pytest.raises(ValueError, match=rf"out_features={past}"):
        pg.packed_gemv(x, "int4", past, packed)
    with pytest.raises(ValueError, match=r"bias must have shape \(6,\)"):
        pg.packed_gemv(x, "int4", 6, packed, on_device(torch.randn(5)))
    with pytest.raises(TypeError, match="bias must have x's dtype"):
        pg.packed_gemv(x, "int4", 6, packed, on_device(torch.randn(6).half()))
    with pytest.raises(TypeError, match="float64"):
        pg.packed_gemv(x.double(), "int4", 6, packed)
    with pytest.raises(ValueError, match="int4: at most 32"):
        pg.packed_gemv(x, "int4", 6, packed, block_k=64)
    with pytest.raises(ValueError, match="block_bytes must be a power of two"):
        pg.packed_gemv(x, "int4", 6, packed, block_bytes=12)


def test_op_checks_traces_and_exports():
    """``qsparse_triton::packed_gemv``: opcheck (schema, fake, dispatch), ``torch.compile``
    (static and dynamic token counts) and ``torch.export``."""
    ops = torch.ops.qsparse_triton
    g = torch.Generator().manual_seed(5)
    packed = pg.prepare_packed_weight([on_device(torch.randn(12, 40, generator=g))], "int4")
    bias = on_device(torch.randn(12, generator=g).bfloat16())
    x = on_device(reference.topk_sparsify(torch.randn(3, 40, generator=g), 15).bfloat16())
    opcheck(ops.packed_gemv, (x, "int4", 12, packed, bias))
    opcheck(ops.packed_gemv, (x[:1].float(), "int4", 12, packed, None))

    class Step(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("packed", packed)
            self.register_buffer("bias", bias)

        def forward(self, h):
            h = torch.ops.qsparse_triton.topk_sparsify(h, 15, False, False)
            return ops.packed_gemv(h, "int4", 12, self.packed, self.bias) * 2

    step = Step()
    eager = step(x)
    assert torch.equal(eager, 2 * pg.packed_gemv(x, "int4", 12, packed, bias))
    assert torch.equal(torch.compile(step, backend="aot_eager", fullgraph=True)(x), eager)
    dynamic = torch.compile(step, backend="aot_eager", fullgraph=True, dynamic=True)
    for rows in (1, 2):
        assert torch.equal(dynamic(x[:rows]), step(x[:rows]))
    exported = torch.export.export(step, (x,))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert "qsparse_triton.packed_gemv.default" in targets
    assert torch.equal(exported.module()(x), eager)
