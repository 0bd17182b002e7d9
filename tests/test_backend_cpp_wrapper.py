"""Inductor's C++ wrapper through the backend (``cpp_wrapper=True``).

The option is validated like the other Inductor flags (``tests/test_options.py``), reaches
Inductor as ``cpp_wrapper`` in the ``config_patches`` of that graph's ``compile_fx`` call (and
only then), and a real compile of a decode graph, whose fused selection + sparse GEMV ops are
this package's own (called from the C++ wrapper through the dispatcher), gives the same numbers
as the Python wrapper.
"""

from __future__ import annotations

import pytest
import torch
import torch._inductor.compile_fx as inductor_compile_fx

from qsparse_compile import Backend
from qsparse_compile.compile_records import records_of

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


class _Block(torch.nn.Module):
    """RMSNorm, a GLU and a residual: the shape of a decoder layer's MLP."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.norm = torch.nn.RMSNorm(64)
        self.gate = torch.nn.Linear(64, 96, bias=False)
        self.up = torch.nn.Linear(64, 96, bias=False)
        self.down = torch.nn.Linear(96, 64, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return x + self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h))


@pytest.fixture
def inductor_calls(monkeypatch):
    """Replace Inductor's ``compile_fx`` with one that records its patches and runs the graph."""
    calls = []

    def record(gm, inputs, config_patches=None, **kwargs):
        calls.append(dict(config_patches or {}))
        return gm.forward

    monkeypatch.setattr(inductor_compile_fx, "compile_fx", record)
    return calls


def test_option_reaches_inductor_only_when_set(inductor_calls):
    x = torch.randn(1, 64)
    with torch.no_grad():
        torch.compile(_Block(), backend=Backend(sparsity=0.5, cpp_wrapper=True))(x)
        torch.compile(_Block(), backend="qsparse", options={"sparsity": 0.5})(x)
    assert [c.get("cpp_wrapper") for c in inductor_calls] == [True, None]
    assert all(c["emulate_precision_casts"] is True for c in inductor_calls)


@pytest.mark.parametrize("weights", [None, "int4"], ids=["fp32", "int4"])
def test_real_compile_equals_the_python_wrapper(weights):
    """One decode token, compiled for real with each wrapper: the C++ wrapper calls the fused
    decode op (over fp32 or packed int4 weights) and gives the Python wrapper's numbers."""
    model, x = _Block(), torch.randn(1, 1, 64)
    outs = {}
    with torch.no_grad():
        for cpp in (False, True):
            torch._dynamo.reset()
            compiled = torch.compile(model, backend="qsparse", dynamic=False,
                                     options={"sparsity": 0.5, "cpp_wrapper": cpp,
                                              "weights": weights})
            outs[cpp] = compiled(x)
            assert records_of(compiled).graphs[0].decode == 2  # gate/up and down, fused
    torch.testing.assert_close(outs[True], outs[False], rtol=0, atol=0)
