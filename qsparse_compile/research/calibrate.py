"""``calibrate(model, batches)``: input statistics of every projection -> a :class:`Calibration`.

Forward pre-hooks on the model's projections (``nn.Linear``, and ``Conv1D``-style modules
whose weight is stored ``[in, out]``) see each projection's input. Projections that receive
the *same tensor object* within one forward pass (q/k/v read one normed hidden state, gate/up
another) form one rotation group: they must share a rotation, because the compiled graph
computes ``x Q`` once for all of them. Per group the hooks accumulate the second moment
``X^T X`` in float64 over the calibration rows, except a seeded random sample of rows kept
aside for the loss-proxy curves. Afterwards ``eigh`` gives the rotation: eigenvectors by descending
eigenvalue, so the rotated coordinates come in order of decreasing energy.

The second moment is not mean-centred: top-K keeps large magnitudes, mean included, so the
directions that matter are those of ``E[x x^T]``, not of the covariance around the mean.
"""

from __future__ import annotations

import fnmatch
import gc
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..config import DEFAULT_DENSE_ROLES, DEFAULT_EXCLUDE, topk_count
from ..modules import projection_modules
from ..roles import projection_roles
from ..rotations import RotationGroup
from .calibration import Calibration, ProjectionInfo

#: Sparsities at which the loss-proxy curves are measured (allocation interpolates between).
DEFAULT_GRID = tuple(round(0.05 * i, 2) for i in range(19))  # 0, 0.05, ..., 0.9


class _Collector:
    """Hook state: groups projections by input identity and accumulates their statistics."""

    def __init__(self, rows_per_batch: int, seed: int):
        self.rows_per_batch = rows_per_batch
        self.generator = torch.Generator().manual_seed(seed)
        self.groups: list[tuple[str, ...]] | None = None  # fixed by the first forward
        self.moment: dict[str, torch.Tensor] = {}  # group leader -> sum of x^T x (float64)
        self.samples: dict[str, list[torch.Tensor]] = {}
        self.rows: dict[str, int] = {}  # group leader -> rows accumulated
        self._start_forward()

    def _start_forward(self) -> None:
        self.current: list[tuple[torch.Tensor, list[str]]] = []  # (input, paths reading it)
        self.picks: dict[int, torch.Tensor] = {}  # rows per call -> sampled row indices

    def begin(self, *_: Any) -> None:
        self._start_forward()

    def end(self, *_: Any) -> None:
        groups = [tuple(paths) for _, paths in self.current]
        if self.groups is None:
            self.groups = groups
        elif groups != self.groups:
            raise ValueError(
                "calibrate: projections shared their inputs differently in two calibration "
                f"batches ({self.groups} vs {groups}); rotations need one fixed grouping")
        self._start_forward()

    def see(self, path: str, x: torch.Tensor) -> None:
        for seen, paths in self.current:
            if seen is x:
                paths.append(path)
                return
        # a new input: the first projection reading it leads its group
        self.current.append((x, [path]))
        if not x.is_floating_point():
            raise TypeError(f"calibrate: projection {path!r} got a {x.dtype} input; "
                            f"floating point inputs are required")
        rows = x.detach().reshape(-1, x.shape[-1])
        n = rows.shape[0]
        if n not in self.picks:
            self.picks[n] = torch.randperm(n, generator=self.generator)[:self.rows_per_batch]
        # the sampled rows measure the loss proxy; keeping them out of the second moment
        # measures the rotation on rows it was not fitted to (no in-sample optimism)
        fit = torch.ones(n, dtype=torch.bool)
        fit[self.picks[n]] = False
        x64 = rows[fit].double()
        moment = x64.T @ x64
        if path in self.moment:
            self.moment[path] += moment
        else:
            self.moment[path] = moment
        self.rows[path] = self.rows.get(path, 0) + int(fit.sum())
        self.samples.setdefault(path, []).append(rows[self.picks[n]].float())


