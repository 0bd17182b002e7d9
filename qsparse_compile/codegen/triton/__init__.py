"""Triton kernels: templates rendered per specialisation, cached on disk, registered as ops.

Importing this package imports Triton and registers ``torch.ops.qsparse_triton.*`` (see
:mod:`.ops`); nothing else in ``qsparse_compile`` imports it, so the compiler works without
Triton. The kernels run on CUDA devices, and on CPU tensors under ``TRITON_INTERPRET=1`` (set
before Triton is imported), which is how the tests check them.

* :mod:`.row_template` / :mod:`.row_sparsify` / :mod:`.fused_norm`: top-K and N:M sparsify and
  mask, optionally behind a fused RMSNorm / LayerNorm and followed by L2 rescale and int8
  fake-quant (one kernel per row);
* :mod:`.gemv_template` / :mod:`.gemv`: decode GEMV for 1-8 tokens over a K-major weight,
  skipping the weight rows of zeroed activations;
* :mod:`.packed_gemv_template` / :mod:`.packed_gemv`: the same over int8 / int4 / ternary
  weights packed K-major, dequantised in registers (the function is
  ``packed_gemv.packed_gemv``: the package attribute ``packed_gemv`` stays the module);
  :mod:`.split_reduce_template`: the split-K reduction both GEMVs render;
* :mod:`.ops`: the ``torch.library`` registrations; :mod:`.launch`: ``wrap_triton`` launches;
* :mod:`.cache`: the on-disk cache of rendered sources;
* :mod:`.compile_check`: compiles the kernels for a CUDA target on a machine without a GPU.
"""

from . import ops
from .fused_norm import norm_sparsify, norm_sparsify_reference
from .gemv import prepare_weight, sparse_gemv, sparse_gemv_reference
from .packed_gemv import packed_gemv_reference, prepare_packed_weight
from .row_sparsify import (
    block_mask,
    block_sparsify,
    block_sparsify_reference,
    topk_mask,
    topk_sparsify,
    topk_sparsify_reference,
)

__all__ = [
    "ops",
    "topk_sparsify",
    "topk_mask",
    "block_sparsify",
    "block_mask",
    "norm_sparsify",
    "sparse_gemv",
    "prepare_weight",
    "prepare_packed_weight",
    "topk_sparsify_reference",
    "block_sparsify_reference",
    "norm_sparsify_reference",
    "sparse_gemv_reference",
    "packed_gemv_reference",
]
