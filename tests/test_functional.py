"""``qsparse_compile.sparsify`` and ``sparse_projection``: the ops composed as a config says.

These are what the compiler inserts, so they must agree with the reference's
``sparsify_input`` / ``projection`` bit for bit, forward and backward, for every combination
of method, rescale, quantization and gradient mode; and they must reject bad options with the
same messages as :class:`QSparseConfig`.
"""

from __future__ import annotations

import pytest
import torch
from assertions import assert_identical, raises_naming
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import DTYPES, activations, block_patterns, dtype_id, sparsities, upstream_like

from qsparse_compile import QSparseConfig, reference, sparse_projection, sparsify, topk_count

dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
methods = pytest.mark.parametrize("method", ["topk", "block"])


def draw_options(data, method: str) -> dict:
    """Options for ``sparsify``: every rescale/quant/ste combination gets drawn."""
    options = {
        "method": method,
        "rescale": data.draw(st.sampled_from(["none", "l2"]), label="rescale"),
        "quant": data.draw(st.sampled_from([None, "int8", "bitnet"]), label="quant"),
        "ste": data.draw(st.booleans(), label="ste"),
    }
    if method == "block":
        options["block"] = data.draw(block_patterns(), label="block")
    else:
        options["sparsity"] = data.draw(sparsities(), label="sparsity")
    return options


def draw_input(data, dtype: torch.dtype, options: dict, *, special: bool = True):
    m = options["block"][1] if options["method"] == "block" else 1
    return data.draw(activations(dtype, special=special, multiple_of=m), label="x")


# --- sparsify -----------------------------------------------------------------------------------


@dtypes
@methods
@settings(max_examples=40)
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_sparsify_matches_reference(method, dtype, data, seed):
    """Forward and input gradient, bit for bit, against ``reference.sparsify_input``."""
    options = draw_options(data, method)
    x = draw_input(data, dtype, options)
    config = QSparseConfig.from_options(options)
    grad = upstream_like(x, seed)

    x_fn = x.clone().requires_grad_()
    x_ref = x.clone().requires_grad_()
    out = sparsify(x_fn, **options)
    out_ref = reference.sparsify_input(x_ref, config.plan_for(""), config)
    assert_identical(out, out_ref)
    if out.requires_grad:  # sparsity 0 returns the input itself
        out.backward(grad)
        out_ref.backward(grad)
        assert_identical(x_fn.grad, x_ref.grad)


@dtypes
@settings(max_examples=30)
@given(data=st.data())
def test_sparsify_default_keeps_half(dtype, data):
    """Without a sparsity, top-K keeps ``topk_count(D, 0.5)`` entries per row, unscaled."""
    x = data.draw(activations(dtype))
    mask = reference.topk_mask(x, topk_count(x.shape[-1], 0.5))
    assert_identical(sparsify(x), torch.where(mask, x, 0))


@dtypes
def test_zero_sparsity_leaves_input_dense(dtype):
    x = torch.randn(3, 7).to(dtype)
    assert sparsify(x, 0.0) is x
    assert sparsify(x, 0.0, rescale="l2") is x


@dtypes
def test_zero_sparsity_still_quantizes(dtype):
    """Quantization does not depend on the sparsity: at 0 the input is quantized, not masked."""
    x = torch.randn(3, 7).to(dtype)
    for quant in ("int8", "bitnet"):
        assert_identical(sparsify(x, 0.0, rescale="l2", quant=quant), reference.int8_fake_quant(x))


@dtypes
def test_block_2_of_4(dtype):
    x = torch.randn(5, 16).to(dtype)
    out = sparsify(x, method="block", block=(2, 4))
    assert bool(((out != 0).reshape(5, 4, 4).sum(-1) == 2).all())


def test_bitnet_quantizes_activations_like_int8():
    """``quant="bitnet"`` is int8 on the activations (ternary applies to weights only)."""
    x = torch.randn(4, 12)
    assert_identical(sparsify(x, 0.5, quant="bitnet"), sparsify(x, 0.5, quant="int8"))


