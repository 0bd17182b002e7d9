"""Greedy per-projection sparsity allocation under a global activated-parameter budget.

Every projection ``i`` (input width ``D_i``, output width ``O_i``) keeps ``k_i`` of its
``D_i`` inputs per token, so a product reads ``k_i * O_i`` weights. The **budget** of a global
sparsity ``s`` is what uniform top-K at ``s`` reads::

    B(s) = sum_i topk_count(D_i, s) * O_i

and the allocation returns integers ``k_i`` (``1 <= k_i <= D_i``) with
``sum_i k_i * O_i == B(s)`` **exactly** (an integer equality, not an approximation): it
starts from the uniform allocation, which meets the budget, and only ever makes moves that
keep the sum unchanged. A move gives ``a`` more inputs to projection ``i`` and takes ``b``
from projection ``j`` with ``a * O_i == b * O_j == lcm(O_i, O_j)``, the smallest such
exchange. Each step makes the move that lowers the loss proxy ``sum_i e_i(k_i)`` the most and
stops when no move lowers it (a pairwise-exchange local optimum; the proxy is
piecewise-linear, so the search ends after finitely many strictly improving steps).

``e_i(k)`` is the mean per-token relative output error of projection ``i`` keeping ``k``
inputs, measured on calibration rows at a grid of sparsities (:func:`qsparse_compile.calibrate`)
and linearly interpolated in between; ``k_i`` never goes below the grid's largest sparsity (no
extrapolation). The result is deterministic: the same curves give the same ``k``; the curves
are reproducible from the calibration seed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from ..config import check_sparsity, topk_count

#: A move must lower the proxy by more than this to be taken (guards float round-off loops).
MIN_GAIN = 1e-12


def budget(sizes: Sequence[tuple[int, int]], sparsity: float) -> int:
    """Weights read per token by uniform top-K at ``sparsity``: ``sum topk_count(D, s) * O``."""
    return sum(topk_count(d, sparsity) * o for d, o in sizes)


def _error_table(curves: np.ndarray, grid: np.ndarray, dims: np.ndarray) -> np.ndarray:
    """``table[i, k]`` = the interpolated error of projection ``i`` keeping ``k`` inputs."""
    density = (1.0 - grid)[::-1]  # ascending for np.interp
    table = np.full((len(dims), int(dims.max()) + 1), np.inf)
    for i, dim in enumerate(dims):
        ks = np.arange(int(dim) + 1, dtype=np.float64)
        table[i, : int(dim) + 1] = np.interp(ks / dim, density, curves[i][::-1])
    return table


def allocate(sizes: Sequence[tuple[int, int]], curves: torch.Tensor | np.ndarray,
             grid: Sequence[float], sparsity: float, max_steps: int = 1_000_000) -> list[int]:
    """Kept inputs ``k_i`` per projection with ``sum k_i * O_i == budget(sizes, sparsity)``.

    Args:
        sizes: ``(D_i, O_i)`` per projection.
        curves: ``[P, G]`` relative output error of projection ``i`` at ``grid[g]``.
        grid: ascending sparsities, the first 0.
        sparsity: the global sparsity whose budget is met; at most ``grid[-1]``.
        max_steps: a safety bound on greedy steps (never reached in practice).
    """
    s = check_sparsity(sparsity, "allocate: sparsity")
    grid_a = np.asarray(grid, dtype=np.float64)
    curves_a = np.asarray(curves.double().numpy() if isinstance(curves, torch.Tensor)
                          else curves, dtype=np.float64)
    if curves_a.shape != (len(sizes), len(grid_a)):
        raise ValueError(f"allocate: curves must be [projections, grid] = "
                         f"[{len(sizes)}, {len(grid_a)}], got {list(curves_a.shape)}")
    if len(grid_a) < 2 or grid_a[0] != 0.0 or np.any(np.diff(grid_a) <= 0):
        raise ValueError(f"allocate: grid must be ascending sparsities from 0, got {list(grid)}")
    if s > grid_a[-1]:
        raise ValueError(f"allocate: sparsity {s} is beyond the calibrated grid "
                         f"(at most {grid_a[-1]:g})")
    dims = np.array([d for d, _ in sizes], dtype=np.int64)
    outs = np.array([o for _, o in sizes], dtype=np.int64)
    k = np.array([topk_count(int(d), s) for d in dims], dtype=np.int64)
    k_min = np.array([topk_count(int(d), float(grid_a[-1])) for d in dims], dtype=np.int64)
    k_min = np.minimum(k_min, k)
    table = _error_table(curves_a, grid_a, dims)
    classes = {int(o): np.flatnonzero(outs == o) for o in np.unique(outs)}
    # quantum of each (gainer class, loser class): the smallest exchange keeping the budget
    moves = [(a, b, math.lcm(a, b) // a, math.lcm(a, b) // b) for a in classes for b in classes]
    for _ in range(max_steps):
        best = (MIN_GAIN, -1, -1, 0, 0)
        for a, b, qa, qb in moves:
            gi = classes[a][k[classes[a]] + qa <= dims[classes[a]]]
            lj = classes[b][k[classes[b]] - qb >= k_min[classes[b]]]
            if not len(gi) or not len(lj):
                continue
            gain = table[gi, k[gi]] - table[gi, k[gi] + qa]
            loss = table[lj, k[lj] - qb] - table[lj, k[lj]]
            # the two best of each side hold the best pair of distinct projections;
            # lexsort breaks ties toward the lower index, so the result is deterministic
            for gp in np.lexsort((gi, -gain))[:2]:
                for lp in np.lexsort((lj, loss))[:2]:
                    delta = gain[gp] - loss[lp]
                    if gi[gp] != lj[lp] and delta > best[0]:
                        best = (delta, int(gi[gp]), int(lj[lp]), qa, qb)
        _, i, j, qa, qb = best
        if i < 0:
            break
        k[i] += qa
        k[j] -= qb
    return [int(v) for v in k]


def overrides_for(paths: Sequence[str], sizes: Sequence[tuple[int, int]],
                  ks: Sequence[int]) -> dict[str, float]:
    """Per-projection sparsities ``s_i`` with ``topk_count(D_i, s_i) == k_i`` for every ``i``.

    ``s_i = 1 - k_i / D_i`` rounded to 6 decimals when that still gives ``k_i`` (readable
    logs), else unrounded. ``k_i == D_i`` gives 0 (the projection is left dense).
    """
    out: dict[str, float] = {}
    for path, (dim, _), kk in zip(paths, sizes, ks, strict=True):
        exact = 1.0 - kk / dim
        s = round(exact, 6)
        if topk_count(dim, s) != kk:
            s = exact
        if topk_count(dim, s) != kk:  # cannot happen for 1 <= k <= D; kept as a guard
            raise ValueError(f"allocation: no sparsity gives k={kk} of {dim} for {path!r}")
        out[path] = max(0.0, s)
    return out


def activated(sizes: Sequence[tuple[int, int]], ks: Sequence[int]) -> int:
    """``sum k_i * O_i``: the weights read per token under an allocation."""
    return sum(kk * o for (_, o), kk in zip(sizes, ks, strict=True))


def allocation_table(paths: Sequence[str], sizes: Sequence[tuple[int, int]],
                     overrides: Mapping[str, float]) -> dict[str, float]:
    """Mean allocated sparsity per role (q, k, ..., down): how the budget was spread."""
    from ..roles import role_of

    by_role: dict[str, list[float]] = {}
    for path, (dim, _) in zip(paths, sizes, strict=True):
        s = overrides[path]
        by_role.setdefault(role_of(path), []).append(1 - topk_count(dim, s) / dim)
    return {role: round(sum(v) / len(v), 4) for role, v in by_role.items()}
