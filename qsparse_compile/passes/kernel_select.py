"""Which kernels a rewritten graph runs on: the default ops, or the Triton kernels.

The backend option ``kernels`` chooses, per graph:

* ``"auto"`` (default): the Triton path for graphs whose projection weights are on CUDA, when
  a CUDA device and Triton are available; the default path (ATen / CPU kernels) otherwise.
* ``"triton"``: the Triton path whatever the device. On CPU tensors the kernels run in Triton's
  interpreter (``TRITON_INTERPRET=1`` set before Triton is imported): slow, meant for tests and
  for debugging on machines without a GPU.
* ``"aten"``: never the Triton path.

:func:`triton_device` is the decision; the pass manager then retargets that graph's nodes
(:mod:`.triton_lowering`, :mod:`.cuda_decode`, :mod:`.block_prefill`), nothing else.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.fx

from .graph_utils import tensor_meta
from .node_args import arguments, is_call

__all__ = ["projection_devices", "triton_device"]

_SPARSE_LINEARS = (torch.ops.qsparse.sparse_linear.default,
                   torch.ops.qsparse.block_sparse_linear.default)


def projection_devices(gm: torch.fx.GraphModule) -> set[str]:
    """Device types of the weights the graph's ``qsparse`` projections read (from fake values),
    those in the bodies of its higher-order ops (checkpointed layers) included."""
    devices = set()
    nodes = (node for module in gm.modules() if isinstance(module, torch.fx.GraphModule)
             for node in module.graph.nodes)
    for node in nodes:
        if is_call(node, *_SPARSE_LINEARS):
            meta = tensor_meta(arguments(node)["weight"])
            if meta is not None:
                devices.add(meta.device.type)
    return devices


def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_device(gm: torch.fx.GraphModule, kernels: str) -> str | None:
    """The device type the Triton path is selected for in ``gm``, or None (default path).

    Returns ``"cuda"`` or, for ``kernels="triton"`` on CPU weights, ``"cpu"`` (the
    interpreter); None where ``"auto"`` keeps the default path, and always for ``"aten"``.
    Raises ``RuntimeError`` where ``kernels="triton"`` cannot be honoured (no Triton; CPU
    tensors without ``TRITON_INTERPRET=1``), ``ValueError`` for other devices.
    """
    if kernels == "aten":
        return None
    devices = projection_devices(gm)
    if kernels == "auto":
        if "cuda" not in devices or not torch.cuda.is_available() or not _has_triton():
            return None
    elif not _has_triton():
        raise RuntimeError("option kernels='triton': Triton is not installed; install it or "
                           "use kernels='auto'")
    if "cuda" in devices:
        return "cuda"
    if not devices <= {"cpu"}:
        raise ValueError(f"option kernels='triton': projection weights on "
                         f"{', '.join(sorted(devices))}; the Triton kernels run on CUDA, or on "
                         f"CPU tensors in Triton's interpreter")
    from ..codegen.triton.launch import interpreting

    if not interpreting():
        raise RuntimeError("option kernels='triton' on CPU tensors runs the kernels in Triton's "
                           "interpreter: set TRITON_INTERPRET=1 before Triton is imported, or "
                           "use kernels='auto'")
    return "cpu"
