"""The ``qsparse`` operator library: custom ops registered with ``torch.library``.

Importing this package registers ``torch.ops.qsparse.*``: ``topk_mask``, ``block_mask``,
``topk_sparsify``, ``block_sparsify``, ``int8_fake_quant``, ``ternary_fake_quant``,
``int8_weight_fake_quant``, ``int4_weight_fake_quant`` (the inference weight formats),
``sparse_linear``, ``block_sparse_linear`` (``sparse_linear`` on an input masked N:M, which
CUDA may run as a 2:4 semi-structured product) and ``norm_sparsify`` (fused norm + sparsify +
quant). Each has a CPU implementation, a fake (meta) implementation for tracing, and an
autograd formula (straight-through for the sparsifiers and quantizers), and an autocast rule
(:mod:`.autocast`: inside ``torch.autocast`` they compute as ``F.linear`` would).
``sharded_topk_sparsify`` is the exact top-K of rows sharded across tensor-parallel ranks
(:mod:`.sharded`; inference only, no autograd).
"""

from . import autocast  # noqa: F401  (registers the autocast rules)
from .block_linear import block_sparse_linear
from .linear import sparse_linear
from .mask import block_mask, topk_mask
from .norm_sparsify import norm_sparsify
from .quant import (
    int4_weight_fake_quant,
    int8_fake_quant,
    int8_weight_fake_quant,
    ternary_fake_quant,
)
from .sharded import sharded_topk_sparsify
from .sparsify import block_sparsify, topk_sparsify

__all__ = [
    "topk_mask",
    "block_mask",
    "topk_sparsify",
    "block_sparsify",
    "int8_fake_quant",
    "ternary_fake_quant",
    "int8_weight_fake_quant",
    "int4_weight_fake_quant",
    "sparse_linear",
    "block_sparse_linear",
    "norm_sparsify",
    "sharded_topk_sparsify",
]
