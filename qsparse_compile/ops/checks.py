"""Argument checks shared by the qsparse ops: clear errors instead of wrong numbers."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_float(op: str, name: str, t: torch.Tensor) -> None:
    """Raise TypeError unless ``t`` has a floating dtype the ops support."""
    if t.dtype not in FLOAT_DTYPES:
        allowed = ", ".join(str(d).replace("torch.", "") for d in FLOAT_DTYPES)
        raise TypeError(
            f"qsparse.{op}: input {name!r} must be a floating tensor ({allowed}), "
            f"got dtype {str(t.dtype).replace('torch.', '')}"
        )


def check_k(op: str, k: int, dim: int) -> None:
    """Raise ValueError unless ``1 <= k <= dim`` (k is the number of entries kept per row)."""
    if not 1 <= k <= dim:
        raise ValueError(
            f"qsparse.{op}: k (entries kept per row) must be in [1, {dim}] for a last "
            f"dimension of {dim}, got k={k}"
        )


def check_block(op: str, n: int, m: int, dim: int) -> None:
    """Raise ValueError unless ``1 <= n <= m`` and ``m`` divides the last dimension."""
    if not 1 <= n <= m:
        raise ValueError(
            f"qsparse.{op}: block (n, m) must satisfy 1 <= n <= m (keep n of every m), "
            f"got ({n}, {m})"
        )
    if dim % m:
        raise ValueError(
            f"qsparse.{op}: the last dimension ({dim}) must be a multiple of m={m} "
            f"for block {n}:{m} sparsity"
        )
