"""``qsparse::cpu_packed_linear`` (selection + sparse GEMV over packed int8 / int4 / ternary
weights) against its reference, and the packed layout against the formats' fake quantizers.

Three links, each checked on its own:

1. the packed buffer holds exactly the values of the weight fake quantizers (the ops the graph
   rewrite inserts), which equal the eager oracle's formats (:mod:`qsparse_compile.reference`);
2. the kernel's kept set equals the reference's (an identity-like weight shows it);
3. the kernel's output equals the product of the sparsified (and int8-quantized) activation
   with the dequantised weights, within the error of an fp32 sum in another order.

Widths are small and odd (``D`` not a multiple of the int4 group of 32, so the last group is
short; ``N`` not a multiple of the 32-column padding), so every edge of the layout runs.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import kernel_selections

from qsparse_compile import reference
from qsparse_compile.codegen.cpu.packed_linear_op import (
    cpu_packed_linear,
    packed_layout,
    packed_linear,
    packed_linear_reference,
    prepare_packed_weight,
)
from qsparse_compile.codegen.cpu.packed_weights import FORMATS, PackedLayout, dequantize
from qsparse_compile.codegen.cpu.topk_linear_op import MAX_ROWS
from qsparse_compile.ops.quant import (
    int4_weight_fake_quant,
    int8_weight_fake_quant,
    ternary_fake_quant,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FAKE_QUANT = {
    "int8": lambda w: int8_weight_fake_quant(w, -1),
    "int4": lambda w: int4_weight_fake_quant(w, -1),
    "ternary": ternary_fake_quant,
}
WIDTHS = [1, 7, 31, 32, 33, 70, 96]


def _weights(outs: list[int], D: int, g: torch.Generator, pattern: str) -> list[torch.Tensor]:
    ws = [torch.randn(n, D, generator=g) for n in outs]
    if pattern == "constant-groups":  # max == min inside groups: d == 0
        ws = [torch.where(torch.rand(n, D, generator=g) < 0.5, 0.25, w) for n, w in
              zip(outs, ws, strict=True)]
        ws[0][:, :min(D, 32)] = 0.5
    elif pattern == "integers":  # values the formats hit exactly, ties in the rounding
        ws = [torch.randint(-3, 4, (n, D), generator=g).float() for n in outs]
    return ws


def _activations(rows: int, D: int, dtype: torch.dtype, pattern: str,
                 g: torch.Generator) -> torch.Tensor:
    if pattern == "ties":
        values = torch.tensor([0.0, 0.5, -0.5, 1.0, -1.0, 2.0])
        return values[torch.randint(0, len(values), (rows, D), generator=g)].to(dtype)
    x = torch.randn(rows, D, generator=g)
    if pattern == "nan":
        x[0, torch.randint(0, D, (1,), generator=g)] = float("nan")
    if pattern == "group-edges":  # only the features at group boundaries are large
        big = torch.zeros(D, dtype=torch.bool)
        for i in range(0, D, 32):
            big[max(i - 1, 0)] = big[i] = True
        x = torch.where(big, 10.0 * x.sign(), 0.01 * x)
    return x.to(dtype)


@settings(max_examples=40, deadline=None)
@given(fmt=st.sampled_from(list(FORMATS)), D=st.sampled_from(WIDTHS),
       outs=st.lists(st.integers(1, 40), min_size=1, max_size=3),
       pattern=st.sampled_from(["randn", "constant-groups", "integers"]),
       seed=st.integers(0, 2**16))
def test_packed_values_equal_the_fake_quantizers(fmt, D, outs, pattern, seed):
    weights = _weights(outs, D, torch.Generator().manual_seed(seed), pattern)
    packed = prepare_packed_weight(weights, fmt)
    layout = packed_layout(fmt, D, sum(outs))
    assert packed.dtype == torch.uint8 and packed.numel() == layout.nbytes
    expected = torch.cat([FAKE_QUANT[fmt](w).t() for w in weights], dim=1)
    assert torch.equal(dequantize(layout, packed), expected)


@settings(max_examples=40, deadline=None)
@given(fmt=st.sampled_from(["int8", "int4"]), D=st.sampled_from(WIDTHS),
       out=st.integers(1, 40), pattern=st.sampled_from(["randn", "constant-groups",
                                                        "integers"]),
       dtype=st.sampled_from(list(DTYPES)), seed=st.integers(0, 2**16))
def test_weight_fake_quantizers_equal_the_reference_formats(fmt, D, out, pattern, dtype, seed):
    (w,) = _weights([out], D, torch.Generator().manual_seed(seed), pattern)
    w = w.to(DTYPES[dtype])
    assert torch.equal(FAKE_QUANT[fmt](w), reference.WEIGHT_FORMATS[fmt](w))
    # in_dim=-2 reads a [in, out] weight: the same values, transposed
    op = int8_weight_fake_quant if fmt == "int8" else int4_weight_fake_quant
    assert torch.equal(op(w.t().contiguous(), -2), FAKE_QUANT[fmt](w).t())


def test_int4_represents_q4_1_weights_without_loss():
    """Weights that are already ``d * q + m`` with fp16 ``d``, ``m`` (GGUF Q4_1) come back
    unchanged: that is what loading a Q4_1 file and choosing ``weights="int4"`` does."""
    g = torch.Generator().manual_seed(0)
    groups, out = 4, 24
    d = (torch.rand(out, groups, 1, generator=g) * 0.01 + 1e-3).half().float()
    m = (-torch.rand(out, groups, 1, generator=g) * 0.05).half().float()
    q = torch.randint(0, 16, (out, groups, 32), generator=g).float()
    q[..., 0], q[..., 1] = 0, 15  # the Q4_1 quantizer maps a group's min to 0 and max to 15
    w = (d * q + m).reshape(out, groups * 32)
    assert torch.equal(int4_weight_fake_quant(w, -1), w)


def _term_magnitudes(layout, packed: torch.Tensor) -> torch.Tensor:
    """``[D, N]`` magnitudes of the terms the kernel sums for each weight: ``|w|``, but for
    int4 ``|d q| + |m|``, since it sums ``x d q`` and ``x m`` apart (``d sum x q + m sum x``)
    and its rounding error is relative to both, however much they cancel."""
    w = dequantize(layout, packed)
    if layout.format != "int4":
        return w.abs()
    minima = packed.clone()
    minima[:layout.scale_offset] = 0  # codes 0: the value of every entry is its group's m
    m_w = dequantize(layout, minima)
    return (w - m_w).abs() + m_w.abs()


def _check_output(y, ref, xs, w, dtype):
    """Within the error of fp32 sums in another order (and one bf16 rounding)."""
    scale = (xs.float().abs() @ w.abs()) + 1e-30
    err = (y.float() - ref.float()).abs()
    rtol = 2.0**-7 if dtype == torch.bfloat16 else 0.0
    finite = torch.isfinite(ref.float())
    assert torch.equal(finite, torch.isfinite(y.float())), "NaN/inf where the reference has none"
    assert bool((err[finite] <= 3e-5 * scale[finite] + rtol * ref.float().abs()[finite]).all()), \
        f"max error {err[finite].max().item()}"


@settings(max_examples=80, deadline=None)
@given(data=st.data(), fmt=st.sampled_from(list(FORMATS)), dtype=st.sampled_from(list(DTYPES)),
       D=st.sampled_from(WIDTHS), N=st.integers(1, 70), rows=st.integers(1, MAX_ROWS),
       pattern=st.sampled_from(["randn", "ties", "nan", "group-edges"]),
       rescale=st.booleans(), quant=st.booleans(), bias=st.booleans(),
       seed=st.integers(0, 2**16))
def test_kernel_matches_reference(data, fmt, dtype, D, N, rows, pattern, rescale, quant, bias,
                                  seed):
    dt = DTYPES[dtype]
    g = torch.Generator().manual_seed(seed)
    k, n, m = data.draw(kernel_selections(D))
    weights = _weights([N], D, g, "randn")
    packed = prepare_packed_weight(weights, fmt)
    x = _activations(rows, D, dt, pattern, g)
    b = torch.randn(N, generator=g).to(dt) if bias else None
    y = cpu_packed_linear(x, k, n, m, rescale, quant, fmt, N, packed, b, MAX_ROWS)
    ref = packed_linear_reference(x, k, n, m, rescale, quant, fmt, N, packed, b)
    assert y.shape == (rows, N) and y.dtype == dt
    mode = "l2" if rescale else "none"
    xs = reference.topk_sparsify(x, k, mode) if m == 0 else reference.block_sparsify(
        x, n, m, mode)
    _check_output(y, ref, xs, _term_magnitudes(packed_layout(fmt, D, N), packed), dt)


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_kept_set_matches_reference(fmt, dtype):
    """With one-hot columns the output is the sparsified activation times one column scale:
    the kept set must be exactly the reference's, the values equal up to the rounding of
    where the scale is applied."""
    dt = DTYPES[dtype]
    D = 70
    packed = prepare_packed_weight([torch.eye(D)], fmt)
    x = _activations(3, D, dt, "ties", torch.Generator().manual_seed(1))
    for k, n, m in [(35, 0, 0), (1, 0, 0), (D, 0, 0), (0, 1, 2), (0, 3, 5)]:
        for quant in (False, True):
            y = cpu_packed_linear(x, k, n, m, False, quant, fmt, D, packed, None, MAX_ROWS)
            ref = packed_linear_reference(x, k, n, m, False, quant, fmt, D, packed, None)
            assert torch.equal(y != 0, ref != 0), (k, n, m, quant)
            torch.testing.assert_close(y, ref, rtol=2**-7 if dt == torch.bfloat16 else 1e-6,
                                       atol=0)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_two_thread_split_matches_reference(fmt):
    """A shape large enough for the kernel to split the rows (int4: the groups) over two
    threads; the fixed summation order makes repeated calls identical."""
    g = torch.Generator().manual_seed(3)
    D, N = 1024, 768
    packed = prepare_packed_weight([torch.randn(N, D, generator=g)], fmt)
    x = torch.randn(2, D, generator=g)
    y = packed_linear(x, D // 2, 0, 0, False, False, fmt, N, packed, None, num_threads=2)
    ref = packed_linear_reference(x, D // 2, 0, 0, False, False, fmt, N, packed, None)
    xs = reference.topk_sparsify(x, D // 2)
    _check_output(y, ref, xs, _term_magnitudes(packed_layout(fmt, D, N), packed), torch.float32)
    again = packed_linear(x, D // 2, 0, 0, False, False, fmt, N, packed, None, num_threads=2)
    assert torch.equal(y, again)


def test_many_rows_take_the_fallback():
    g = torch.Generator().manual_seed(4)
    packed = prepare_packed_weight([torch.randn(20, 40, generator=g)], "int4")
    x = torch.randn(3, 5, 40, generator=g)  # 15 rows > MAX_ROWS
    y = cpu_packed_linear(x, 20, 0, 0, False, False, "int4", 20, packed, None, MAX_ROWS)
    ref = packed_linear_reference(x, 20, 0, 0, False, False, "int4", 20, packed, None)
    assert y.shape == (3, 5, 20)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_opcheck():
    g = torch.Generator().manual_seed(5)
    packed = prepare_packed_weight([torch.randn(24, 40, generator=g)], "int8")
    x = torch.randn(2, 40, generator=g)
    torch.library.opcheck(cpu_packed_linear.default,
                          (x, 20, 0, 0, False, False, "int8", 24, packed, None, MAX_ROWS),
                          test_utils=("test_schema", "test_faketensor"))


def test_bad_operands_name_what_was_given():
    packed = prepare_packed_weight([torch.randn(24, 40)], "int4")
    x = torch.randn(1, 40)
    with pytest.raises(ValueError, match=r"packed must be the uint8 buffer.*'int8'"):
        packed_linear(x, 20, 0, 0, False, False, "int8", 24, packed)
    with pytest.raises(ValueError, match="format 'int2'"):
        packed_linear(x, 20, 0, 0, False, False, "int2", 24, packed)
    with pytest.raises(ValueError, match=r"k must be in \[1, 40\]"):
        packed_linear(x, 41, 0, 0, False, False, "int4", 24, packed)
    with pytest.raises(ValueError, match="bias must have shape"):
        packed_linear(x, 20, 0, 0, False, False, "int4", 24, packed, torch.zeros(5))
    with pytest.raises(ValueError, match="sharing in_features"):
        prepare_packed_weight([torch.randn(3, 4), torch.randn(3, 5)], "int8")
    with pytest.raises(ValueError, match="is not one of"):
        PackedLayout("int3", 4, 4)
    with pytest.raises(RuntimeError, match="inference-only"):
        cpu_packed_linear(x.requires_grad_(), 20, 0, 0, False, False, "int4", 24, packed, None,
                          MAX_ROWS)


def _avx512_host() -> bool:
    from qsparse_compile.codegen.cpu.compiler import host_fingerprint

    return "avx512f" in host_fingerprint().split()


@pytest.mark.skipif(not _avx512_host(), reason="the host has no AVX-512")
@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 3])
def test_avx512_path_equals_the_avx2_path_bitwise(fmt, rows):
    """The 16-column AVX-512 steps fold the same products in the same order as the 8-column
    AVX2 steps: one source built with and without AVX-512 gives the same bits, on shapes with
    a narrow last step (int4 panels of 1024 columns and a 16-column tail; group remainders
    of every size)."""
    import ctypes

    from qsparse_compile.codegen.cpu import packed_linear_op
    from qsparse_compile.codegen.cpu.compiler import BASE_FLAGS, OPENMP_FLAGS, build_library
    from qsparse_compile.codegen.cpu.packed_linear_template import PackedLinearSpec, render

    spec = PackedLinearSpec(torch.float32, fmt, rows)
    source = render(spec)
    kernels = []
    for extra in ((), ("-mno-avx512f",)):
        lib = ctypes.CDLL(str(build_library(spec.name, source, BASE_FLAGS + OPENMP_FLAGS
                                            + extra)))
        fn = getattr(lib, spec.name)
        fn.argtypes, fn.restype = packed_linear_op._ARGTYPES, ctypes.c_int64
        kernels.append(fn)
    g = torch.Generator().manual_seed(7)
    for D, N, k in [(96, 1040, 29), (200, 1072, 101), (64, 24, 64)]:
        layout = packed_layout(fmt, D, N)
        packed = prepare_packed_weight([torch.randn(N, D, generator=g)], fmt)
        x = torch.randn(rows, D, generator=g)
        ref = packed_linear_reference(x, k, 0, 0, False, False, fmt, N, packed, None)
        for threads in (1, 2):  # (the threads' partial sums are added in another order)
            outs = []
            for fn in kernels:
                y = torch.empty(rows, N)
                assert fn(x.data_ptr(), x.stride(0), 1, D, k, 0, 0, 0, 0, packed.data_ptr(),
                          layout.panel_bytes, layout.scale_offset, layout.min_offset, N,
                          layout.padded_out, None, y.data_ptr(), N, threads) >= 0
                outs.append(y)
            assert torch.equal(outs[0], outs[1]), (D, N, k, threads)
            torch.testing.assert_close(outs[0], ref, rtol=1e-4, atol=1e-4)


def _vnni_host() -> bool:
    from qsparse_compile.codegen.cpu.compiler import host_fingerprint

    flags = host_fingerprint().split()
    return "avx512_vnni" in flags and "avx512vbmi" in flags


@pytest.mark.skipif(not _vnni_host(), reason="the host has no AVX-512 VNNI / VBMI")
@settings(max_examples=25, deadline=None)
@given(data=st.data(), D=st.sampled_from([31, 32, 33, 96, 200, 577]),
       N=st.sampled_from([16, 48, 70, 1040, 1100, 2100]), rows=st.integers(1, 5),
       pattern=st.sampled_from(["randn", "ties", "nan", "inf", "group-edges"]),
       rescale=st.booleans(), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_integer_path_equals_the_float_path(data, D, N, rows, pattern, rescale, bias, seed):
    """int4 weights with int8 activations (``quant``): up to 4 fp32 rows with finite scales
    take integer dot products (AVX-512 VNNI), everything else the float path. One source built
    with and without VNNI: both within an fp32 reordering of the reference, on shapes with
    several 1024-column panels, short last groups and panels, rows skipped at group edges,
    ties, NaN and infinite rows (the float path's rounding, as the reference's)."""
    g = torch.Generator().manual_seed(seed)
    k, n, m = data.draw(kernel_selections(D))
    layout = packed_layout("int4", D, N)
    packed = prepare_packed_weight([torch.randn(N, D, generator=g)], "int4")
    x = _activations(rows, D, torch.float32, "randn" if pattern == "inf" else pattern, g)
    if pattern == "inf":
        x[0, 0] = float("inf")
    b = torch.randn(N, generator=g) if bias else None
    ref = packed_linear_reference(x, k, n, m, rescale, True, "int4", N, packed, b)
    mode = "l2" if rescale else "none"
    xs = reference.topk_sparsify(x, k, mode) if m == 0 else reference.block_sparsify(
        x, n, m, mode)
    bound = _term_magnitudes(layout, packed)
    for fn in _vnni_and_float_builds(rows):
        for threads in (1, 2):
            y = _call(fn, x, k, n, m, rescale, True, layout, packed, b, threads)
            _check_output(y, ref, reference.int8_fake_quant(xs), bound, torch.float32)


def _vnni_and_float_builds(rows: int) -> list:
    """The fp32 int4 kernel for ``rows`` built as the host allows and without VNNI."""
    import ctypes

    from qsparse_compile.codegen.cpu import packed_linear_op
    from qsparse_compile.codegen.cpu.compiler import BASE_FLAGS, OPENMP_FLAGS, build_library
    from qsparse_compile.codegen.cpu.packed_linear_template import PackedLinearSpec, render

    spec = PackedLinearSpec(torch.float32, "int4", rows)
    kernels = []
    for extra in ((), ("-mno-avx512vnni",)):
        lib = ctypes.CDLL(str(build_library(spec.name, render(spec), BASE_FLAGS + OPENMP_FLAGS
                                            + extra)))
        fn = getattr(lib, spec.name)
        fn.argtypes, fn.restype = packed_linear_op._ARGTYPES, ctypes.c_int64
        kernels.append(fn)
    return kernels


def _call(fn, x, k, n, m, rescale, quant, layout, packed, b, threads) -> torch.Tensor:
    rows, N = x.shape[0], layout.out_features
    y = torch.empty(rows, N)
    assert fn(x.data_ptr(), x.stride(0), 1, x.shape[1], k, n, m, rescale, quant,
              packed.data_ptr(), layout.panel_bytes, layout.scale_offset, layout.min_offset, N,
              layout.padded_out, None if b is None else b.data_ptr(), y.data_ptr(), N,
              threads) >= 0
    return y


@pytest.mark.skipif(not _vnni_host(), reason="the host has no AVX-512 VNNI / VBMI")
def test_integer_path_runs_where_it_should():
    """Up to 4 rows with quant, the VNNI build sums otherwise than the float path (integer
    products: other bits); without quant, or with 5 rows, both builds run the float path and
    agree bit for bit."""
    g = torch.Generator().manual_seed(11)
    D, N = 200, 1100
    layout = packed_layout("int4", D, N)
    packed = prepare_packed_weight([torch.randn(N, D, generator=g)], "int4")
    for rows, quant, integer in [(1, True, True), (4, True, True), (4, False, False),
                                 (5, True, False)]:
        x = torch.randn(rows, D, generator=g)
        vnni, plain = (_call(fn, x, 100, 0, 0, False, quant, layout, packed, None, 1)
                       for fn in _vnni_and_float_builds(rows))
        assert torch.equal(vnni, plain) != integer, (rows, quant)
