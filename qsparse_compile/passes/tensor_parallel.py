"""Tensor parallelism (DTensor): a graph over DTensors becomes one over each rank's shards.

``parallelize_module`` (``ColwiseParallel`` for q/k/v/gate/up, ``RowwiseParallel`` for o/down)
makes parameters DTensors, and Dynamo's graph then reads them (``from_local`` / ``linear`` /
``redistribute`` / ``to_local``). The passes read plain ATen over plain tensors, so
:func:`localise` traces the graph once more with DTensor's own dispatch running: the result
takes each DTensor input's local shard and holds what every rank runs, its shard products and
the collectives DTensor adds (``_c10d_functional.all_reduce`` after a row-parallel product).
The compiled program takes the DTensors Dynamo passes and hands it their shards.

What a projection's input becomes (DESIGN.md point 11, :class:`RowShard`):

* a column-parallel projection (weight sharded by output features) reads the whole,
  replicated row: top-K as on one device;
* a row-parallel one (weight sharded by input features) reads a shard of the row. The option
  ``tensor_parallel`` says what its top-K is: ``"exact"``, the row's global top-K
  (``qsparse::sharded_topk_sparsify``, one all-gather of per-rank candidates), or
  ``"per_shard"``, ``max(1, round(k * D_s / D))`` of each shard with no communication.
  Block N:M whose ``m`` divides the shard is exact with no communication (groups do not
  straddle shards); the ReLU baseline is elementwise, so exact too.

Inference only: a tensor-parallel training graph is refused (the backward of the collectives
DTensor inserts lives in DTensor's autograd functions, which a localised forward loses).
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx

from .. import ops  # noqa: F401  (registers torch.ops.qsparse)
from ..config import ProjectionPlan, QSparseConfig, topk_count
from .identity import ParameterNames

__all__ = ["LocalProgram", "RowShard", "dtensor_inputs", "localise", "row_shards",
           "shard_count", "sharded_count", "sharded_input"]

qsparse = torch.ops.qsparse


@dataclasses.dataclass(frozen=True)
class RowShard:
    """A row-parallel projection: its input row of ``in_features`` is split evenly over the
    ``world`` ranks of process group ``group`` (by name); this rank holds shard ``rank``."""

    rank: int
    world: int
    group: str
    in_features: int

    @property
    def shard_features(self) -> int:
        return self.in_features // self.world


def shard_count(k: int, shard: RowShard) -> int:
    """Entries the per-shard mode keeps of each shard: ``max(1, round(k * D_s / D))``."""
    return max(1, round(k * shard.shard_features / shard.in_features))


def dtensor_inputs(inputs: Sequence[object]) -> list[Any]:
    """The DTensors among a graph's inputs."""
    from torch.distributed.tensor import DTensor

    return [x for x in inputs if isinstance(x, DTensor)]


def _input_dim(names: ParameterNames, weight: Any) -> int | None:
    """The input-feature dim of a projection weight: 1 for ``[out, in]`` (``nn.Linear``),
    0 for ``[in, out]`` (``Conv1D``); None when it is no projection's weight."""
    from ..modules import projection_layout

    for name in names.names_of(weight):
        if name.attr == "weight" and name.owner is not None:
            layout = projection_layout(name.owner)
            if layout is not None:
                return 1 if layout == "out_in" else 0
    return None


