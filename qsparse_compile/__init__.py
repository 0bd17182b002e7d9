"""qsparse-compile: make any PyTorch language model fully sparsely activated (Q-Sparse).

``torch.compile(model, backend="qsparse", options={"sparsity": 0.4})`` sparsifies the input of
every linear projection with top-K (straight-through for training) or block N:M; the operators
live in ``torch.ops.qsparse``; :mod:`qsparse_compile.reference` is the eager oracle.
"""

from . import ops  # noqa: F401  (registers torch.ops.qsparse)
from .calibrate import calibrate
from .calibration import Calibration
from .config import QSparseConfig, topk_count
from .export import sparsify_exported
from .functional import sparse_projection, sparsify
from .report import Report, report

__all__ = [
    "QSparseConfig",
    "topk_count",
    "sparsify",
    "sparse_projection",
    "sparsify_exported",
    "report",
    "Report",
    "calibrate",
    "Calibration",
]
__version__ = "0.1.0"
