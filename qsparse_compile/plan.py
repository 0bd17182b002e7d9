"""What a plan does to a projection's input: the one place the semantics are composed.

A :class:`~qsparse_compile.config.ProjectionPlan` says how one projection's input is treated
(top-K, block N:M, ReLU or nothing; then int8 or not; ternary weights or not). Three clients
apply plans and must agree exactly:

* the eager oracle (:mod:`qsparse_compile.reference`), with its own sort-based masks;
* the functional API (:mod:`qsparse_compile.functional`), with the ``qsparse`` ops;
* the graph rewrite (:mod:`qsparse_compile.passes.rewrite`), which calls the same ``qsparse``
  ops on FX proxies, so the nodes it inserts are what the functional API would run.

They differ only in the operations they pass in (an :class:`SparsifyOps`); the composition
(sparsify, then quantize the kept values; ternary weights for ``bitnet``; the weight format's
dequantised values for ``weights=``) is written once, here.
"""

from __future__ import annotations

import warnings
from typing import Any, Protocol

from .config import ProjectionPlan, QSparseConfig, topk_count

__all__ = ["ResolvedPlan", "SparsifyOps", "project", "project_sparsified", "resolve_plan",
           "sparsify_input"]


class SparsifyOps(Protocol):
    """The elementary operations a plan is composed of (DESIGN.md points 2-6).

    ``rescale`` is the L2 rescale of point 4 (a bool); ``ste`` the straight-through choice of
    point 7. Arguments may be tensors or FX proxies.
    """

    def topk(self, x: Any, k: int, rescale: bool, ste: bool) -> Any: ...

    def block(self, x: Any, n: int, m: int, rescale: bool, ste: bool) -> Any: ...

    def relu(self, x: Any) -> Any: ...

    def int8(self, x: Any) -> Any: ...

    def ternary(self, w: Any) -> Any: ...

    def weights(self, w: Any, fmt: str, in_dim: int) -> Any: ...

    def linear(self, x: Any, w: Any, b: Any) -> Any: ...


def sparsify_input(x: Any, plan: ProjectionPlan, config: QSparseConfig, ops: SparsifyOps,
                   dim: int) -> Any:
    """A projection input as the product sees it: sparsified by ``plan``, then quantized.

    ``dim`` is the input width ``D`` (the last dimension of ``x``); top-K keeps
    ``topk_count(D, plan.sparsity)`` entries per row.
    """
    rescale = config.rescale == "l2"
    if plan.method == "block":
        n, m = plan.block
        out = ops.block(x, n, m, rescale, config.ste)
    elif plan.method == "relu":
        out = ops.relu(x)  # the baseline: an ordinary ReLU, ordinary gradient
    elif plan.method == "topk":
        out = ops.topk(x, topk_count(dim, plan.sparsity), rescale, config.ste)
    else:
        out = x  # not sparsified, possibly quantized
    if plan.quant in ("int8", "bitnet"):
        out = ops.int8(out)
    return out


def project_sparsified(xs: Any, weight: Any, bias: Any, plan: ProjectionPlan,
                       ops: SparsifyOps) -> Any:
    """The product half of :func:`project`: ``xs`` is already the plan's sparsified input;
    ``weight`` is ``[out, in]``."""
    if plan.quant == "bitnet":
        weight = ops.ternary(weight)
    if plan.weights is not None:
        weight = ops.weights(weight, plan.weights, -1)
    return ops.linear(xs, weight, bias)


def project(x: Any, weight: Any, bias: Any, plan: ProjectionPlan, config: QSparseConfig,
            ops: SparsifyOps, dim: int) -> Any:
    """``y = sparsify(x) W^T + b`` as ``plan`` says (``weight`` is ``[out, in]``); ternary
    weights when ``quant="bitnet"``, the weight format's values when ``plan.weights``; a dense
    plan is the plain product."""
    if plan.dense:
        return ops.linear(x, weight, bias)
    return project_sparsified(sparsify_input(x, plan, config, ops, dim), weight, bias, plan,
                              ops)


class ResolvedPlan(tuple):
    """``(plan, k, note)``: the plan for one projection, the entries it keeps per row (None
    when data-dependent or dense) and a note for reports ("" when nothing to say)."""

    __slots__ = ()

    def __new__(cls, plan: ProjectionPlan, k: int | None, note: str = ""):
        return super().__new__(cls, (plan, k, note))

    @property
    def plan(self) -> ProjectionPlan:
        return self[0]

    @property
    def k(self) -> int | None:
        return self[1]

    @property
    def note(self) -> str:
        return self[2]


def resolve_plan(path: str, in_features: int, config: QSparseConfig,
                 warn: bool = True, role: str | None = None) -> ResolvedPlan:
    """The plan for the projection at ``path`` reading ``in_features`` inputs.

    ``role`` is the projection's role (:func:`qsparse_compile.roles.projection_roles`), which
    ``config.dense_roles`` may leave dense; None reads it off the path's names.

    A block pattern whose ``m`` does not divide the width cannot apply: the projection is left
    dense (keeping its quantization), with a warning naming it (``warn``), or ``ValueError``
    when ``config.strict``.
    """
    plan = config.plan_for(path, role)
    if not plan.sparse:
        return ResolvedPlan(plan, None)
    if plan.method == "block":
        n, m = plan.block
        if in_features % m:
            msg = (f"projection {path!r}: input width {in_features} is not a multiple "
                   f"of m={m}, so block {n}:{m} cannot apply")
            if config.strict:
                raise ValueError(msg + " (strict=True)")
            if warn:
                warnings.warn(msg + "; left dense", stacklevel=3)
            return ResolvedPlan(plan.without_sparsity(), None, "width not a multiple of m")
        return ResolvedPlan(plan, n * (in_features // m))
    if plan.method == "relu":
        return ResolvedPlan(plan, None, "sparsity depends on the data")
    return ResolvedPlan(plan, topk_count(in_features, plan.sparsity))
