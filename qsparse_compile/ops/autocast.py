"""Autocast rules for the ``qsparse`` ops: inside ``torch.autocast`` they compute as
``F.linear`` would.

``F.linear`` under autocast casts its floating operands to the autocast dtype of their device
(``torch.get_autocast_dtype``: bf16 on the CPU by default, fp16 on CUDA) and multiplies in that
dtype. A projection rewritten to ``sparse_linear(topk_sparsify(x), W, b)`` must do the same, so
every ``qsparse`` op follows that policy: its floating tensor operands on the autocast device
are cast to the autocast dtype, then the op runs with autocast off. The selection therefore
happens on the cast activation, exactly what ``F.linear`` multiplies, and a projection keeps
the dtype ``F.linear`` would give it.

``norm_sparsify`` (fused norm + sparsify + int8) stands for an unfused chain whose norm runs
under autocast's rules for ATen ops and whose sparsifier casts: under autocast it computes
that chain (:func:`_norm_sparsify_under_autocast`), since the fused kernels select on the
norm's output in its own dtype.

The rules are kernels on the dispatcher's ``Autocast<Device>`` keys, registered through
``torch.library.Library`` (``torch.library.register_autocast`` takes one fixed dtype, while
the dtype here is whatever the active autocast region says).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import block_linear, linear, mask, sparsify  # noqa: F401  (the ops ruled on)
from . import quant as _quant  # noqa: F401
from .norm_sparsify import normalise

__all__ = ["AUTOCAST_DEVICES", "CAST_OPS"]

#: ops whose floating operands are cast to the autocast dtype (and which then run as usual)
CAST_OPS = ("sparse_linear", "block_sparse_linear", "topk_sparsify", "block_sparsify",
            "topk_mask", "block_mask", "int8_fake_quant", "ternary_fake_quant")
#: device type -> the dispatcher's autocast key for it (those this PyTorch has are registered)
_AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA", "xpu": "AutocastXPU",
                  "mps": "AutocastMPS", "hpu": "AutocastHPU", "mtia": "AutocastMTIA",
                  "xla": "AutocastXLA", "privateuseone": "AutocastPrivateUse1"}
AUTOCAST_DEVICES = tuple(_AUTOCAST_KEYS)

_LIBRARY = torch.library.Library("qsparse", "IMPL")


def _cast(value: object, device_type: str, dtype: torch.dtype) -> object:
    if isinstance(value, torch.Tensor) and value.is_floating_point() \
            and value.device.type == device_type:
        return value.to(dtype)
    return value


def _casting_kernel(op: torch._ops.OpOverload, device_type: str) -> Callable:
    def kernel(*args: object) -> object:
        dtype = torch.get_autocast_dtype(device_type)
        cast = [_cast(a, device_type, dtype) for a in args]
        with torch.autocast(device_type, enabled=False):
            return op(*cast)

    return kernel


def _norm_sparsify_under_autocast(x, norm, weight, bias, eps, k, n, m, rescale, quant, ste):
    """The chain the fused op stands for, each part under autocast's rule for it."""
    h = normalise(x, norm, weight, bias, eps)
    if m:
        out = torch.ops.qsparse.block_sparsify(h, n, m, rescale, ste)
    else:
        out = torch.ops.qsparse.topk_sparsify(h, k, rescale, ste)
    if quant:
        out = torch.ops.qsparse.int8_fake_quant(out)
    return out


def _register() -> None:
    for device_type, key in _AUTOCAST_KEYS.items():
        if not torch.amp.is_autocast_available(device_type) \
                or not hasattr(torch._C.DispatchKey, key):
            continue
        for name in CAST_OPS:
            op = getattr(torch.ops.qsparse, name).default
            _LIBRARY.impl(name, _casting_kernel(op, device_type), key)
        _LIBRARY.impl("norm_sparsify", _norm_sparsify_under_autocast, key)


_register()