def row_shards(inputs: Sequence[object], names: ParameterNames) -> dict[str, RowShard]:
    """Row-parallel projections among the DTensor inputs, by projection path.

    Raises NotImplementedError, naming the parameter, for what has no semantics here yet:
    meshes of more than one dimension (FSDP or pipeline stages combined with TP), partial
    placements, and input shards of unequal widths.
    """
    from torch.distributed.tensor import Replicate, Shard

    shards: dict[str, RowShard] = {}
    for dt in dtensor_inputs(inputs):
        name = names.name(dt) if dt in names else f"a {tuple(dt.shape)} input"
        mesh, placements = dt.device_mesh, dt.placements
        if mesh.ndim != 1:
            raise NotImplementedError(
                f"qsparse: {name} is a DTensor on a {mesh.ndim}-dimensional mesh "
                f"{tuple(mesh.shape)} ({placements}); tensor parallelism is supported on a "
                f"1-dimensional mesh only")
        (placement,) = placements
        if isinstance(placement, Replicate):
            continue
        if not isinstance(placement, Shard):
            raise NotImplementedError(
                f"qsparse: {name} is a DTensor placed {placement}; supported placements are "
                f"Shard and Replicate")
        in_dim = _input_dim(names, dt)
        if in_dim is None or placement.dim % dt.dim() != in_dim:
            continue  # a column-parallel weight (or no projection's): whole input rows
        world = mesh.size()
        width = dt.shape[in_dim]
        if width % world:
            raise NotImplementedError(
                f"qsparse: {name} shards {width} input features over {world} ranks unevenly; "
                f"the row-parallel top-K needs equal shards")
        for path in names.projection_paths(dt):
            shards[path] = RowShard(mesh.get_local_rank(), world, mesh.get_group().group_name,
                                    width)
    return shards


