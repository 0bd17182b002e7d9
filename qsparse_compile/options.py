"""Every option of the ``qsparse`` backend, validated once, in one object.

``torch.compile(model, backend="qsparse", options={...})`` hands the backend one dict that
holds sparsity options (those of :class:`~qsparse_compile.config.QSparseConfig`) and backend
options (below). :meth:`CompileOptions.parse` is the one door they come through: it rejects
unknown names (listing every allowed one), checks each value, and returns a frozen object the
backend and the passes read, so no option is read, defaulted or validated anywhere else.

Backend options:

* ``inner``: ``"inductor"`` (default) or ``"eager"``: the compiler the rewritten graph goes to.
* ``fuse``: share one sparsify among projections reading the same tensor and fuse norm +
  sparsify (+ int8) into one op (default True).
* ``decode``: for inference graphs with few rows per call, one fused selection + sparse GEMV
  per group of projections sharing an input (default True).
* ``kernels``: ``"auto"`` (default: the Triton kernels for graphs whose weights are on CUDA),
  ``"triton"`` (the Triton kernels on any device; CPU tensors run in Triton's interpreter) or
  ``"aten"`` (never Triton).
* ``calibration``: rotations to sparsify in (a calibration, or the path of a saved one).
* ``cudagraphs``: capture each compiled graph in CUDA graphs (Inductor's ``triton.cudagraphs``,
  what ``mode="reduce-overhead"`` turns on for the stock backend; default False). Needs
  ``inner="inductor"``; Inductor skips the capture (with its log message) for graphs on the
  CPU. ``torch.compile`` refuses ``mode=`` together with ``options=``, so this option is how
  to have both; ``mode="reduce-overhead"`` without options (e.g. with a :class:`Backend`
  object) sets it too.
* ``cpp_wrapper``: Inductor emits the graph's wrapper (the code that allocates buffers and
  calls each kernel) as C++ instead of Python (Inductor's ``cpp_wrapper``; default False).
  It removes the Python cost of calling Inductor's own kernels, which a decode step of small
  kernels spends much of its time in, for a longer first compile (this package's CPU decode
  ops are still Python implementations, called through the dispatcher). Needs
  ``inner="inductor"``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from .config import OPTION_NAMES, QSparseConfig

__all__ = ["BACKEND_OPTIONS", "INDUCTOR_FLAGS", "INNER_COMPILERS", "KERNEL_CHOICES",
           "CompileOptions"]

INNER_COMPILERS = ("inductor", "eager")
KERNEL_CHOICES = ("auto", "triton", "aten")
BACKEND_OPTIONS = ("inner", "fuse", "decode", "kernels", "calibration", "cudagraphs",
                   "cpp_wrapper")
#: Backend flags that are Inductor settings: each one's ``config_patches`` key, and what the
#: setting is (for the message when ``inner`` is not Inductor).
INDUCTOR_FLAGS = {
    "cudagraphs": ("triton.cudagraphs", "CUDA graphs are captured by Inductor"),
    "cpp_wrapper": ("cpp_wrapper", "the C++ wrapper is Inductor's"),
}


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"option {name!r}: got {value!r}, allowed: "
                         f"{', '.join(map(repr, allowed))}")
    return value


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"option {name!r}: must be True or False, got {value!r}")
    return value


def _calibration(value: Any) -> Any:
    """A rotations source: None, a path, or an object that holds rotations by module path."""
    if value is None or isinstance(value, (str, os.PathLike)):
        return value
    if hasattr(value, "rotations") or (hasattr(value, "group_of") and hasattr(value, "groups")):
        return value
    raise TypeError(f"option 'calibration': must be a Calibration (or Rotations), or the path "
                    f"of a file written by Calibration.save, got {type(value).__name__}")


@dataclasses.dataclass(frozen=True)
class CompileOptions:
    """The validated options of one ``torch.compile(..., backend="qsparse")`` call."""

    config: QSparseConfig
    inner: str = "inductor"
    fuse: bool = True
    decode: bool = True
    kernels: str = "auto"
    calibration: Any = None
    cudagraphs: bool = False
    cpp_wrapper: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.config, QSparseConfig):
            raise TypeError(f"CompileOptions.config: expected a QSparseConfig, got "
                            f"{type(self.config).__name__}")
        _choice("inner", self.inner, INNER_COMPILERS)
        _flag("fuse", self.fuse)
        _flag("decode", self.decode)
        _choice("kernels", self.kernels, KERNEL_CHOICES)
        _calibration(self.calibration)
        for name, (_, what) in INDUCTOR_FLAGS.items():
            if _flag(name, getattr(self, name)) and self.inner != "inductor":
                raise ValueError(f"option {name!r}: {what}, so it needs inner='inductor', "
                                 f"got inner={self.inner!r}")

    def inductor_patches(self) -> dict[str, bool]:
        """Inductor's ``config_patches`` for the Inductor flags that are on."""
        return {key: True for name, (key, _) in INDUCTOR_FLAGS.items() if getattr(self, name)}

    @classmethod
    def parse(cls, options: CompileOptions | QSparseConfig | Mapping[str, Any] | None = None,
              **more: Any) -> CompileOptions:
        """Options from what ``torch.compile`` passes (a dict), a config, or these objects.

        Raises ``ValueError`` for an unknown option name (listing every allowed one) or a value
        out of range, ``TypeError`` for a value of the wrong type; each message names the
        option and the value given.
        """
        if isinstance(options, CompileOptions):
            return dataclasses.replace(options, **more) if more else options
        if isinstance(options, QSparseConfig):
            return cls(options, **more)
        if options is not None and not isinstance(options, Mapping):
            raise TypeError(f"backend 'qsparse': options must be a dict of option -> value, "
                            f"got {type(options).__name__}")
        merged = {**dict(options or {}), **more}
        unknown = sorted(set(merged) - set(OPTION_NAMES) - set(BACKEND_OPTIONS))
        if unknown:
            raise ValueError(
                f"unknown option(s) {', '.join(map(repr, unknown))}; "
                f"allowed: {', '.join(OPTION_NAMES + BACKEND_OPTIONS)}")
        backend = {name: merged.pop(name) for name in BACKEND_OPTIONS if name in merged}
        return cls(QSparseConfig.from_options(merged), **backend)

    def to_dict(self) -> dict[str, Any]:
        """Sparsity and backend options as one dict (``parse`` gives the same object back)."""
        out = self.config.to_dict()
        out.update(inner=self.inner, fuse=self.fuse, decode=self.decode, kernels=self.kernels,
                   calibration=self.calibration, cudagraphs=self.cudagraphs,
                   cpp_wrapper=self.cpp_wrapper)
        return out
