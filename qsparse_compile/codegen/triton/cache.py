"""Rendered Triton sources as real files in an on-disk cache, imported as ordinary modules.

Triton's ``@triton.jit`` reads a kernel's source with :func:`inspect.getsource`, so a kernel
rendered into a string cannot simply be ``exec``-ed: it has to live in a file that a module was
imported from. Each rendered source is written once to
``<cache>/triton/<name>-<hash>.py`` where the hash covers the full text, so a changed template
(or a changed specialisation) can never pick up a stale file, and then imported under a private
module name.

Cache directory: ``$QSPARSE_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/qsparse_compile`` (default
``~/.cache/qsparse_compile``), as for the CPU kernels; this module uses its ``triton/``
subdirectory.

Concurrency: every writer writes a private temporary file in the same directory and renames it
into place (``os.replace`` is atomic on POSIX), so a process importing the file sees either no
file or the complete one; two processes rendering the same kernel write identical bytes.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import sys
import tempfile
import threading
from pathlib import Path
from types import ModuleType

from ..cache_root import cache_root

__all__ = ["cache_dir", "source_path", "load_module"]

#: Prefix of the names under which rendered modules are registered in ``sys.modules``.
MODULE_PREFIX = "qsparse_compile_triton_kernels"

_lock = threading.Lock()
_modules: dict[Path, ModuleType] = {}


def cache_dir() -> Path:
    """The directory holding rendered Triton sources (created on first write)."""
    return cache_root() / "triton"


def source_path(name: str, source: str) -> Path:
    """Where the source ``source`` of kernel ``name`` is (or will be) cached."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ValueError(f"kernel name must be a Python identifier, got {name!r}")
    digest = hashlib.sha256(source.encode()).hexdigest()[:20]
    return cache_dir() / f"{name}-{digest}.py"


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the file from other users of a cache
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def load_module(name: str, source: str) -> ModuleType:
    """Write ``source`` to the cache (unless an identical file is there) and import it.

    Args:
        name: a Python identifier naming the kernel family and specialisation; it prefixes the
            file name so a cache directory listing is readable.
        source: the full text of a Python module defining the ``@triton.jit`` kernels.

    Returns:
        The imported module; the same object for every call with the same source in a process.
    """
    path = source_path(name, source)
    module = _modules.get(path)
    if module is not None:
        return module
    with _lock:
        module = _modules.get(path)
        if module is not None:
            return module
        # A file whose text differs (truncated by a crash outside our atomic write, or edited
        # by hand) is rewritten: the name promises exactly this source.
        try:
            current = path.read_text(encoding="utf-8")
        except (FileNotFoundError, UnicodeDecodeError):
            current = None
        if current != source:
            _atomic_write(path, source)
        module_name = f"{MODULE_PREFIX}.{path.stem.replace('-', '_')}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:  # pragma: no cover - a .py path always loads
            raise ImportError(f"cannot import rendered Triton kernel from {path}")
        module = importlib.util.module_from_spec(spec)
        # Registered before execution: Triton resolves a kernel's globals through its module.
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(module_name, None)
            raise
        _modules[path] = module
        return module
