"""``triton_device``: which graphs the Triton path is selected for, decided from fake values.

Graphs are built by hand with fake weights on CUDA (fake tensors need no GPU), so the automatic
selection for CUDA graphs is checked on a CPU-only machine. Selecting never registers anything
for the process: the graph's own nodes are retargeted (tested in ``test_cuda_decode.py``).
"""

from __future__ import annotations

import pytest
import torch
import torch.fx
from torch._subclasses.fake_tensor import FakeTensorMode

import qsparse_compile  # noqa: F401  (registers torch.ops.qsparse)
from qsparse_compile.options import CompileOptions
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
def triton():
    pytest.importorskip("triton", reason="triton is not installed")


def test_auto_selects_cuda_graphs_only(monkeypatch, triton):
    assert kernel_select.projection_devices(_graph("cuda")) == {"cuda"}
    assert kernel_select.triton_device(_graph("cpu"), "auto") is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert kernel_select.triton_device(_graph("cuda"), "auto") is None  # no device to run on
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert kernel_select.triton_device(_graph("cuda"), "auto") == "cuda"


def test_aten_opts_out(monkeypatch, triton):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert kernel_select.triton_device(_graph("cuda"), "aten") is None
    assert kernel_select.triton_device(_graph("cpu"), "aten") is None


def test_forced_triton(monkeypatch, triton):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the decision, whatever the test device
    assert kernel_select.triton_device(_graph("cpu"), "triton") == "cpu"  # interpreter
    assert kernel_select.triton_device(_graph("cuda"), "triton") == "cuda"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernel_select.triton_device(_graph("cpu"), "triton")
    monkeypatch.setattr(kernel_select, "_has_triton", lambda: False)
    with pytest.raises(RuntimeError, match="Triton is not installed"):
        kernel_select.triton_device(_graph("cpu"), "triton")
    assert kernel_select.triton_device(_graph("cuda"), "auto") is None


def test_bad_choice_names_value_and_allowed():
    with pytest.raises(ValueError, match=r"option 'kernels': got 'gpu', allowed: 'auto', "
                                         r"'triton', 'aten'"):
        CompileOptions.parse({"kernels": "gpu"})
