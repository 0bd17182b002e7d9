"""Build rendered C sources into shared libraries with the system compiler, cached on disk.

The flow mirrors how Inductor handles its CPU code: the source is written to a real file in a
cache directory whose name is a hash of everything that determines the binary (source, compiler,
flags, host CPU), compiled once with ``cc -O3 -march=native -fopenmp -shared -fPIC``, and loaded
with :mod:`ctypes`. The kernels include no torch headers, so a build takes well under a second.

Cache directory: ``$QSPARSE_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/qsparse_compile`` (default
``~/.cache/qsparse_compile``); this module uses its ``cpu/`` subdirectory.

Two processes may build the same kernel at the same time: each writes to its own temporary file
and renames it into place (``os.replace`` is atomic on POSIX), so a reader sees either no library
or a complete one, and both load identical binaries.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

from ..cache_root import cache_root

__all__ = [
    "CompilerNotFoundError",
    "cache_dir",
    "load_entry_point",
    "find_compiler",
    "find_cxx_compiler",
    "build_library",
    "host_fingerprint",
    "load_library",
]

#: Optimisation flags. ``-march=native`` is what makes the build host-specific, so the host's CPU
#: flags are part of the cache key (a cache on a shared home directory must not hand an AVX-512
#: binary to an AVX2 machine).
BASE_FLAGS: tuple[str, ...] = ("-O3", "-march=native", "-std=c11", "-shared", "-fPIC")
OPENMP_FLAGS: tuple[str, ...] = ("-fopenmp",)

_COMPILER_CANDIDATES = ("cc", "gcc", "clang")
_CXX_CANDIDATES = ("c++", "g++", "clang++")
_lock = threading.Lock()


class CompilerNotFoundError(RuntimeError):
    """No C compiler could be found to build a CPU kernel."""


def cache_dir() -> Path:
    """The directory holding the rendered sources and built libraries of the CPU kernels."""
    return cache_root() / "cpu"


def _find(variable: str, candidates: tuple[str, ...], language: str) -> str:
    env = os.environ.get(variable)
    if env:
        found = shutil.which(env)
        if found is None:
            raise CompilerNotFoundError(
                f"${variable} is set to {env!r}, which is not an executable on PATH; set "
                f"{variable} to a {language} compiler or unset it to use one of "
                f"{', '.join(candidates)}"
            )
        return found
    for name in candidates:
        found = shutil.which(name)
        if found is not None:
            return found
    raise CompilerNotFoundError(
        f"qsparse_compile CPU kernels need a {language} compiler to build at first use, but "
        f"none of {', '.join(candidates)} is on PATH and ${variable} is not set; install gcc "
        f"(e.g. `apt-get install {'g++' if language == 'C++' else 'gcc'}`) or set {variable}"
    )


def find_compiler() -> str:
    """The path of the C compiler: ``$CC`` if set, else the first of cc, gcc, clang on PATH."""
    return _find("CC", _COMPILER_CANDIDATES, "C")


def find_cxx_compiler() -> str:
    """The path of the C++ compiler: ``$CXX`` if set, else the first of c++, g++, clang++."""
    return _find("CXX", _CXX_CANDIDATES, "C++")


@functools.lru_cache(maxsize=1)
def host_fingerprint() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        import platform

        return platform.machine() + platform.processor()
    keep = [line for line in text.splitlines() if line.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(keep)))


@functools.lru_cache(maxsize=8)
def _compiler_identity(compiler: str) -> str:
    """The compiler's version banner, so upgrading the compiler rebuilds the kernels."""
    try:
        done = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30)
        return done.stdout.splitlines()[0] if done.stdout else compiler
    except (OSError, subprocess.SubprocessError):
        return compiler


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _build(compiler: str, source: Path, target: Path, flags: tuple[str, ...],
           link_flags: tuple[str, ...]) -> None:
    """Compile ``source`` to a temporary library beside ``target``, then rename it into place."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".so")
    os.close(fd)
    try:
        cmd = [compiler, *flags, str(source), "-o", tmp, *link_flags]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(
                f"building CPU kernel {source.name} failed (exit {done.returncode}): "
                f"{' '.join(cmd)}\n{done.stderr.strip()}"
            )
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _library_path(name: str, source: str, compiler: str, flags: tuple[str, ...]) -> Path:
    key = hashlib.sha256(
        "\0".join(
            [source, compiler, _compiler_identity(compiler), *flags, host_fingerprint()]
        ).encode()
    ).hexdigest()[:20]
    return cache_dir() / f"{name}-{key}.so"


def build_library(name: str, source: str, flags: tuple[str, ...] | None = None, *,
                  cxx: bool = False, link_flags: tuple[str, ...] = ()) -> Path:
    """Compile ``source`` into the cache (unless already there) and return the library's path.

    Safe to call from several threads or processes at once: each builds into its own temporary
    file and renames it into place, so the cache only ever holds complete libraries.

    Args:
        name: a file-name-safe label (the kernel's specialisation name).
        source: the complete C translation unit.
        flags: compiler flags; default ``BASE_FLAGS + OPENMP_FLAGS``.
        cxx: ``source`` is C++ (built with :func:`find_cxx_compiler`, kept as ``.cpp``).
        link_flags: flags after the source (libraries to link).
    """
    flags = BASE_FLAGS + OPENMP_FLAGS if flags is None else tuple(flags)
    compiler = find_cxx_compiler() if cxx else find_compiler()
    lib_path = _library_path(name, source, compiler, flags + tuple(link_flags))
    if lib_path.exists():
        return lib_path
    lib_path.parent.mkdir(parents=True, exist_ok=True)
    src_path = lib_path.with_suffix(".cpp" if cxx else ".c")
    if not src_path.exists():
        _atomic_write(src_path, source.encode())
    _build(compiler, src_path, lib_path, flags, tuple(link_flags))
    return lib_path


@functools.cache
def _load_cached(name: str, source: str) -> ctypes.CDLL:
    try:
        return ctypes.CDLL(str(build_library(name, source)))
    except CompilerNotFoundError:
        raise
    except RuntimeError:
        # A compiler without OpenMP support (e.g. clang lacking libomp) still yields a correct
        # single-threaded kernel: the OpenMP pragmas and calls are guarded by _OPENMP.
        path = build_library(name, source, BASE_FLAGS)
        warnings.warn(
            f"CPU kernel {name} was built without OpenMP (the compiler rejected -fopenmp) "
            "and runs single-threaded",
            RuntimeWarning,
            stacklevel=4,
        )
        return ctypes.CDLL(str(path))


def load_library(name: str, source: str) -> ctypes.CDLL:
    """Build (at first use, then from the disk cache) and load the C ``source``.

    Args:
        name: a file-name-safe label for the library (the kernel's specialisation name).
        source: the complete C translation unit.

    Returns:
        The loaded library; the same object for the same ``(name, source)`` within a process.

    Raises:
        CompilerNotFoundError: no C compiler is available.
        RuntimeError: the compiler rejected the source (the message holds its diagnostics).
    """
    with _lock:
        return _load_cached(name, source)


def load_entry_point(name: str, source: str, argtypes: list) -> Callable[..., int]:
    """The C function ``name`` of ``source`` (:func:`load_library`), typed for ctypes.

    Every kernel entry point returns an ``int64`` status; ``argtypes`` are its parameters.
    """
    fn = getattr(load_library(name, source), name)
    fn.argtypes = argtypes
    fn.restype = ctypes.c_int64
    return fn
