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


def check_linear_operands(op: str, x: torch.Tensor, weight: torch.Tensor,
                          bias: torch.Tensor | None) -> None:
    """Raise unless ``x [..., in]``, ``weight [out, in]`` and ``bias [out]`` fit one product."""
    check_float(op, "x", x)
    check_float(op, "weight", weight)
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"qsparse.{op}: expected x [..., in_features] and weight "
            f"[out_features, in_features], got x {tuple(x.shape)} and weight {tuple(weight.shape)}"
        )
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(
            f"qsparse.{op}: x, weight and bias must share a dtype, got "
            f"{x.dtype}, {weight.dtype}, {None if bias is None else bias.dtype}"
        )