def sharded_count(plan: ProjectionPlan, config: QSparseConfig, shard: RowShard,
                  path: str) -> tuple[int | None, str]:
    """``(k, note)`` for a row-parallel projection under ``plan``: the entries this rank
    keeps per row (exact top-K: the rank's mean share ``round(k * D_s / D)``, since its
    count is data-dependent and only the row's total ``k`` is fixed, which the note gives;
    None: data-dependent) and a note for the report. Raises NotImplementedError, naming the
    projection, where the plan has no tensor-parallel semantics here."""
    where = f"projection {path!r} (row-parallel over {shard.world} ranks)"
    if plan.quant is not None or plan.weights is not None:
        raise NotImplementedError(
            f"qsparse: {where}: quant={plan.quant!r}, weights={plan.weights!r} under tensor "
            f"parallelism need scales over the whole row or weight, which no rank holds; "
            f"supported: top-K, block N:M and ReLU without quantization")
    tag = f"row-parallel x{shard.world}"
    if plan.method == "topk":
        k = topk_count(shard.in_features, plan.sparsity)
        kept = shard_count(k, shard)
        if config.tensor_parallel == "exact":
            return kept, (f"{tag}, exact: top-{k} of the {shard.in_features}-wide row (this "
                          f"rank's share varies); all-gather of {shard.world}x"
                          f"{min(k, shard.shard_features)} keys per row")
        return kept, f"{tag}, per-shard: {kept} of {shard.shard_features} per rank"
    if plan.method == "block":
        n, m = plan.block
        if shard.shard_features % m:
            raise NotImplementedError(
                f"qsparse: {where}: block {n}:{m} with shards of {shard.shard_features} "
                f"features, not a multiple of m, would split groups across ranks")
        if config.rescale == "l2" and config.tensor_parallel == "exact":
            raise NotImplementedError(
                f"qsparse: {where}: block {n}:{m} with rescale='l2' needs the row's norm "
                f"across ranks; use rescale='none' or tensor_parallel='per_shard'")
        return n * (shard.shard_features // m), f"{tag}: block {n}:{m} within shards (exact)"
    if plan.method == "relu":
        return None, f"{tag}: ReLU (elementwise, exact)"
    raise AssertionError(f"unhandled method {plan.method!r}")


def sharded_input(x: Any, plan: ProjectionPlan, config: QSparseConfig, shard: RowShard,
                  path: str) -> Any:
    """A row-parallel projection's input shard as ``plan`` and ``config.tensor_parallel``
    say (:func:`sharded_count` checks the plan). ``x`` may be an FX proxy."""
    kept, _ = sharded_count(plan, config, shard, path)
    rescale = config.rescale == "l2"
    if plan.method == "topk" and config.tensor_parallel == "exact":
        return qsparse.sharded_topk_sparsify.default(
            x, topk_count(shard.in_features, plan.sparsity), shard.rank, shard.world,
            shard.group, rescale)
    if plan.method == "topk":
        return qsparse.topk_sparsify.default(x, kept, rescale, config.ste)
    if plan.method == "block":
        n, m = plan.block
        return qsparse.block_sparsify.default(x, n, m, rescale, config.ste)
    return torch.ops.aten.relu.default(x)


@dataclasses.dataclass
class LocalProgram:
    """A Dynamo graph localised: ``graph`` takes ``inputs``, each DTensor input replaced by
    its local shard; :meth:`wrap` adapts a compiled ``graph`` back to the DTensor inputs."""

    graph: torch.fx.GraphModule
    inputs: list[object]
    out_specs: list[tuple | None]
    dtensors: list[object]  # the DTensor inputs compiled for, beside ``inputs``' shards

    def wrap(self, compiled: Callable) -> Callable:
        from torch.distributed.tensor import DTensor

        specs = self.out_specs
        # one local tensor per DTensor input, kept while that DTensor lives: ``to_local()``
        # of a DTensor parameter returns a new view each call, and the prepared weights of
        # the decode lowerings are remade whenever their source is another tensor (a view
        # shares its base's version counter, so in-place updates are still seen)
        shards: dict[int, tuple[weakref.ref, torch.Tensor]] = {
            id(d): (weakref.ref(d), x) for d, x in zip(self.dtensors, self.inputs, strict=True)
            if isinstance(d, DTensor)}
        self.dtensors = []  # the compiled program must not keep the model's tensors alive

        def local_of(a: DTensor) -> torch.Tensor:
            kept = shards.get(id(a))
            if kept is None or kept[0]() is not a:
                kept = shards[id(a)] = (weakref.ref(a), a.to_local())
            return kept[1]

        def run(*args: object) -> tuple:
            local = [local_of(a) if isinstance(a, DTensor) else a for a in args]
            outs = compiled(*local)
            return tuple(o if spec is None else DTensor.from_local(
                o, spec[0], spec[1], run_check=False, shape=spec[2], stride=spec[3])
                for o, spec in zip(outs, specs, strict=True))

        return run


def localise(gm: torch.fx.GraphModule, example_inputs: Sequence[object]) -> LocalProgram:
    """``gm`` (over DTensor inputs) traced to ATen over local shards, collectives included.

    Traced in the compilation's fake mode (no data moves, no collective runs), with static
    shapes for the shards.
    """
    from torch._guards import detect_fake_mode
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed.tensor import DTensor
    from torch.fx.experimental.proxy_tensor import make_fx

    specs = [(x.device_mesh, x.placements, x.shape, x.stride()) if isinstance(x, DTensor)
             else None for x in example_inputs]
    local = [x.to_local() if isinstance(x, DTensor) else x for x in example_inputs]
    fake_mode = detect_fake_mode([x for x in local if isinstance(x, torch.Tensor)]) \
        or FakeTensorMode()
    fakes = [fake_mode.from_tensor(x, static_shapes=spec is not None)
             if isinstance(x, torch.Tensor) else x for x, spec in zip(local, specs, strict=True)]
    out_specs: list[tuple | None] = []

    def run_local(*shards: object) -> list[object]:
        args = [s if spec is None else DTensor.from_local(
            s, spec[0], spec[1], run_check=False, shape=spec[2], stride=spec[3])
            for s, spec in zip(shards, specs, strict=True)]
        outs = gm(*args)
        out_specs.clear()
        out_specs.extend((o.device_mesh, o.placements, o.shape, o.stride())
                         if isinstance(o, DTensor) else None for o in outs)
        return [o.to_local() if isinstance(o, DTensor) else o for o in outs]

    with fake_mode, torch.no_grad():
        graph = make_fx(run_local, tracing_mode="real")(*fakes)
    return LocalProgram(graph, local, out_specs, list(example_inputs))
