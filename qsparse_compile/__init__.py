"""qsparse-compile: make any PyTorch language model fully sparsely activated (Q-Sparse).

``qsparse_compile.compile_model(model, sparsity=0.4)`` (or ``torch.compile(model,
backend="qsparse", options={"sparsity": 0.4})``) sparsifies the input of every linear
projection with top-K (straight-through for training) or block N:M; the operators live in
``torch.ops.qsparse``; :mod:`qsparse_compile.reference` is the eager oracle.

Importing the package registers the ops and nothing heavier: neither Inductor nor Triton is
imported until a graph is compiled, and the research tools (:mod:`.research`: scaling law,
calibration, sparsity measurement, models and data) only when used. ``calibrate`` and
``Calibration`` (rotations the compiler applies at runtime), ``calibrate_folded`` and
``FoldedRotations`` (rotations folded into a model's weights before compiling it:
``torch.compile(qc.calibrate_folded(model, batches).apply(model), backend="qsparse", ...)``)
are re-exported from there on first access.
"""

from typing import Any

from . import ops  # noqa: F401  (registers torch.ops.qsparse)
from .backend import Backend
from .compile_model import compile_model
from .config import QSparseConfig, topk_count
from .export import sparsify_exported
from .functional import sparse_projection, sparsify
from .options import CompileOptions
from .report import Report, report
from .rotations import Rotations

__all__ = [
    "Backend",
    "compile_model",
    "CompileOptions",
    "QSparseConfig",
    "Rotations",
    "topk_count",
    "sparsify",
    "sparse_projection",
    "sparsify_exported",
    "report",
    "Report",
    "calibrate",
    "Calibration",
    "calibrate_folded",
    "FoldedRotations",
]
__version__ = "0.1.0"

_RESEARCH = {"calibrate": "qsparse_compile.research.calibrate",
             "Calibration": "qsparse_compile.research.calibration",
             "calibrate_folded": "qsparse_compile.research.folded_rotations",
             "FoldedRotations": "qsparse_compile.research.folded_rotations"}


def __getattr__(name: str) -> Any:
    """The research re-exports (``calibrate``, ``calibrate_folded``, ...), imported on first
    access."""
    if name in _RESEARCH:
        import importlib

        return getattr(importlib.import_module(_RESEARCH[name]), name)
    raise AttributeError(f"module 'qsparse_compile' has no attribute {name!r}")
