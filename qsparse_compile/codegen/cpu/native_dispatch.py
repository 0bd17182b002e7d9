"""The native CPU kernels of the decode ops: built, loaded and filled from Python.

:mod:`.dispatch_cpp` holds a C++ kernel for the ``CPU`` key of ``qsparse::cpu_topk_linear``
and ``qsparse::cpu_packed_linear`` that calls their C entry points without Python (about
1 us per call instead of 7-12 us). This module builds it with the system C++ compiler
against the installed torch's headers (once per torch build, compiler and source: ~20 s,
then from the disk cache of :mod:`.compiler`), loads it, and publishes into its tables what
the Python implementations have validated and compiled: entry points, weight layouts and the
kernel thread count.

The library is loaded at the first call of either op's Python implementation (never at
import). From then on the C++ kernel serves the ``CPU`` key; the Python implementation stays
registered as ``qsparse::<op>_python``, which the C++ kernel calls for everything it does not
take itself. Where the library cannot be built (no C++ compiler, no torch headers) one
warning says so and the ops keep running through Python, with the same results.
"""

from __future__ import annotations

import ctypes
import threading
import warnings

import torch

from .compiler import build_library
from .dispatch_cpp import SOURCE

__all__ = ["DTYPE_CODES", "FORMAT_CODES", "OP_CODES", "define_with_native_kernel",
           "native_calls", "native_library", "publish_kernel", "publish_layout",
           "publish_threads"]

#: Codes shared with the C++ tables (their order there).
OP_CODES = {"cpu_topk_linear": 0, "cpu_packed_linear": 1}
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}
FORMAT_CODES = {"int8": 0, "int4": 1, "ternary": 2}

_lock = threading.Lock()
_state: dict[str, object] = {}  # "lib": the library, "error": why not, "threads": published


def _build_flags() -> tuple[tuple[str, ...], tuple[str, ...]]:
    from torch.utils import cpp_extension

    lib_dirs = cpp_extension.library_paths()
    flags = ("-O2", "-std=c++17", "-shared", "-fPIC", "-w",
             f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}",
             *(f"-I{p}" for p in cpp_extension.include_paths()))
    link = (*(f"-L{p}" for p in lib_dirs), *(f"-Wl,-rpath,{p}" for p in lib_dirs),
            "-lc10", "-ltorch_cpu")
    return flags, link


def _load() -> ctypes.CDLL:
    flags, link = _build_flags()
    # the torch build is part of what the binary depends on (its headers and ABI)
    source = f"// torch {torch.__version__} {torch.version.git_version}\n{SOURCE}"
    path = build_library("qsparse_native_dispatch", source, flags, cxx=True, link_flags=link)
    torch.ops.load_library(str(path))  # registers the CPU kernels
    lib = ctypes.CDLL(str(path))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.qs_native_register_kernel.argtypes = [i64, i64, i64, i64, ptr]
    lib.qs_native_register_kernel.restype = i64
    lib.qs_native_register_layout.argtypes = [i64] * 8
    lib.qs_native_register_layout.restype = i64
    lib.qs_native_set_threads.argtypes = [i64, i64]
    lib.qs_native_set_threads.restype = None
    lib.qs_native_served.argtypes = []
    lib.qs_native_served.restype = i64
    return lib


def define_with_native_kernel(lib: torch.library.Library, schema: str, impl, fake) -> None:
    """Define the op of ``schema`` (``"name(...) -> ..."``) and ``<name>_python`` beside it,
    both with the Python implementation ``impl`` and the fake ``fake``.

    The public op's Python implementation serves the CPU through CompositeExplicitAutograd, so
    that the native kernel, once loaded, takes the CPU key without overriding a registration;
    ``<name>_python`` (the ``CPU`` key) is what the native kernel calls for what it does not
    take itself."""
    name = schema.split("(", 1)[0]
    lib.define(schema)
    lib.define(schema.replace(f"{name}(", f"{name}_python(", 1))
    lib.impl(name, impl, "CompositeExplicitAutograd")
    lib.impl(f"{name}_python", impl, "CPU")
    for op in (name, f"{name}_python"):
        torch.library.register_fake(f"{lib.ns}::{op}", fake, lib=lib)


def native_library() -> ctypes.CDLL | None:
    """The loaded native dispatch library (built at first use), or None where it cannot be
    built (warned once, with the compiler's message)."""
    lib = _state.get("lib")
    if lib is not None or "error" in _state:
        return lib  # type: ignore[return-value]
    with _lock:
        if "lib" not in _state and "error" not in _state:
            try:
                _state["lib"] = _load()
            except (OSError, RuntimeError) as exc:
                _state["error"] = exc
                warnings.warn(
                    f"qsparse: the native CPU kernels of the decode ops could not be built, so "
                    f"cpu_topk_linear / cpu_packed_linear run through Python (same results, "
                    f"~10 us more per call): {exc}", RuntimeWarning, stacklevel=3)
    return _state.get("lib")  # type: ignore[return-value]


def publish_kernel(op: str, fmt: str | None, dtype: torch.dtype, rows: int, fn) -> None:
    """Make the ctypes entry point ``fn`` of ``op`` (``fmt``: the packed format, None for
    ``cpu_topk_linear``) for ``rows`` rows of ``dtype`` callable by the native kernel."""
    lib = native_library()
    if lib is not None:
        address = ctypes.cast(fn, ctypes.c_void_p).value
        lib.qs_native_register_kernel(OP_CODES[op], -1 if fmt is None else FORMAT_CODES[fmt],
                                      DTYPE_CODES[dtype], rows, address)


def publish_layout(fmt: str, in_features: int, out_features: int, panel_bytes: int,
                   scale_offset: int, min_offset: int, padded_out: int, nbytes: int) -> None:
    """Publish the packed layout of ``(fmt, in_features, out_features)`` (its kernel offsets
    and the buffer size the native kernel checks ``packed`` against)."""
    lib = native_library()
    if lib is not None:
        lib.qs_native_register_layout(FORMAT_CODES[fmt], in_features, out_features,
                                      panel_bytes, scale_offset, min_offset, padded_out, nbytes)


def publish_threads(torch_threads: int, kernel_threads: int) -> None:
    """The kernels' thread count for ``torch_threads`` (the native kernel defers to Python
    whenever ``torch.get_num_threads()`` differs, so the policy is measured again)."""
    if _state.get("threads") == (torch_threads, kernel_threads):
        return  # already what the native kernel holds: a Python call costs one compare
    lib = native_library()
    if lib is not None:
        lib.qs_native_set_threads(torch_threads, kernel_threads)
        _state["threads"] = (torch_threads, kernel_threads)


def native_calls() -> int:
    """How many decode-op calls the native kernel has served itself in this process (0 where
    it is not loaded): the calls it deferred to the Python implementation are not counted."""
    lib = _state.get("lib")
    return 0 if lib is None else int(lib.qs_native_served())  # type: ignore[attr-defined]
