"""Launching rendered kernels so that ``torch.compile`` and ``torch.export`` can see them.

Inside a ``torch.library.triton_op`` every kernel launch must go through
``torch.library.wrap_triton``: that is what lets Inductor trace the op into the kernel call (and
fuse around it) instead of treating it as an opaque function. The op bodies in :mod:`.ops` run
inside :func:`traceable`, which makes :func:`launch` do that; everywhere else (the Python entry
points called directly) a kernel is launched
as is, without the higher-order-op dispatch ``wrap_triton`` adds to an eager call. PyTorch
versions without ``wrap_triton`` (< 2.6) always launch directly; the ops are then plain custom
ops.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType
from typing import Any

import torch

from .cache import load_module

__all__ = [
    "HAS_TRITON_OP", "USE_TRITON_OP", "interpreting", "traceable", "launch", "kernel_module",
]

#: Whether this PyTorch has ``triton_op`` and ``wrap_triton`` (2.6+).
HAS_TRITON_OP = hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


#: Register the ops with ``triton_op``: only where it exists and kernels are compiled. Under the
#: interpreter ``wrap_triton`` hands back the interpreted kernel untraced, so a ``triton_op``
#: traced with fake tensors (``torch.compile``, ``torch.export``) would run the kernel on fake
#: data; a plain ``custom_op`` with a fake is traceable there.
USE_TRITON_OP = HAS_TRITON_OP and not interpreting()


_state = threading.local()


@contextlib.contextmanager
def traceable() -> Iterator[None]:
    """Within the block, :func:`launch` goes through ``wrap_triton`` (a ``triton_op`` body)."""
    previous = getattr(_state, "traceable", False)
    _state.traceable = True
    try:
        yield
    finally:
        _state.traceable = previous


def launch(kernel: Any, grid: Sequence[int], args: Sequence[Any], num_warps: int) -> None:
    """Launch ``kernel[grid](*args, num_warps=num_warps)``, traceably inside :func:`traceable`.

    Args:
        kernel: a ``@triton.jit`` function (an interpreted one under ``TRITON_INTERPRET=1``).
        grid: the launch grid, one to three program counts.
        args: the kernel's positional arguments (tensors and integers).
        num_warps: warps per program (ignored by the interpreter).
    """
    runner = kernel
    if HAS_TRITON_OP and getattr(_state, "traceable", False):
        runner = torch.library.wrap_triton(kernel)
    runner[tuple(grid)](*args, num_warps=num_warps)


def kernel_module(name: str, render: Callable[[], str]) -> ModuleType:
    """The imported module of ``render()``'s source (callers cache it per specialisation)."""
    return load_module(name, render())
