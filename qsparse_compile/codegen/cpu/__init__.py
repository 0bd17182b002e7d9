"""CPU kernels: C sources rendered per specialisation, built with the system compiler.

Importing this package registers ``torch.ops.qsparse.cpu_sparse_gemv`` (the decode-time
activation-sparse GEMV) and ``torch.ops.qsparse.cpu_topk_linear`` (top-K / N:M selection fused
into that GEMV, one call per group of projections sharing an input); kernels are compiled at
first call. :mod:`.cost_model` decides, from measurements on the running machine, whether a
projection should use them or stay dense.
"""

from .cost_model import choose_sparse
from .sparse_gemv_op import (
    MAX_TOKENS,
    cpu_sparse_gemv,
    prepare_weight,
    sparse_gemv,
    sparse_gemv_reference,
)
from .topk_linear_op import (
    cpu_topk_linear,
    prepare_group_weight,
    topk_linear,
    topk_linear_reference,
)

__all__ = [
    "MAX_TOKENS",
    "choose_sparse",
    "cpu_sparse_gemv",
    "prepare_weight",
    "sparse_gemv",
    "sparse_gemv_reference",
    "cpu_topk_linear",
    "prepare_group_weight",
    "topk_linear",
    "topk_linear_reference",
]
