"""``triton_device``: which graphs the Triton path is selected for, decided from fake values.

Graphs are built by hand with fake weights on CUDA (fake tensors need no GPU), so the automatic
selection for CUDA graphs is checked on a CPU-only machine; the registration of the CUDA
implementations is replaced by a recorder there.
"""

from __future__ import annotations

import pytest
import torch
import torch.fx
from torch._subclasses.fake_tensor import FakeTensorMode

import qsparse_compile  # noqa: F401  (registers torch.ops.qsparse)
from qsparse_compile.passes import kernel_select


def _graph(device: str) -> torch.fx.GraphModule:
    """``sparse_linear(x, w, None)`` with fake ``x`` and ``w`` on ``device``."""
    graph = torch.fx.Graph()
    x, w = graph.placeholder("x"), graph.placeholder("w")
    y = graph.call_function(torch.ops.qsparse.sparse_linear.default, (x, w, None))
    graph.output(y)
    with FakeTensorMode():
        x.meta["val"] = torch.empty(1, 8, device=device)
        w.meta["val"] = torch.empty(4, 8, device=device)
    return torch.fx.GraphModule(torch.nn.Module(), graph)


@pytest.fixture
def registrations(monkeypatch):
    """Record register_cuda_kernels calls instead of registering (no CUDA here)."""
    pytest.importorskip("triton", reason="triton is not installed")
    from qsparse_compile.codegen.triton import dispatch

    calls = []
    monkeypatch.setattr(dispatch, "register_cuda_kernels", lambda: calls.append(1))
    return calls


def test_auto_selects_cuda_graphs_only(monkeypatch, registrations):
    assert kernel_select.projection_devices(_graph("cuda")) == {"cuda"}
    assert kernel_select.triton_device(_graph("cpu"), "auto") is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert kernel_select.triton_device(_graph("cuda"), "auto") is None  # no device to run on
    assert registrations == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert kernel_select.triton_device(_graph("cuda"), "auto") == "cuda"
    assert registrations == [1]


def test_forced_triton(monkeypatch, registrations):
    assert kernel_select.triton_device(_graph("cpu"), "triton") == "cpu"  # interpreter
    assert kernel_select.triton_device(_graph("cuda"), "triton") == "cuda"
    assert registrations == [1]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernel_select.triton_device(_graph("cpu"), "triton")
    monkeypatch.setattr(kernel_select, "_has_triton", lambda: False)
    with pytest.raises(RuntimeError, match="Triton is not installed"):
        kernel_select.triton_device(_graph("cpu"), "triton")
    assert kernel_select.triton_device(_graph("cuda"), "auto") is None


def test_bad_choice_names_value_and_allowed():
    with pytest.raises(ValueError, match=r"option 'kernels': got 'gpu', allowed: 'auto', "
                                         r"'triton'"):
        kernel_select.triton_device(_graph("cpu"), "gpu")
