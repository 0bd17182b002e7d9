"""The pass manager: the order of the passes, one clean-up, and what each pass did.

One object runs every pass over a normalised graph (:mod:`.normalise`), in one direction::

    [ReLU² GLU] -> [rotate] -> rewrite -> [share] -> [CPU decode] -> [fuse]
                -> [fold weight formats] -> [Triton: decode GEMV -> N:M prefill -> retarget]

(bracketed: only where an option or the graph asks for it). The bodies of higher-order ops
(an activation-checkpointed layer's subgraph, :mod:`.subgraphs`) take the graph passes first,
each as a graph of its own.

* The graph passes (GLU, rotate, rewrite, share, fuse) run on every graph, before autograd:
  the ``qsparse`` ops they insert carry the straight-through gradient.
* The lowerings (CPU decode, folding the weight formats' quantizers into constants
  (:mod:`.fold_weights`), decode GEMV, Triton retargeting) run only on inference graphs
  outside autocast (their kernels compute in the weights' dtype, where autocast would cast)
  (compiled with grad mode off); training graphs on the Triton path are retargeted after
  autograd instead (:mod:`.post_grad`). The N:M prefill retargeting yields a differentiable
  op, so it runs on every graph of the Triton path. They read the weights as constants at
  compile time, as Inductor's freezing does, and add prepared copies through the graph's
  constants (:mod:`.constants`). The CPU decode lowering runs before fusion because its kernel
  fuses the selection itself and wants the norm before it unfused; the Triton decode GEMV runs
  after it, fed by the fused norm kernel.

After each pass one clean-up runs: dead code is removed (nodes with side effects, such as a
static KV cache's in-place ``index_copy_``, are kept), the graph is linted and recompiled.
:meth:`PassManager.run` returns a :class:`GraphResult`: the projections and what each pass
changed, in order. Nothing is recorded anywhere else.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable

import torch
import torch.fx

from ..ops.autocast import AUTOCAST_DEVICES
from ..options import CompileOptions
from ..rotations import Rotations
from .block_prefill import use_block_sparse_linear
from .constants import AddConstant
from .cpu_decode import lower_cpu_decode, lower_dense_decode
from .cuda_decode import lower_cuda_decode
from .fold_weights import fold_weight_formats
from .fuse_norm import fuse_norm_sparsify
from .graph_utils import op_counts
from .kernel_select import triton_device
from .normalise import has_autocast_region
from .relu2_glu import relu2_glu
from .rewrite import RewrittenProjection, sparsify_graph
from .rotate import RotatedInput, rotate_projections
from .share_inputs import share_sparsify_inputs
from .subgraphs import SubgraphCall, walk_bodies
from .triton_lowering import retarget_to_triton
from .weights import WeightTable

__all__ = ["GraphResult", "PassManager", "RootProjection", "autocast_in_effect", "clean_up"]


@dataclasses.dataclass(frozen=True)
class RootProjection:
    """A projection of the compiled root as its module tree shows it (whether or not a graph
    reads it): what a report lists when no graph saw it."""

    path: str
    in_features: int
    out_features: int
    experts: int = 0
    experts_per_token: int | None = None


@dataclasses.dataclass
class GraphResult:
    """What the passes did to one graph.

    Attributes:
        records: one per projection found (dense ones too), in graph order.
        passes: pass name -> how many things it changed, in the order the passes ran
            (``relu2_glu``: gate activations replaced; ``rotate``: inputs rotated; ``rewrite``:
            projections rewritten; ``share``: sparsify nodes removed by sharing;
            ``cpu_decode`` / ``cuda_decode``: projection groups replaced by one fused op;
            ``fuse``: norm + sparsify (+ int8) groups fused; ``block_prefill``: products
            retargeted to ``block_sparse_linear``; ``triton``: nodes retargeted to kernels).
        rotations: the ``x @ Q`` inserted (:mod:`.rotate`).
        triton: the device type the Triton kernels were selected for, or None.
        inference: whether the graph was compiled for inference.
        autocast: whether autocast is in effect for the graph (entered around the compiled
            call, or inside it); the lowerings are then left out.
        before, after: op counts of the normalised graph before the passes and after them.
        graph: the graph as the inner compiler receives it.
        constants: placeholder name -> tensor, for the constants the passes added (prepared
            weights, rotations), where the graph takes them as extra inputs.
        model_projections: every projection of the compiled root(s), found by walking their
            modules (the backend sets it): those no graph's records name ran outside the
            compiled graphs.
    """

    records: list[RewrittenProjection]
    passes: dict[str, int]
    rotations: list[RotatedInput] = dataclasses.field(default_factory=list)
    triton: str | None = None
    inference: bool = False
    autocast: bool = False
    before: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    after: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    graph: torch.fx.GraphModule | None = None
    constants: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    model_projections: tuple[RootProjection, ...] = ()

    def count(self, name: str) -> int:
        """What pass ``name`` changed (0 when it did not run)."""
        return self.passes.get(name, 0)

    @property
    def shared(self) -> int:
        return self.count("share")

    @property
    def fused(self) -> int:
        return self.count("fuse")

    @property
    def decode(self) -> int:
        return self.count("cpu_decode") + self.count("cuda_decode")

    @property
    def block_linear(self) -> int:
        return self.count("block_prefill")

    @property
    def lowered(self) -> int:
        return self.count("triton")

    @property
    def relu2(self) -> int:
        return self.count("relu2_glu")


def autocast_in_effect(gm: torch.fx.GraphModule) -> bool:
    """Whether ``gm`` runs under autocast: entered around the compiled call (Dynamo guards on
    that state, so the graph only runs under it) or inside the graph."""
    around = any(torch.amp.is_autocast_available(d) and torch.is_autocast_enabled(d)
                 for d in AUTOCAST_DEVICES)
    return around or has_autocast_region(gm)


def clean_up(gm: torch.fx.GraphModule) -> None:
    """Dead code out (side effects kept: ``Node.is_impure`` knows mutating ops), lint, recompile."""
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()


class PassManager:
    """Runs the passes of one compilation, configured by its :class:`CompileOptions`.

    ``rotations`` (from the ``calibration`` option) enables the rotate pass; ``decide`` replaces
    the CPU decode lowering's measured cost model (tests fix its answer).
    """

    def __init__(self, options: CompileOptions, rotations: Rotations | None = None, *,
                 decide: Callable[[int, int, torch.dtype, float], int] | None = None):
        self.options = options
        self.rotations = rotations
        self.decide = decide

    def run(self, gm: torch.fx.GraphModule, weights: WeightTable, add_constant: AddConstant,
            inference: bool) -> GraphResult:
        """Rewrite ``gm`` in place; ``inference`` enables the lowerings."""
        options, config = self.options, self.options.config
        passes: dict[str, int] = {}
        clean_up(gm)
        autocast = autocast_in_effect(gm)
        result = GraphResult([], passes, inference=inference, autocast=autocast,
                             before=op_counts(gm))
        lower = inference and not autocast

        def step(name: str, fn: Callable[[], int], graph: torch.fx.GraphModule = gm) -> int:
            passes[name] = passes.get(name, 0) + fn()
            clean_up(graph)
            return passes[name]

        # the bodies of higher-order ops (checkpointed layers) take the graph passes first
        for call, table in walk_bodies(gm, weights):
            inside = self._body_passes(call, table, step)
            rotated = [r for r in inside if self.rotations is not None and r.plan.sparse
                       and self.rotations.group_of(r.path) is not None]
            if rotated:
                raise ValueError(
                    f"option 'calibration': projections inside a {call.kind} region "
                    f"({', '.join(r.path for r in rotated[:3])}) cannot be rotated; compile "
                    f"without activation checkpointing there, or without the calibration")
            result.records += inside
        if config.relu2_glu:
            step("relu2_glu", lambda: relu2_glu(gm, weights))
        if self.rotations is not None:
            result.rotations = rotate_projections(gm, weights, config, self.rotations,
                                                  add_constant)
            step("rotate", lambda: len(result.rotations))
        records = sparsify_graph(gm, weights, config)
        result.records += records
        step("rewrite", lambda: sum(not r.plan.dense for r in records))
        if passes["rewrite"]:
            result.triton = triton_device(gm, options.kernels)
            if options.fuse:
                step("share", lambda: share_sparsify_inputs(gm))
            if lower and options.decode and result.triton is None:
                step("cpu_decode", lambda: lower_cpu_decode(gm, weights, config, add_constant,
                                                            decide=self.decide))
                step("dense_decode", lambda: lower_dense_decode(gm, weights, records,
                                                                add_constant))
            if options.fuse:
                step("fuse", lambda: fuse_norm_sparsify(gm))
            if result.triton is not None and lower and options.decode:
                # before the fold: it packs the formatted weights its groups read
                step("cuda_decode", lambda: lower_cuda_decode(
                    gm, weights, add_constant, device_type=result.triton))
            if lower:
                step("fold_weights", lambda: fold_weight_formats(gm, weights, add_constant))
            if result.triton is not None:
                # a differentiable op: training graphs take it too
                step("block_prefill", lambda: use_block_sparse_linear(gm))
                if lower:
                    step("triton", lambda: retarget_to_triton(gm.graph))
        result.after = op_counts(gm)
        result.graph = gm
        return result

    def _body_passes(self, call: SubgraphCall, weights: WeightTable,
                     step: Callable[..., int]) -> list[RewrittenProjection]:
        """The graph passes on one HOP body: GLU, rewrite, share and fuse (no lowerings: a
        body runs inside its HOP, which the lowerings' kernels do not enter)."""
        config, body = self.options.config, call.body
        if config.relu2_glu:
            step("relu2_glu", lambda: relu2_glu(body, weights), body)
        records = sparsify_graph(body, weights, config)
        rewritten = sum(not r.plan.dense for r in records)
        step("rewrite", lambda: rewritten, body)
        if rewritten and self.options.fuse:
            step("share", lambda: share_sparsify_inputs(body), body)
            step("fuse", lambda: fuse_norm_sparsify(body), body)
        return records
