"""``sparsify_graph``: op counts before and after, sharing, quantizers, plans; and random module
stacks compiled through the backend agree with the eager reference."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from op_counts import CountingBackend, op_counts
from torch import nn
from tracers import trace_dynamo

from qsparse_compile import reference
from qsparse_compile.config import ProjectionPlan, QSparseConfig, topk_count
from qsparse_compile.passes import sparsify_graph
from qsparse_compile.passes.manager import clean_up


class QKVO(nn.Module):
    """q/k/v read one tensor, o reads another; a functional projection reads a third."""

    def __init__(self, bias: bool = False):
        super().__init__()
        self.q_proj = nn.Linear(16, 16, bias=bias)
        self.k_proj = nn.Linear(16, 8, bias=bias)
        self.v_proj = nn.Linear(16, 8, bias=bias)
        self.o_proj = nn.Linear(16, 16, bias=bias)
        self.w_out = nn.Parameter(torch.randn(16, 12) / 4)  # [in, out]: x @ w_out

    def forward(self, x):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        h = torch.relu(q) + torch.cat([k, v], dim=-1)
        return torch.tanh(self.o_proj(h)) @ self.w_out


PATHS = ["q_proj", "k_proj", "v_proj", "o_proj", "w_out"]


def _rewrite(module: nn.Module, x: torch.Tensor, config: QSparseConfig):
    """(run, records, op counts before, after) of the normalised Dynamo graph of ``module``,
    rewritten; ``run()`` executes the rewritten graph on ``x``."""
    traced = trace_dynamo(module, x)
    clean_up(traced.gm)
    before = op_counts(traced.gm)
    records = sparsify_graph(traced.gm, traced.weights, config)
    clean_up(traced.gm)
    return traced.run, records, before, op_counts(traced.gm)


def _manual_reference(module: QKVO, x: torch.Tensor, config: QSparseConfig) -> torch.Tensor:
    with reference.reference_model(module, config):
        q, k, v = module.q_proj(x), module.k_proj(x), module.v_proj(x)
        h = torch.relu(q) + torch.cat([k, v], dim=-1)
        o = torch.tanh(module.o_proj(h))
    return reference.projection(o, module.w_out.t(), None, config.plan_for("w_out"), config)


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_counts_before_and_after(bias):
    torch.manual_seed(0)
    module, x = QKVO(bias), torch.randn(2, 5, 16)
    config = QSparseConfig(sparsity=0.5)
    run, records, before, after = _rewrite(module, x, config)

    assert before["mm"] + before["addmm"] == 5
    assert after["mm"] == after["addmm"] == 0
    assert after["sparse_linear"] == 5
    assert after["topk_sparsify"] == 3  # q/k/v share one; o and w_out have their own
    assert after["t"] == 1  # the [in, out] weight is passed [out, in]
    assert [r.projection.path for r in records] == PATHS
    assert [r.k for r in records] == [topk_count(16, 0.5)] * 5
    with torch.no_grad():
        torch.testing.assert_close(run(), _manual_reference(module, x, config))


def test_different_plans_do_not_share_a_sparsify():
    torch.manual_seed(0)
    module, x = QKVO(), torch.randn(6, 16)
    config = QSparseConfig(sparsity=0.5, overrides={"k_proj": 0.75})
    run, records, _, after = _rewrite(module, x, config)
    assert after["topk_sparsify"] == 4  # q/v share; k has its own k
    assert {r.projection.path: r.k for r in records}["k_proj"] == topk_count(16, 0.75)
    with torch.no_grad():
        torch.testing.assert_close(run(), _manual_reference(module, x, config))


@pytest.mark.parametrize(("quant", "int8", "ternary"), [
    ("int8", 3, 0),
    ("bitnet", 3, 5),
])
def test_quantizers_are_inserted(quant, int8, ternary):
    torch.manual_seed(0)
    module, x = QKVO(bias=True), torch.randn(4, 16)
    config = QSparseConfig(sparsity=0.4, quant=quant, rescale="l2")
    run, _, _, after = _rewrite(module, x, config)
    assert after["int8_fake_quant"] == int8 and after["ternary_fake_quant"] == ternary
    with torch.no_grad():
        torch.testing.assert_close(run(), _manual_reference(module, x, config))


@pytest.mark.parametrize("quant", ["int8", "bitnet"])
@pytest.mark.parametrize("options", [{"sparsity": 0.0}, {"sparsity": 0.5, "overrides": {"*": 0}}],
                         ids=["sparsity-0", "override-0"])
def test_quantization_without_sparsity_is_still_inserted(quant, options):
    """``quant`` is independent of the sparsity: at 0 the inputs are quantized, not masked."""
    torch.manual_seed(0)
    module, x = QKVO(bias=True), torch.randn(4, 16)
    config = QSparseConfig(quant=quant, **options)
    run, records, _, after = _rewrite(module, x, config)
    assert after["topk_sparsify"] == 0 and after["sparse_linear"] == 5
    assert after["int8_fake_quant"] == 3  # q/k/v share one quantized input
    assert after["ternary_fake_quant"] == (5 if quant == "bitnet" else 0)
    assert all(r.plan == ProjectionPlan(None, None, None, quant) for r in records)
    with torch.no_grad():
        out = run()
        torch.testing.assert_close(out, _manual_reference(module, x, config))
        assert not torch.allclose(out, module(x))  # not the unquantized model


def test_dense_plans_leave_the_graph_alone():
    torch.manual_seed(0)
    module, x = QKVO(), torch.randn(4, 16)
    config = QSparseConfig(sparsity=0.5, exclude=("*",))
    _, records, before, after = _rewrite(module, x, config)
    assert after == before
    assert len(records) == 5 and all(r.plan.dense for r in records)


def test_block_width_mismatch_warns_or_raises():
    torch.manual_seed(0)
    module, x = QKVO(), torch.randn(4, 16)
    config = QSparseConfig(method="block", block=(3, 12))  # 16 is not a multiple of 12
    with pytest.warns(UserWarning, match="16 is not a multiple of m=12.*left dense") as caught:
        _, records, _, after = _rewrite(module, x, config)
    assert [str(w.message).split("'")[1] for w in caught] == PATHS
    assert after["sparse_linear"] == 0 and all(r.plan.dense for r in records)
    strict = QSparseConfig(method="block", block=(3, 12), strict=True)
    with pytest.raises(ValueError, match="'q_proj'.*strict"):
        _rewrite(module, x, strict)


class _BroadcastBias(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 4))
        self.b = nn.Parameter(torch.randn(1, 4))  # not [out]: added after the product

    def forward(self, x):
        return torch.addmm(self.b, x, self.w)


def test_bias_that_is_not_a_vector_is_added_after_the_product():
    torch.manual_seed(0)
    module, x = _BroadcastBias(), torch.randn(5, 16)
    config = QSparseConfig(sparsity=0.5)
    run, records, before, after = _rewrite(module, x, config)
    assert before["addmm"] == 1 and after["addmm"] == 0
    assert after["sparse_linear"] == 1 and after["add"] == before["add"] + 1
    plan = config.plan_for("w")
    expected = reference.projection(x, module.w.t(), module.b.reshape(4), plan, config)
    with torch.no_grad():
        torch.testing.assert_close(run(), expected)


@pytest.mark.parametrize("overrides", [{}, {"0": None}, {"1": None}],
                         ids=["both", "second-only", "first-only"])
def test_projection_reading_another_projections_output(overrides):
    """Two projections in a row: the second's input is the first's replaced output."""
    torch.manual_seed(0)
    module, x = nn.Sequential(nn.Linear(8, 12), nn.Linear(12, 4)), torch.randn(3, 8)
    config = QSparseConfig(sparsity=0.5, overrides=overrides)
    run, records, _, after = _rewrite(module, x, config)
    assert after["sparse_linear"] == 2 - len(overrides)
    with torch.no_grad(), reference.reference_model(module, config):
        expected = module(x)
    with torch.no_grad():
        torch.testing.assert_close(run(), expected)


# --- random module stacks through the backend ----------------------------------------------

ACTIVATIONS = {"relu": torch.relu, "gelu": nn.functional.gelu, "silu": nn.functional.silu,
               "tanh": torch.tanh, "none": lambda t: t}


class Linear(nn.Module):
    def __init__(self, d_in, d_out, bias, act):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out, bias=bias)
        self.act = act

    def forward(self, x, oracle):
        return ACTIVATIONS[self.act](self.proj(x))

    def paths(self, prefix):
        return [f"{prefix}.proj"]


class FanOut(nn.Module):
    """One tensor feeding two projections (they share a sparsify in the rewritten graph)."""

    def __init__(self, d_in, d_out, bias, act):
        super().__init__()
        self.a = nn.Linear(d_in, d_out, bias=bias)
        self.b = nn.Linear(d_in, d_out, bias=not bias)
        self.act = act

    def forward(self, x, oracle):
        return ACTIVATIONS[self.act](self.a(x)) * self.b(x)

    def paths(self, prefix):
        return [f"{prefix}.a", f"{prefix}.b"]


class Functional(nn.Module):
    """``x @ self.w.t()`` (weight ``[out, in]``) or ``x @ self.w_in_out`` (``[in, out]``)."""

    def __init__(self, d_in, d_out, transposed, act):
        super().__init__()
        self.transposed, self.act = transposed, act
        if transposed:
            self.w = nn.Parameter(torch.randn(d_out, d_in) / math.sqrt(d_in))
        else:
            self.w_in_out = nn.Parameter(torch.randn(d_in, d_out) / math.sqrt(d_in))

    def forward(self, x, oracle):
        weight_out_in = self.w if self.transposed else self.w_in_out.t()
        if oracle is not None:  # the reference: written out with the oracle's projection
            config, path = oracle[0], oracle[1] + (".w" if self.transposed else ".w_in_out")
            plan = config.plan_for(path)
            if plan.method == "block" and weight_out_in.shape[1] % plan.block[1]:
                plan = ProjectionPlan(None, None, None)
            y = reference.projection(x, weight_out_in, None, plan, config)
        else:
            y = x @ self.w.t() if self.transposed else x @ self.w_in_out
        return ACTIVATIONS[self.act](y)

    def paths(self, prefix):
        return [prefix + (".w" if self.transposed else ".w_in_out")]


class ActivationProduct(nn.Module):
    """``softmax(x x^T) x``: two products of activations, never projections."""

    def forward(self, x, oracle):
        scores = x @ x.transpose(-2, -1) / math.sqrt(x.shape[-1])
        return torch.softmax(scores, dim=-1) @ x

    def paths(self, prefix):
        return []


class Stack(nn.Module):
    def __init__(self, layers, residual):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.residual = residual

    def forward(self, x, oracle=None):
        for i, (layer, residual) in enumerate(zip(self.layers, self.residual, strict=True)):
            y = layer(x, None if oracle is None else (oracle, f"layers.{i}"))
            x = x + y if residual else y
        return x

    def projection_paths(self):
        return [p for i, layer in enumerate(self.layers) for p in layer.paths(f"layers.{i}")]


WIDTHS = st.sampled_from((4, 8, 12, 16))


@st.composite
def stacks(draw):
    d = d_in = draw(WIDTHS)
    layers, residual = [], []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(("linear", "fanout", "functional", "product")))
        d_out = draw(WIDTHS)
        act = draw(st.sampled_from(list(ACTIVATIONS)))
        if kind == "linear":
            layers.append(Linear(d, d_out, draw(st.booleans()), act))
        elif kind == "fanout":
            layers.append(FanOut(d, d_out, draw(st.booleans()), act))
        elif kind == "functional":
            layers.append(Functional(d, d_out, draw(st.booleans()), act))
        else:
            layers.append(ActivationProduct())
            d_out = d
        residual.append(d_out == d and draw(st.booleans()))
        d = d_out
    # more than 8 rows: the counted generic ops, not the few-row CPU decode op
    lead = draw(st.sampled_from(((9,), (2, 5))))
    return Stack(layers, residual), (*lead, d_in)


@st.composite
def configs(draw):
    if draw(st.booleans()):
        return QSparseConfig(sparsity=draw(st.floats(0.0, 0.95)))
    return QSparseConfig(method="block", block=draw(st.sampled_from(((2, 4), (1, 4), (4, 8),
                                                                      (3, 4)))))


@settings(max_examples=15, deadline=None)
@given(stack=stacks(), config=configs(), seed=st.integers(0, 2**16))
def test_random_stacks_match_the_reference(stack, config, seed):
    torch.manual_seed(seed)
    module, shape = stack
    for p in module.parameters():  # re-draw from the example's seed, so failures replay
        nn.init.normal_(p, std=1.0 / math.sqrt(p.shape[-1]))
    x = torch.randn(shape)

    torch._dynamo.reset()
    backend = CountingBackend({**config.to_dict(), "block": config.block})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # block patterns that do not fit warn; that is tested
        with torch.no_grad():
            out = torch.compile(module, backend=backend, fullgraph=True)(x)
    torch._dynamo.reset()
    with torch.no_grad(), reference.reference_model(module, config):
        expected = module(x, oracle=config)

    records = backend.records()
    assert backend.calls == 1
    assert [r.projection.path for r in records] == module.projection_paths()
    after = backend.after[0]
    assert after["sparse_linear"] == sum(not r.plan.dense for r in records)
    products = sum(isinstance(layer, ActivationProduct) for layer in module.layers)
    dense = sum(r.plan.dense for r in records)
    # the activation products (mm on 2-D rows, bmm on 3-D) and the projections left dense
    # (a block pattern that does not fit) are the only products left
    assert after["mm"] + after["bmm"] + after["addmm"] == 2 * products + dense
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


class _WrittenInPlace(nn.Module):
    """``a`` reads ``h``, then ``h`` is written in place, then ``b`` reads it."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)

    def forward(self, x):
        h = x * 1.0
        ya = self.a(h)
        h[:, :8].mul_(0)
        return ya, self.b(h)


class _Snapshot(nn.Module):
    """A projection reads a copy of ``x`` taken before ``x`` is written in place."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 16)

    def forward(self, x):
        x = x * 1.0
        h = x.clone()
        x.mul_(0)
        return self.a(h), x


@pytest.mark.parametrize("decode", [False, True], ids=["generic", "cpu-decode"])
@pytest.mark.parametrize("module_cls", [_WrittenInPlace, _Snapshot], ids=["write", "snapshot"])
def test_in_place_writes_are_not_crossed(module_cls, decode):
    """A sparsify is neither shared across an in-place write to its input nor moved past one
    (by sharing, or by the decode lowering fusing the selection into the product)."""
    torch.manual_seed(0)
    module, x = module_cls(), torch.randn(4, 16)
    config = QSparseConfig(sparsity=0.5)
    backend = CountingBackend({**config.to_dict(), "decode": decode})
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(module, backend=backend, fullgraph=True)(x)
        with reference.reference_model(module, config):
            expected = module(x)
    assert sum(not r.plan.dense for r in backend.records()) == len(list(module.children()))
    if not decode:
        assert backend.after[0]["sparse_linear"] == len(list(module.children()))
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)
