"""``find_projections`` on normalised graphs from both entry points of the compiler.

Each spelling of ``x @ W^T (+ b)`` must be found with the right weight layout, sizes, bias and
module path, whether the graph comes from Dynamo, ``torch.export`` or ``torch.export`` after
``run_decompositions``, once normalised (every projection is then an ATen ``mm`` / ``addmm`` /
``bmm``); products of two activations never are.
"""

from __future__ import annotations

import pytest
import torch
from op_counts import op_counts
from torch import nn
from tracers import TRACERS, trace_export_decomposed

from qsparse_compile.passes import find_projections


def _conv1d(nf: int, nx: int) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(1)
    conv = Conv1D(nf, nx)
    nn.init.normal_(conv.bias)
    return conv


class Spellings(nn.Module):
    """One projection per spelling; each output width is distinct so sizes identify them."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 12)                        # F.linear, with bias
        self.nobias = nn.Linear(16, 11, bias=False)         # F.linear, no bias
        self.w_t = nn.Parameter(torch.randn(8, 16))         # x @ W.t()
        self.w_T = nn.Parameter(torch.randn(6, 16))         # x @ W.T
        self.w_tr = nn.Parameter(torch.randn(5, 16))        # matmul(x, W.transpose(0, 1))
        self.w_in_out = nn.Parameter(torch.randn(16, 4))    # x @ W, weight stored [in, out]
        self.conv = _conv1d(10, 16)                         # GPT-2: addmm(b, x2d, W[in, out])
        self.w_perm = nn.Parameter(torch.randn(3, 16))      # x @ W.permute(1, 0)
        self.w_ein = nn.Parameter(torch.randn(7, 16))       # einsum("...d,od->...o")
        self.w_ein_first = nn.Parameter(torch.randn(9, 16))  # einsum("od,...d->...o")
        self.w_ein_io = nn.Parameter(torch.randn(16, 2))    # einsum("...d,do->...o"): [in, out]
        self.w_left = nn.Parameter(torch.randn(13, 16))     # (W @ x^T)^T

    def forward(self, x):
        return torch.cat([
            self.lin(x),
            self.nobias(x),
            x @ self.w_t.t(),
            x @ self.w_T.T,
            torch.matmul(x, self.w_tr.transpose(0, 1)),
            x @ self.w_in_out,
            self.conv(x),
            x @ self.w_perm.permute(1, 0),
            torch.einsum("...d,od->...o", x, self.w_ein),
            torch.einsum("od,...d->...o", self.w_ein_first, x),
            torch.einsum("...d,do->...o", x, self.w_ein_io),
            (self.w_left @ x.transpose(-1, -2)).transpose(-1, -2),
        ], dim=-1)


#: (path, weight layout, in_features, out_features, has bias), in forward order.
EXPECTED = [
    ("lin", "out_in", 16, 12, True),
    ("nobias", "out_in", 16, 11, False),
    ("w_t", "out_in", 16, 8, False),
    ("w_T", "out_in", 16, 6, False),
    ("w_tr", "out_in", 16, 5, False),
    ("w_in_out", "in_out", 16, 4, False),
    ("conv", "in_out", 16, 10, True),
    ("w_perm", "out_in", 16, 3, False),
    ("w_ein", "out_in", 16, 7, False),
    ("w_ein_first", "out_in", 16, 9, False),
    ("w_ein_io", "in_out", 16, 2, False),
    ("w_left", "out_in", 16, 13, False),
]


def _summary(projections):
    return [(p.path, p.weight_layout, p.in_features, p.out_features, p.bias is not None)
            for p in projections]


@pytest.mark.parametrize("shape", [(5, 16), (2, 3, 16)], ids=["2d", "3d"])
@pytest.mark.parametrize("tracer", list(TRACERS))
def test_every_spelling_is_found(tracer, shape):
    torch.manual_seed(0)
    module = Spellings()
    traced = TRACERS[tracer](module, torch.randn(*shape))
    found = find_projections(traced.gm, traced.weights)
    assert _summary(found) == EXPECTED
    # the found x feeds the product (not the weight), and weights are constants
    for p in found:
        assert traced.weights.is_weight(p.weight) and not traced.weights.is_weight(p.x)
        assert p.node in p.x.users


class NotProjections(nn.Module):
    """Matrix products that are not ``x @ W^T``: they must be left alone."""

    def __init__(self):
        super().__init__()
        self.w3 = nn.Parameter(torch.randn(2, 16, 16))  # a 3-D parameter is not a weight matrix
        self.scale = nn.Parameter(torch.randn(16))

    def forward(self, x):  # x: [2, T, 16]
        q, k = x * 2.0, x + 1.0
        scores = q @ k.transpose(-2, -1)             # attention scores: activation x activation
        ctx = torch.softmax(scores, dim=-1) @ x      # attention x values
        gram = torch.matmul(x.transpose(-2, -1), x)  # activation^T x activation
        batched = torch.bmm(x, self.w3)              # a batch of different matrices
        return ctx.sum() + gram.sum() + (batched * self.scale).sum()


@pytest.mark.parametrize("tracer", list(TRACERS))
def test_activation_products_are_not_projections(tracer):
    torch.manual_seed(0)
    traced = TRACERS[tracer](NotProjections(), torch.randn(2, 3, 16))
    counts = op_counts(traced.gm)
    products = sum(counts[name] for name in ("bmm", "mm", "addmm"))
    assert products >= 4  # the products are in the graph, so finding none is meaningful
    assert find_projections(traced.gm, traced.weights) == []


class Attention(nn.Module):
    """Projections and activation products side by side, as in an attention block."""

    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(16, 16, bias=False)
        self.k_proj = nn.Linear(16, 16, bias=False)
        self.v_proj = nn.Linear(16, 16, bias=False)
        self.o_proj = nn.Linear(16, 16)

    def forward(self, x):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        attn = torch.softmax(q @ k.transpose(-2, -1) / 4.0, dim=-1)
        return self.o_proj((attn @ v).transpose(0, 1).reshape(x.shape).contiguous() + x)


@pytest.mark.parametrize("tracer", list(TRACERS))
def test_attention_block_finds_exactly_its_four_projections(tracer):
    torch.manual_seed(0)
    traced = TRACERS[tracer](Attention(), torch.randn(3, 4, 16))
    found = find_projections(traced.gm, traced.weights)
    assert [(p.path, p.role) for p in found] == [
        ("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v"), ("o_proj", "o")]
    # q, k and v read one tensor: normalisation merges the views each linear makes of it
    assert len({p.x for p in found[:3]}) == 1


class NonContiguousInput(nn.Module):
    """``linear`` on a transposed 3-D input: ATen decomposition spells it as ``bmm`` with the
    weight expanded over the batch."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 8, bias=True)

    def forward(self, x):  # x: [T, B, 16]
        return self.proj(x.transpose(0, 1))


