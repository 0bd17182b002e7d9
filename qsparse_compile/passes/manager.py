"""The pass manager: the order of the passes, one clean-up, and what each pass did.

One object runs every pass over a normalised graph (:mod:`.normalise`), in one direction::

    [ReLU² GLU] -> [rotate] -> rewrite -> [share] -> [CPU decode] -> [fuse]
                -> [Triton: decode GEMV -> N:M prefill -> retarget to the kernels]

(bracketed: only where an option or the graph asks for it).

* The graph passes (GLU, rotate, rewrite, share, fuse) run on every graph, before autograd:
  the ``qsparse`` ops they insert carry the straight-through gradient.
* The lowerings (CPU decode, decode GEMV, Triton retargeting) run only on inference graphs
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

from ..options import CompileOptions
from ..rotations import Rotations
from .block_prefill import use_block_sparse_linear
from .constants import AddConstant
from .cpu_decode import lower_cpu_decode
from .cuda_decode import lower_cuda_decode
from .fuse_norm import fuse_norm_sparsify
from .graph_utils import op_counts
from .kernel_select import triton_device
from .relu2_glu import relu2_glu
from .rewrite import RewrittenProjection, sparsify_graph
from .rotate import RotatedInput, rotate_projections
from .share_inputs import share_sparsify_inputs
from .triton_lowering import retarget_to_triton
from .weights import WeightTable

__all__ = ["GraphResult", "PassManager", "clean_up"]


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
        inference: whether the graph was compiled for inference (lowerings allowed).
        before, after: op counts of the normalised graph before the passes and after them.
        graph: the graph as the inner compiler receives it.
        constants: placeholder name -> tensor, for the constants the passes added (prepared
            weights, rotations), where the graph takes them as extra inputs.
    """

    records: list[RewrittenProjection]
    passes: dict[str, int]
    rotations: list[RotatedInput] = dataclasses.field(default_factory=list)
    triton: str | None = None
    inference: bool = False
    before: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    after: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    graph: torch.fx.GraphModule | None = None
    constants: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

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
        result = GraphResult([], passes, inference=inference, before=op_counts(gm))

        def step(name: str, fn: Callable[[], int]) -> int:
            passes[name] = fn()
            clean_up(gm)
            return passes[name]

        if config.relu2_glu:
            step("relu2_glu", lambda: relu2_glu(gm, weights))
        if self.rotations is not None:
            result.rotations = rotate_projections(gm, weights, config, self.rotations,
                                                  add_constant)
            step("rotate", lambda: len(result.rotations))
        result.records = sparsify_graph(gm, weights, config)
        step("rewrite", lambda: sum(not r.plan.dense for r in result.records))
        if passes["rewrite"]:
            result.triton = triton_device(gm, options.kernels)
            if options.fuse:
                step("share", lambda: share_sparsify_inputs(gm))
            if inference and options.decode and result.triton is None:
                step("cpu_decode", lambda: lower_cpu_decode(gm, weights, config, add_constant,
                                                            decide=self.decide))
            if options.fuse:
                step("fuse", lambda: fuse_norm_sparsify(gm))
            if result.triton is not None:
                if inference and options.decode:
                    step("cuda_decode", lambda: lower_cuda_decode(
                        gm, weights, add_constant, device_type=result.triton))
                # a differentiable op: training graphs take it too
                step("block_prefill", lambda: use_block_sparse_linear(gm))
                if inference:
                    step("triton", lambda: retarget_to_triton(gm.graph))
        result.after = op_counts(gm)
        result.graph = gm
        return result