def principal_rotation(moment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rotation float32 ``[D, D]``, eigenvalues float64) of a second-moment matrix.

    Columns by descending eigenvalue; each column's sign makes its largest-magnitude entry
    positive, so the result does not depend on the solver's sign choice.
    """
    values, vectors = torch.linalg.eigh(moment.double())
    values, vectors = values.flip(0), vectors.flip(1)
    pivots = vectors.abs().argmax(dim=0)
    signs = torch.sign(vectors[pivots, torch.arange(vectors.shape[1])])
    signs[signs == 0] = 1.0
    return (vectors * signs).float().contiguous(), values.clamp_min(0.0)


def error_curves(x: torch.Tensor, weights: Sequence[torch.Tensor], grid: Sequence[float]
                 ) -> torch.Tensor:
    """``[len(weights), len(grid)]``: per weight, the mean over rows ``t`` of
    ``||x_t W^T - topk(x_t) W^T||^2 / ||x_t W^T||^2`` (the relative output error per token).

    Per token, not pooled over the sample: a pooled ratio is dominated by the few tokens with
    massive activations (SmolLM2 has them at some down projections), and an allocation by it
    sent those projections to 90% sparsity and lost perplexity. ``x`` is ``[n, D]`` (rows
    already in the space the weights act on); top-K follows the exact semantics (ties to the
    lower index) by ranking each row once with a stable sort.
    """
    n, dim = x.shape
    order = torch.sort(x.abs(), dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(dim).expand(n, dim).contiguous())
    ks = torch.tensor([topk_count(dim, s) for s in grid])
    # dropped[g] = what top-K at grid[g] zeroes; the output error is dropped @ W^T
    dropped = torch.where(rank.unsqueeze(0) >= ks.view(-1, 1, 1), x.unsqueeze(0), 0.0)
    dropped = dropped.reshape(-1, dim)
    out = torch.empty(len(weights), len(grid), dtype=torch.float64)
    for i, w in enumerate(weights):
        w32 = w.detach().float()
        ref = (x @ w32.T).double().pow(2).sum(dim=-1)  # [n]
        err = (dropped @ w32.T).double().pow(2).sum(dim=-1).reshape(len(grid), n)
        out[i] = (err / ref.clamp_min(1e-30)).mean(dim=1)
    return out


def _run(model: nn.Module, batch: Any) -> None:
    if isinstance(batch, Mapping):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)


def calibrate(model: nn.Module, batches: Sequence[Any], *, exclude: Iterable[str] =
              DEFAULT_EXCLUDE, dense_roles: Iterable[str] = DEFAULT_DENSE_ROLES,
              sample_rows: int = 256, seed: int = 0,
              grid: Sequence[float] = DEFAULT_GRID, runner: nn.Module | None = None,
              progress: bool = False) -> Calibration:
    """Run ``batches`` through ``model`` (eager, no gradients) and calibrate its projections.

    Args:
        model: any module; its ``nn.Linear`` (and ``Conv1D``) submodules are the projections.
        batches: a sequence of model inputs: a tensor (``model(t)``), a tuple (``model(*t)``)
            or a dict (``model(**d)``), e.g. ``{"input_ids": ids, "use_cache": False}``.
        exclude: globs of module paths not calibrated (default: none); a projection missing
            from the calibration cannot be rotated.
        dense_roles: roles (:func:`qsparse_compile.roles.projection_roles`) not calibrated,
            as the compiler leaves them dense (default: the output head and routers).
            Expert weights (3-D, one matrix per expert) are never calibrated: their rows
            are the tokens routed to each expert, not one shared input.
        sample_rows: rows (tokens) sampled per projection input for the loss-proxy curves
            (spread over the batches; kept out of the rotation fit).
        seed: seeds the row sample; the same model, batches and seed give the same
            calibration (rotations, curves, allocations).
        grid: sparsities of the curves, ascending from 0.
        runner: the submodule of ``model`` the batches are run through (default ``model``),
            e.g. a causal LM's decoder without its head (``model.model``): the head is
            excluded anyway, and at a large vocabulary computing it costs more than the
            layers. Paths stay relative to ``model``.
        progress: show a progress bar over the batches.

    Returns:
        A :class:`Calibration` (rotations per shared input, curves, no allocation yet: call
        :meth:`Calibration.allocate`).
    """
    if not isinstance(batches, Sequence) or not len(batches):
        raise ValueError(f"calibrate: batches must be a non-empty sequence of model inputs, "
                         f"got {type(batches).__name__}")
    if isinstance(sample_rows, bool) or not isinstance(sample_rows, int) or sample_rows < 1:
        raise ValueError(f"calibrate: sample_rows must be a positive integer, "
                         f"got {sample_rows!r}")
    grid = tuple(float(s) for s in grid)
    if not grid or grid[0] != 0.0 or any(b <= a for a, b in zip(grid, grid[1:], strict=False)) \
            or grid[-1] >= 1.0:
        raise ValueError(f"calibrate: grid must be ascending sparsities in [0, 1) starting "
                         f"at 0, got {list(grid)}")
    exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    dense_roles = (dense_roles,) if isinstance(dense_roles, str) else tuple(dense_roles)
    roles = projection_roles(model)
    projections = {p.path: p for p in projection_modules(model)
                   if not any(fnmatch.fnmatchcase(p.path, g) for g in exclude)
                   and roles.role(p.path) not in dense_roles}
    if not projections:
        raise ValueError(f"calibrate: {type(model).__name__} has no projection "
                         f"(nn.Linear / Conv1D) outside exclude={list(exclude)} and "
                         f"dense_roles={list(dense_roles)}")
    runner = model if runner is None else runner
    if not any(m is runner for m in model.modules()):
        raise ValueError(f"calibrate: runner ({type(runner).__name__}) is not a submodule of "
                         f"the model ({type(model).__name__})")
    collector = _Collector(math.ceil(sample_rows / len(batches)), seed)
    handles = [runner.register_forward_pre_hook(collector.begin),
               runner.register_forward_hook(collector.end)]
    for path, proj in projections.items():
        handles.append(proj.module.register_forward_pre_hook(
            lambda _m, args, path=path: collector.see(path, args[0])))
    try:
        from tqdm import tqdm

        with torch.no_grad():
            for batch in tqdm(batches, desc="calibrate", disable=not progress,
                              mininterval=5):
                _run(runner, batch)
                # measured on SmolLM2: without a collection between batches the process grew
                # by about 0.5 GB per batch (a 32-batch calibration was killed for memory);
                # with it, memory stays flat
                gc.collect()
    finally:
        for handle in handles:
            handle.remove()
    return _build(collector, projections, grid, seed, sample_rows, len(batches), progress)


def _build(collector: _Collector, projections: Mapping[str, Any], grid: tuple[float, ...],
           seed: int, sample_rows: int, batches: int, progress: bool) -> Calibration:
    from tqdm import tqdm

    groups: list[RotationGroup] = []
    infos: list[ProjectionInfo] = []
    curves: dict[str, list[torch.Tensor]] = {"plain": [], "rotated": []}
    with torch.no_grad():
        for index, paths in enumerate(tqdm(collector.groups or [], desc="rotations",
                                           disable=not progress, mininterval=5)):
            leader = paths[0]
            if not collector.rows[leader]:
                raise ValueError(f"calibrate: sample_rows={sample_rows} leaves no calibration "
                                 f"row to fit the rotations; give more tokens or fewer rows")
            moment = collector.moment[leader] / collector.rows[leader]
            rotation, eigenvalues = principal_rotation(moment)
            groups.append(RotationGroup(tuple(paths), rotation, eigenvalues))
            x = torch.cat(collector.samples[leader])[:sample_rows]
            weights = [projections[p].weight_out_in().detach().float() for p in paths]
            q64 = rotation.double()
            x_rot = (x.double() @ q64).float()
            w_rot = [(w.double() @ q64).float() for w in weights]
            curves["plain"].append(error_curves(x, weights, grid))
            curves["rotated"].append(error_curves(x_rot, w_rot, grid))
            for p, w in zip(paths, weights, strict=True):
                infos.append(ProjectionInfo(p, int(w.shape[1]), int(w.shape[0]), index))
    # curves follow the group order, and so does ``infos``
    metadata = {"seed": seed, "sample_rows": sample_rows, "batches": batches,
                "rows": max(collector.rows.values(), default=0), "torch": torch.__version__}
    return Calibration(groups=groups, projections=infos, grid=grid,
                       curves={k: torch.cat(v) for k, v in curves.items()},
                       metadata=metadata)
