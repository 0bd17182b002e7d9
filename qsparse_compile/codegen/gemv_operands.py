"""Validation of the operands every sparse GEMV op shares: ``x [..., in]``, ``W^T [in, out]``,
bias.

The CPU ops (:mod:`.cpu.sparse_gemv_op`, :mod:`.cpu.topk_linear_op`) and the Triton GEMV
(:mod:`.triton.gemv`) take the weight K-major, prepared once by a helper; a wrongly laid-out or
mistyped operand must fail with the op's name and the shapes given, never reach a kernel.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def check_gemv_operands(op: str, x: torch.Tensor, weight_t: torch.Tensor,
                        bias: torch.Tensor | None, dtypes: Iterable[torch.dtype],
                        prepare: str) -> None:
    """Raise ``TypeError``/``ValueError`` naming ``op`` unless the operands fit.

    ``dtypes`` are the dtypes the kernel supports; ``prepare`` names the helper that lays out
    ``weight_t`` (quoted in the shape error).
    """
    dtypes = tuple(dtypes)
    for label, t in (("x", x), ("weight_t", weight_t), ("bias", bias)):
        if t is not None and t.dtype not in dtypes:
            allowed = ", ".join(str(d) for d in dtypes)
            raise TypeError(f"{op}: {label} has dtype {t.dtype}; allowed: {allowed}")
    if weight_t.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(
            f"{op}: x, weight_t and bias must share a dtype, got x {x.dtype}, "
            f"weight_t {weight_t.dtype}, bias {None if bias is None else bias.dtype}"
        )
    if weight_t.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight_t.shape[0]:
        raise ValueError(
            f"{op}: expected x [..., in_features] and weight_t [in_features, out_features] "
            f"(W^T, see {prepare}), got x {tuple(x.shape)} and weight_t "
            f"{tuple(weight_t.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight_t.shape[1],):
        raise ValueError(
            f"{op}: bias must have shape ({weight_t.shape[1]},) (out_features), "
            f"got {tuple(bias.shape)}"
        )
