"""``find_projections`` on small graphs from every tracer the compiler meets.

Each spelling of ``x @ W^T (+ b)`` must be found with the right weight layout, sizes, bias and
module path, whether the graph comes from ``symbolic_trace``, Dynamo, ``torch.export`` or
``torch.export`` after ``run_decompositions`` (ATen ``mm`` / ``addmm`` / ``bmm``); products of
two activations never are.
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

    def forward(self, x):
        return torch.cat([
            self.lin(x),
            self.nobias(x),
            x @ self.w_t.t(),
            x @ self.w_T.T,
            torch.matmul(x, self.w_tr.transpose(0, 1)),
            x @ self.w_in_out,
            self.conv(x),
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
]


def _summary(projections):
    return [(p.path, p.weight_layout, p.in_features, p.out_features, p.bias is not None)
            for p in projections]


@pytest.mark.parametrize("shape", [(5, 16), (2, 3, 16)], ids=["2d", "3d"])
@pytest.mark.parametrize("tracer", list(TRACERS))
def test_every_spelling_is_found(tracer, shape):
    torch.manual_seed(0)
    module = Spellings()
    gm, weights = TRACERS[tracer](module, torch.randn(*shape))
    found = find_projections(gm, weights)
    assert _summary(found) == EXPECTED
    # the found x feeds the product (not the weight), and weights are constants
    for p in found:
        assert weights.is_weight(p.weight) and not weights.is_weight(p.x)
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
    gm, weights = TRACERS[tracer](NotProjections(), torch.randn(2, 3, 16))
    counts = op_counts(gm)
    products = sum(counts[name] for name in ("matmul", "bmm", "mm", "__matmul__"))
    assert products >= 4  # the products are in the graph, so finding none is meaningful
    assert find_projections(gm, weights) == []


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
    gm, weights = TRACERS[tracer](Attention(), torch.randn(3, 4, 16))
    found = find_projections(gm, weights)
    assert [(p.path, p.role) for p in found] == [
        ("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v"), ("o_proj", "o")]
    # q, k and v read one tensor (the graph input, or one view of it after decomposition)
    assert len({p.x for p in found[:3]}) == 1 or tracer == "export-aten"


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
    gm, weights = trace_export_decomposed(NonContiguousInput(), torch.randn(5, 3, 16))
    assert op_counts(gm)["bmm"] == 1
    assert _summary(find_projections(gm, weights)) == [("proj", "out_in", 16, 8, False)]
