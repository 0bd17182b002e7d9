"""Functional entry points: sparsify a tensor or run one projection with a config's semantics.

These validate their options exactly as :class:`QSparseConfig` does, compute ``k`` once in
Python (DESIGN.md point 1) and call the ``qsparse`` ops through :mod:`qsparse_compile.plan`,
the same composition the graph rewrite inserts (:data:`QSPARSE_OPS` on FX proxies).
"""

from __future__ import annotations

import torch

from . import ops  # noqa: F401  (registers torch.ops.qsparse)
from . import plan as plan_module
from .config import ProjectionPlan, QSparseConfig
from .ops.checks import check_float

__all__ = ["QSPARSE_OPS", "sparse_projection", "sparsify"]

qsparse = torch.ops.qsparse


class _QSparseOps:
    """The ``qsparse`` ops as the elementary operations of :mod:`qsparse_compile.plan`.

    Each calls the op's default overload, so applied to FX proxies it records exactly the node
    an exported program or a rewritten graph holds.
    """

    @staticmethod
    def topk(x, k, rescale, ste):
        return qsparse.topk_sparsify.default(x, k, rescale, ste)

    @staticmethod
    def block(x, n, m, rescale, ste):
        return qsparse.block_sparsify.default(x, n, m, rescale, ste)

    @staticmethod
    def relu(x):
        return torch.ops.aten.relu.default(x)

    @staticmethod
    def int8(x):
        return qsparse.int8_fake_quant.default(x)

    @staticmethod
    def ternary(w):
        return qsparse.ternary_fake_quant.default(w)

    @staticmethod
    def weights(w, fmt, in_dim):
        op = {"int8": qsparse.int8_weight_fake_quant, "int4": qsparse.int4_weight_fake_quant}
        return op[fmt].default(w, in_dim)

    @staticmethod
    def linear(x, w, b):
        return qsparse.sparse_linear.default(x, w, b)


#: The ``qsparse`` ops, for :func:`qsparse_compile.plan.sparsify_input` / ``project``.
QSPARSE_OPS = _QSparseOps()


def sparsify(x: torch.Tensor, sparsity: float | None = None, **options) -> torch.Tensor:
    """Sparsify the last dimension of ``x`` as a projection input would be.

    ``sparsity`` and ``options`` are :class:`QSparseConfig` options (``method``, ``block``,
    ``rescale``, ``quant``, ``ste``). Example::

        y = sparsify(x, 0.5)                               # top-K, keep half of each row
        y = sparsify(x, method="block", block=(2, 4))      # 2:4
    """
    config = QSparseConfig.from_options(options, sparsity=sparsity)
    check_float("sparsify", "x", x)  # also when the plan is dense: no silent pass-through
    return plan_module.sparsify_input(x, config.plan_for(""), config, QSPARSE_OPS, x.shape[-1])


def sparse_projection(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      plan: ProjectionPlan, config: QSparseConfig) -> torch.Tensor:
    """``sparsify(x) @ W^T + b`` with the config's semantics (ternary weights for bitnet)."""
    if plan.dense:
        return torch.nn.functional.linear(x, weight, bias)
    return plan_module.project(x, weight, bias, plan, config, QSPARSE_OPS, x.shape[-1])
