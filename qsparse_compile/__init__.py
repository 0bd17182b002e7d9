"""qsparse-compile: make any PyTorch language model fully sparsely activated (Q-Sparse).

``torch.compile(model, backend="qsparse", options={"sparsity": 0.4})`` sparsifies the input of
every linear projection with top-K (straight-through for training) or block N:M; the operators
live in ``torch.ops.qsparse``; :mod:`qsparse_compile.reference` is the eager oracle.
"""

from . import ops  # noqa: F401  (registers torch.ops.qsparse)
from .config import QSparseConfig, topk_count
from .functional import sparse_projection, sparsify

__all__ = ["QSparseConfig", "topk_count", "sparsify", "sparse_projection"]
__version__ = "0.1.0"
