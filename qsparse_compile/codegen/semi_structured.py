"""2:4 semi-structured sparse matmul with the *activation* as the sparse operand (prefill).

A projection ``y = X W^T`` whose input ``X`` (``[rows, D]``) keeps at most 2 of every 4
consecutive features can run on the sparse tensor cores of sm80+ GPUs through PyTorch's
semi-structured sparse tensors. Operand layout: ``to_sparse_semi_structured(A)`` requires the
2:4 pattern along the *rows* of ``A`` (within each row, every aligned group of 4 columns), and
supports ``A_sparse @ B_dense``. The N:M mask lies along ``X``'s feature dimension, i.e. along
its rows, so ``X`` itself (not ``X^T``, whose rows run over tokens) is the operand to compress,
and::

    y = (W X^T)^T = X_sparse @ W^T

``W^T`` is a transposed view of the stored weight (no copy; the sparse kernels take a
column-major dense operand). The rows of ``X`` are padded with zero rows (trivially 2:4) to the
backend's row multiple; the bias is added after the product, because PyTorch's semi-structured
``addmm`` only takes a bias when the sparse operand is the second one.

:func:`semi_structured_supported` is the capability gate; :func:`semi_structured_linear` the
product. **The semi-structured branch runs only on a GPU**: on a machine without CUDA the gate
is False and callers take the dense product on the masked input
(``qsparse::block_sparse_linear``'s CPU implementation), which is what the tests exercise there.
Importing this module registers :func:`cuda_block_sparse_linear` as the op's CUDA
implementation; the N:M prefill lowering imports it where it retargets a projection.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import ops  # noqa: F401  (registers torch.ops.qsparse)
from ..ops.block_linear import check_block_linear

__all__ = [
    "DTYPES",
    "cuda_block_sparse_linear",
    "MIN_CAPABILITY",
    "pattern_fits_2_4",
    "semi_structured_eligible",
    "semi_structured_linear",
    "semi_structured_supported",
]

#: Element types the 2:4 kernels take for this use (fp32 has no sparse tensor-core path).
DTYPES = (torch.float16, torch.bfloat16)

#: Sparse tensor cores first appear in Ampere (sm80).
MIN_CAPABILITY = (8, 0)

#: (rows multiple, columns multiple) of the sparse operand when PyTorch cannot be asked.
_FALLBACK_SHAPE = (32, 64)


def pattern_fits_2_4(n: int, m: int) -> bool:
    """Whether an ``n:m`` mask keeps at most 2 of every aligned group of 4 features.

    True for 2:4 itself and for patterns that imply it (1:2, 1:4, 2:8, 1:8, ...); False for
    16:32 (16 kept entries of a group of 32 may fill aligned 4-groups) and 3:4.
    """
    if not 1 <= n <= m:
        return False
    if m % 4 == 0:  # the worst case puts all n kept entries of one group into 4-groups
        return n <= 2
    if 4 % m == 0:  # a 4-group holds 4 / m whole groups of m
        return n * (4 // m) <= 2
    return False  # groups straddle 4-group boundaries (m = 3, 6, ...): no guarantee


def _backend_class() -> type | None:
    """The semi-structured tensor class :func:`torch.sparse.to_sparse_semi_structured` picks,
    CUTLASS where cuSPARSELt is missing; None where this PyTorch has neither."""
    sparse = torch.sparse
    cutlass = getattr(sparse, "SparseSemiStructuredTensorCUTLASS", None)
    cusparselt = getattr(sparse, "SparseSemiStructuredTensorCUSPARSELT", None)
    base = getattr(sparse, "SparseSemiStructuredTensor", None)
    if cutlass is None or base is None:
        return None
    backends = getattr(torch.backends, "cusparselt", None)
    has_cusparselt = backends is not None and backends.is_available()
    if getattr(base, "_FORCE_CUTLASS", False) or not has_cusparselt or cusparselt is None:
        return cutlass
    return cusparselt


def _shape_multiple(cls: type | None, dtype: torch.dtype) -> tuple[int, int]:
    """(rows, columns) multiple the sparse operand of ``dtype`` needs for ``cls``."""
    constraints = getattr(cls, "_DTYPE_SHAPE_CONSTRAINTS", {}).get(dtype)
    if constraints is None:
        return _FALLBACK_SHAPE
    return int(constraints.sparse_min_rows), int(constraints.sparse_min_cols)


def semi_structured_eligible(*, device_type: str, capability: tuple[int, int] | None,
                             dtype: torch.dtype, weight_dtype: torch.dtype, rows: int,
                             in_features: int, n: int, m: int, hip: bool = False,
                             min_rows: int = _FALLBACK_SHAPE[0],
                             min_cols: int = _FALLBACK_SHAPE[1]) -> bool:
    """The gate as a pure function of what it depends on (unit-tested without a GPU).

    Args:
        device_type: the activation's device type; only ``"cuda"`` qualifies.
        capability: the device's compute capability (major, minor); sm80+ qualifies.
        dtype, weight_dtype: activation and weight element types; equal, fp16 or bf16.
        rows: tokens per call (product of ``x``'s leading dimensions); at least ``min_rows``,
            the backend's row multiple: fewer rows is decode, where padding to that multiple
            would waste the sparse product (rows beyond a multiple are padded with zeros).
        in_features: the feature dimension ``D``; a positive multiple of ``min_cols``.
        n, m: the mask's pattern; it must imply 2:4 (:func:`pattern_fits_2_4`).
        hip: whether the device is a ROCm one (its semi-structured support differs): refused.
        min_rows, min_cols: the backend's row and column multiples for the sparse operand.
    """
    return (device_type == "cuda" and not hip and capability is not None
            and tuple(capability) >= MIN_CAPABILITY
            and dtype in DTYPES and weight_dtype == dtype and rows >= min_rows
            and in_features >= min_cols and in_features % min_cols == 0
            and pattern_fits_2_4(n, m))


def semi_structured_supported(x: torch.Tensor, weight: torch.Tensor, n: int, m: int) -> bool:
    """Whether ``x @ weight^T`` with ``x`` masked ``n:m`` can use the 2:4 sparse matmul here.

    False on any CPU tensor, before sm80, for fp32/fp64, for patterns that do not imply 2:4,
    for decode-sized calls and feature widths the kernels do not accept, and where PyTorch
    lacks semi-structured tensors.
    """
    if not (x.is_cuda and weight.is_cuda and x.device == weight.device):
        return False
    cls = _backend_class()
    if cls is None or weight.dim() != 2 or x.dim() < 1:
        return False
    min_rows, min_cols = _shape_multiple(cls, x.dtype)
    return semi_structured_eligible(
        device_type=x.device.type, capability=torch.cuda.get_device_capability(x.device),
        dtype=x.dtype, weight_dtype=weight.dtype, rows=math.prod(x.shape[:-1]),
        in_features=int(x.shape[-1]), n=n, m=m, hip=torch.version.hip is not None,
        min_rows=min_rows, min_cols=min_cols)


def semi_structured_linear(x: torch.Tensor, weight: torch.Tensor,
                           bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight^T + bias`` with ``x`` compressed 2:4 along its feature dimension.

    Only call it where :func:`semi_structured_supported` holds (a CUDA GPU, sm80+); ``x`` must
    keep at most 2 of every 4 features (not checked here: compression would silently drop
    the excess entries). Runs only on a GPU.
    """
    cls = _backend_class()
    if cls is None:
        raise RuntimeError("semi_structured_linear: this PyTorch has no semi-structured "
                           "sparse tensors (torch.sparse.SparseSemiStructuredTensor)")
    d = x.shape[-1]
    x2 = x.reshape(-1, d)
    rows = x2.shape[0]
    pad = (-rows) % _shape_multiple(cls, x.dtype)[0]
    if pad:
        x2 = F.pad(x2, (0, 0, 0, pad))
    sparse_x = cls.from_dense(x2.contiguous())
    y = torch.mm(sparse_x, weight.t())[:rows]
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], weight.shape[0])


def cuda_block_sparse_linear(x: torch.Tensor, weight: torch.Tensor,
                             bias: torch.Tensor | None, n: int, m: int) -> torch.Tensor:
    """``qsparse::block_sparse_linear`` on CUDA: semi-structured where the gate allows, else
    the dense product. A plain function, so its fallback branch is tested without a GPU."""
    check_block_linear(x, weight, bias, n, m)
    if semi_structured_supported(x, weight, n, m):
        return semi_structured_linear(x, weight, bias)
    return F.linear(x, weight, bias)


# the kernel registers onto the op (importing this module is what selects it for CUDA)
torch.library.register_kernel("qsparse::block_sparse_linear", "cuda", cuda_block_sparse_linear)
