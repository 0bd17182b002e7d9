"""The directory under which generated kernels (and their measurements) are cached.

``$QSPARSE_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/qsparse_compile`` (default
``~/.cache/qsparse_compile``). Each code generator keeps its files in its own subdirectory.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """The cache root, read from the environment on every call (tests redirect it)."""
    root = os.environ.get("QSPARSE_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "qsparse_compile"
