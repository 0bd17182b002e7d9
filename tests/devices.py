"""Which device the kernel tests run on: ``QSPARSE_TEST_DEVICE``, ``cpu`` (default) or ``cuda``.

``cpu``: CPU tensors, Triton kernels in Triton's interpreter (``TRITON_INTERPRET=1``), which is what
a machine without a GPU can run. ``cuda``: CUDA tensors and compiled kernels
(``TRITON_INTERPRET=0``), which is what a GPU machine must run; it needs a CUDA device.

:func:`device_name` reads the variable without importing torch, so the root ``conftest`` can set
``TRITON_INTERPRET`` before anything imports Triton; :func:`selected_device` is the
``torch.device`` the tests build their tensors on. Both validate the same way, here.
"""

from __future__ import annotations

import os

#: The environment variable that picks the test device.
ENV = "QSPARSE_TEST_DEVICE"
#: Its allowed values; the first is the default.
CHOICES = ("cpu", "cuda")


class DeviceChoiceError(ValueError):
    """``QSPARSE_TEST_DEVICE`` names no allowed device, or one this machine does not have."""


def device_name() -> str:
    """``QSPARSE_TEST_DEVICE`` lower-cased (``cpu`` when unset or empty), validated.

    Raises:
        DeviceChoiceError: the value is not one of :data:`CHOICES`.
    """
    given = os.environ.get(ENV, "")
    name = given.strip().lower() or CHOICES[0]
    if name not in CHOICES:
        raise DeviceChoiceError(
            f"{ENV}={given!r} is not a test device; allowed: {', '.join(CHOICES)} "
            f"(unset means {CHOICES[0]})"
        )
    return name


def interpret() -> bool:
    """Whether Triton's interpreter must run the kernels: on the ``cpu`` test device only."""
    return device_name() == "cpu"


def selected_device():
    """The ``torch.device`` of :func:`device_name`, checked to exist on this machine.

    Raises:
        DeviceChoiceError: the value is not allowed, or it is ``cuda`` and
            ``torch.cuda.is_available()`` is false.
    """
    import torch

    name = device_name()
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceChoiceError(
            f"{ENV}={os.environ.get(ENV)!r} asks for CUDA tensors, but torch.cuda.is_available() "
            f"is false on this machine (torch {torch.__version__}); unset it (or set it to cpu) "
            f"to run the kernels in Triton's interpreter on the CPU"
        )
    return torch.device(name)