def test_bmm_against_a_broadcast_weight_is_a_projection():
    torch.manual_seed(0)
    traced = trace_export_decomposed(NonContiguousInput(), torch.randn(5, 3, 16))
    assert op_counts(traced.gm)["bmm"] == 1
    assert _summary(find_projections(traced.gm, traced.weights)) == [
        ("proj", "out_in", 16, 8, False)]


class OneToken(nn.Module):
    """A projection of one vector (no rows): ``W @ x`` and ``F.linear`` on a 1-D input."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 16))
        self.lin = nn.Linear(16, 5)

    def forward(self, x):
        return torch.cat([self.w @ x, self.lin(x)])


def test_products_of_one_vector_are_projections_and_match_the_reference():
    from qsparse_compile import reference
    from qsparse_compile.config import QSparseConfig
    from qsparse_compile.passes import sparsify_graph

    torch.manual_seed(0)
    module, x = OneToken(), torch.randn(16)
    traced = TRACERS["dynamo"](module, x)
    found = find_projections(traced.gm, traced.weights)
    assert [(p.path, p.in_features, p.out_features) for p in found] == [("w", 16, 6),
                                                                         ("lin", 16, 5)]
    config = QSparseConfig(sparsity=0.5)
    sparsify_graph(traced.gm, traced.weights, config)
    with torch.no_grad(), reference.reference_model(module, config):
        plan = config.plan_for("w")
        expected = torch.cat([reference.projection(x, module.w, None, plan, config),
                              module.lin(x)])
        torch.testing.assert_close(traced.run(), expected)


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8))

    def forward(self, x):
        return torch.addmm(x, x, self.w.t(), alpha=2.0)


def test_a_product_the_rewrite_does_not_take_is_reported_and_warned_about():
    from qsparse_compile.config import QSparseConfig
    from qsparse_compile.passes import sparsify_graph

    traced = TRACERS["dynamo"](Scaled(), torch.randn(3, 8))
    with pytest.warns(UserWarning, match="'w': left dense: aten::addmm with alpha=2.0"):
        records = sparsify_graph(traced.gm, traced.weights, QSparseConfig(sparsity=0.5))
    assert [(r.path, r.plan.dense) for r in records] == [("w", True)]
    assert "not rewritten" in records[0].note
