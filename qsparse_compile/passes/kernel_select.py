"""Which kernels a rewritten graph runs on: the default ops, or the Triton kernels.

The backend option ``kernels`` chooses:

* ``"auto"`` (default): the Triton path for graphs whose projection weights are on CUDA, when
  a CUDA device and Triton are available; the default path (ATen / CPU kernels) otherwise.
  Selecting it makes the Triton kernels the CUDA implementations of the ``qsparse`` ops
  (:func:`~qsparse_compile.codegen.triton.dispatch.register_cuda_kernels`), so the graph keeps
  the ordinary ops and the device key routes them.
* ``"triton"``: the Triton path whatever the device. On CPU tensors the kernels run in Triton's
  interpreter (``TRITON_INTERPRET=1`` set before Triton is imported): slow, meant for tests and
  for debugging on machines without a GPU. No device key routes CPU tensors to the kernels, so
  the graph then calls the ``qsparse_triton`` ops explicitly (:mod:`.triton_lowering`).

:func:`triton_device` is the decision; the pipeline runs the Triton passes for the device type
it returns, or the default ones for None.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.fx

from .projections import tensor_meta

__all__ = ["KERNEL_CHOICES", "check_kernels", "projection_devices", "triton_device"]

#: Allowed values of the backend option ``kernels``.
KERNEL_CHOICES = ("auto", "triton")

_SPARSE_LINEARS = ("sparse_linear", "block_sparse_linear")


def check_kernels(value: object) -> str:
    """Return ``value`` if it is an allowed ``kernels`` option, else raise ``ValueError``."""
    if value not in KERNEL_CHOICES:
        raise ValueError(f"option 'kernels': got {value!r}, allowed: "
                         f"{', '.join(map(repr, KERNEL_CHOICES))}")
    return value  # type: ignore[return-value]


def projection_devices(gm: torch.fx.GraphModule) -> set[str]:
    """Device types of the weights the graph's ``qsparse`` projections read (from fake values)."""
    devices = set()
    for node in gm.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        if node.target.namespace != "qsparse" or node.target._opname not in _SPARSE_LINEARS:
            continue
        meta = tensor_meta(node.args[1])
        if meta is not None:
            devices.add(meta.device.type)
    return devices


def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_device(gm: torch.fx.GraphModule, kernels: str) -> str | None:
    """The device type the Triton path is selected for in ``gm``, or None (default path).

    Returns ``"cuda"`` after registering the CUDA implementations (idempotent), ``"cpu"`` for
    ``kernels="triton"`` on CPU weights (the interpreter), None where ``"auto"`` keeps the
    default path. Raises ``RuntimeError`` where ``kernels="triton"`` cannot be honoured
    (no Triton; CPU tensors without ``TRITON_INTERPRET=1``), ``ValueError`` for other devices.
    """
    check_kernels(kernels)
    devices = projection_devices(gm)
    if kernels == "auto":
        if "cuda" not in devices or not torch.cuda.is_available() or not _has_triton():
            return None
    elif not _has_triton():
        raise RuntimeError("option kernels='triton': Triton is not installed; install it or "
                           "use kernels='auto'")
    if "cuda" in devices:
        from ..codegen.triton.dispatch import register_cuda_kernels

        register_cuda_kernels()
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