# --- sparse_projection ------------------------------------------------------------------------


@dtypes
@methods
@settings(max_examples=20)
@given(
    data=st.data(),
    out_features=st.integers(1, 6),
    bias=st.booleans(),
    path=st.sampled_from(["model.layers.0.mlp.down_proj", "lm_head"]),
    seed=st.integers(0, 2**16),
)
def test_sparse_projection_matches_reference(method, dtype, data, out_features, bias, path, seed):
    """Output and the gradients of x, W and b, bit for bit, against ``reference.projection``.

    ``lm_head`` is excluded by default, so both dense and sparse plans are exercised.
    """
    options = draw_options(data, method)
    x = draw_input(data, dtype, options, special=False)
    config = QSparseConfig.from_options(options)
    plan = config.plan_for(path)
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, x.shape[-1], generator=gen).to(dtype)
    b = torch.randn(out_features, generator=gen).to(dtype) if bias else None
    grad = upstream_like(torch.empty(*x.shape[:-1], out_features, dtype=dtype), seed + 1)

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in (x, w) + ((b,) if bias else ())]
        y = fn(leaves[0], leaves[1], leaves[2] if bias else None, plan, config)
        y.backward(grad)
        return y, [t.grad for t in leaves]

    y, grads = run(sparse_projection)
    y_ref, grads_ref = run(reference.projection)
    assert_identical(y, y_ref)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert_identical(g, g_ref)


# --- invalid options through sparsify ------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "options", "exc", "parts"),
    [
        pytest.param((-0.1,), {}, ValueError, ("'sparsity'", "-0.1", "[0, 1)"), id="s=-0.1"),
        pytest.param((1.0,), {}, ValueError, ("'sparsity'", "1.0", "[0, 1)"), id="s=1.0"),
        pytest.param((1.5,), {}, ValueError, ("'sparsity'", "1.5", "[0, 1)"), id="s=1.5"),
        pytest.param(
            (), {"method": "block", "block": (5, 4)}, ValueError,
            ("'block'", "(5, 4)", "1 <= n <= m"), id="block=5of4",
        ),
        pytest.param(
            (), {"method": "block", "block": (0, 4)}, ValueError,
            ("'block'", "(0, 4)", "1 <= n <= m"), id="block=0of4",
        ),
        pytest.param(
            (0.5,), {"method": "topk_"}, ValueError, ("'method'", "'topk_'", "'topk', 'block'"),
            id="method=topk_",
        ),
        pytest.param(
            (0.5,), {"method": "blok"}, ValueError, ("'method'", "'blok'", "'topk', 'block'"),
            id="method=blok",
        ),
        pytest.param(
            (0.5,), {"sparsty": 0.5}, ValueError, ("unknown option", "'sparsty'", "allowed"),
            id="unknown-option",
        ),
        pytest.param(
            (0.5,), {"rescale": "L2"}, ValueError, ("'rescale'", "'L2'", "'none', 'l2'"),
            id="rescale=L2",
        ),
    ],
)
def test_sparsify_rejects_bad_options(args, options, exc, parts):
    with raises_naming(exc, *parts):
        sparsify(torch.randn(2, 8), *args, **options)


@pytest.mark.parametrize("int_dtype", [torch.int64, torch.int32], ids=str)
@pytest.mark.parametrize(
    "options", [{}, {"method": "block", "block": (2, 4)}], ids=["topk", "block"]
)
def test_sparsify_rejects_integer_input(int_dtype, options):
    dtype_name = str(int_dtype).removeprefix("torch.")
    with raises_naming(TypeError, "'x'", dtype_name, "must be a floating tensor", "float32"):
        sparsify(torch.ones(2, 8, dtype=int_dtype), **options)


def test_integer_input_is_rejected_even_when_dense():
    """sparsity=0 leaves a float input as it is, but an integer input is still an error."""
    with pytest.raises(TypeError, match="must be a floating tensor.*got dtype int64"):
        sparsify(torch.arange(6), 0.0)
