"""Functional entry points: sparsify a tensor or run one projection with a config's semantics.

These validate their options exactly as :class:`QSparseConfig` does, compute ``k`` once in
Python (DESIGN.md point 1) and call the ``qsparse`` ops, so they are what the compiler inserts.
"""

from __future__ import annotations

import torch

from . import ops  # noqa: F401  (registers torch.ops.qsparse)
from .config import ProjectionPlan, QSparseConfig, topk_count
from .ops.checks import check_float

qsparse = torch.ops.qsparse


def sparsify_with_plan(x: torch.Tensor, plan: ProjectionPlan,
                       config: QSparseConfig) -> torch.Tensor:
    """Sparsify (and, if configured, int8-quantize) a projection input as ``plan`` says."""
    rescale = config.rescale == "l2"
    if plan.method == "block":
        n, m = plan.block
        out = qsparse.block_sparsify(x, n, m, rescale, config.ste)
    elif plan.method == "relu":
        out = torch.relu(x)
    elif plan.method == "topk":
        out = qsparse.topk_sparsify(x, topk_count(x.shape[-1], plan.sparsity), rescale, config.ste)
    else:
        out = x
    if plan.quant in ("int8", "bitnet"):
        out = qsparse.int8_fake_quant(out)
    return out


def sparsify(x: torch.Tensor, sparsity: float | None = None, **options) -> torch.Tensor:
    """Sparsify the last dimension of ``x`` as a projection input would be.

    ``sparsity`` and ``options`` are :class:`QSparseConfig` options (``method``, ``block``,
    ``rescale``, ``quant``, ``ste``). Example::

        y = sparsify(x, 0.5)                               # top-K, keep half of each row
        y = sparsify(x, method="block", block=(2, 4))      # 2:4
    """
    config = QSparseConfig.from_options(options, sparsity=sparsity)
    check_float("sparsify", "x", x)  # also when the plan is dense: no silent pass-through
    return sparsify_with_plan(x, config.plan_for(""), config)


def sparse_projection(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      plan: ProjectionPlan, config: QSparseConfig) -> torch.Tensor:
    """``sparsify(x) @ W^T + b`` with the config's semantics (ternary weights for bitnet)."""
    if plan.dense:
        return torch.nn.functional.linear(x, weight, bias)
    if plan.quant == "bitnet":
        weight = qsparse.ternary_fake_quant(weight)
    return qsparse.sparse_linear(sparsify_with_plan(x, plan, config), weight, bias)
