"""CPU kernels: C sources rendered per specialisation, built with the system compiler.

Importing this package registers ``torch.ops.qsparse.cpu_topk_linear`` (top-K / N:M selection
fused into a decode-time sparse GEMV, one call per group of projections sharing an input);
kernels are compiled at first call. :mod:`.cost_model` decides, from measurements on the
running machine, whether a group should use it or take its fallback.
"""

from .cost_model import choose_sparse
from .topk_linear_op import (
    cpu_topk_linear,
    prepare_group_weight,
    topk_linear,
    topk_linear_reference,
)

__all__ = [
    "choose_sparse",
    "cpu_topk_linear",
    "prepare_group_weight",
    "topk_linear",
    "topk_linear_reference",
]
