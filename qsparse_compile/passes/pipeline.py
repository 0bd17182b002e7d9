"""The pass pipeline, one direction: [ReLU² GLU] -> [rotate] -> rewrite -> share -> [CPU decode]
-> fuse -> [Triton path: decode GEMV -> N:M prefill -> lowering on CPU tensors]."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterator

import torch.fx

from ..calibration import Calibration
from ..config import QSparseConfig
from .block_prefill import use_block_sparse_linear
from .constants import AddConstant
from .cpu_decode import prepare_cpu_decode
from .cuda_decode import prepare_cuda_decode
from .fuse_norm import fuse_norm_sparsify
from .kernel_select import triton_device
from .relu2_glu import relu2_glu
from .rewrite import RewrittenProjection, sparsify_graph
from .rotate import RotatedInput, rotate_projections
from .share_inputs import share_sparsify_inputs
from .triton_lowering import lower_to_triton
from .weights import WeightTable


@dataclasses.dataclass
class PassResult:
    """What the pipeline did to one graph."""

    records: list[RewrittenProjection]
    shared: int  # sparsify nodes removed because projections read the same tensor
    fused: int  # norm + sparsify (+ quant) groups replaced by one fused op
    relu2: int = 0  # GLU gate activations replaced by the squared ReLU
    decode: int = 0  # projection groups replaced by one fused CPU decode op (cpu_topk_linear)
    #: inputs rotated by a calibration (``x @ Q``, one per shared input), see passes.rotate
    rotations: list[RotatedInput] = dataclasses.field(default_factory=list)
    #: device type the Triton kernels were selected for (None: default ops), see kernel_select;
    #: on that path ``decode`` counts groups replaced by ``qsparse_triton.sparse_gemv``
    triton: str | None = None
    block_linear: int = 0  # sparse_linear on N:M-masked inputs -> qsparse.block_sparse_linear
    lowered: int = 0  # sparsify nodes calling qsparse_triton ops explicitly (CPU tensors)


def has_side_effects(node: torch.fx.Node) -> bool:
    """Whether dead-code elimination must keep ``node`` although nothing reads its result.

    ``Node.is_impure`` knows mutating ``call_function`` targets, but calls every
    ``call_method`` pure, so an in-place *method* whose result is unused (Dynamo records
    ``keys.index_copy_(2, pos, k)`` that way when a static KV cache is filled) would be
    deleted, and the cache never written. Tensor methods ending in ``_`` are in place.
    """
    if node.is_impure():
        return True
    return (node.op == "call_method" and isinstance(node.target, str)
            and node.target.endswith("_") and not node.target.startswith("_"))


@contextlib.contextmanager
def _keep_side_effects(graph: torch.fx.Graph) -> Iterator[None]:
    """Within the block, ``graph.eliminate_dead_code()`` keeps every node with side effects.

    The passes each end with a plain ``eliminate_dead_code()``; binding the predicate on this
    graph object covers all of them at once.
    """
    graph.eliminate_dead_code = functools.partial(  # type: ignore[method-assign]
        torch.fx.Graph.eliminate_dead_code, graph, is_impure_node=has_side_effects)
    try:
        yield
    finally:
        del graph.eliminate_dead_code


def run_passes(gm: torch.fx.GraphModule, weights: WeightTable, config: QSparseConfig,
               fuse: bool = True, decode: bool = True, calibration: Calibration | None = None,
               add_constant: AddConstant | None = None, kernels: str = "auto") -> PassResult:
    """Rewrite ``gm`` in place.

    ``fuse=False`` skips sharing and norm fusion. ``decode=True`` replaces each group of
    projections reading one sparsified input by a single ``qsparse::cpu_topk_linear`` (selection
    fused into a CPU sparse GEMV) where :func:`~.cpu_decode.prepare_cpu_decode` finds it pays:
    inference (grad mode off), real CPU weights, few rows per call; the norms before those
    groups stay ordinary ops (the inner compiler fuses them), the others may still be fused.
    ``calibration`` rotates the inputs of the projections that will be sparsified first
    (:func:`~.rotate.rotate_projections`; ``add_constant`` says how its folded weights join
    the graph, default a buffer of ``gm``).

    ``kernels`` (``"auto"`` or ``"triton"``, see :mod:`.kernel_select`) may select the Triton
    path instead: then decode groups become one ``qsparse_triton.sparse_gemv`` over weights
    prepared once (:mod:`.cuda_decode`, after norm fusion, so the fused norm + sparsify kernel
    feeds it), the other projections on 2:4-compatible N:M inputs become
    ``qsparse.block_sparse_linear`` (:mod:`.block_prefill`), and on CPU tensors the sparsify
    ops are lowered to ``qsparse_triton`` ops (:mod:`.triton_lowering`).
    """
    with _keep_side_effects(gm.graph):
        relu2 = relu2_glu(gm, weights) if config.relu2_glu else 0
        rotations = [] if calibration is None else rotate_projections(
            gm, weights, config, calibration, add_constant)
        records = sparsify_graph(gm, weights, config)
        shared = fused = decoded = block_linear = lowered = 0
        triton = None
        if any(not r.plan.dense for r in records):
            triton = triton_device(gm, kernels)
            if fuse:
                shared = share_sparsify_inputs(gm)
            if decode and triton is None:
                # before norm fusion: the groups it takes keep their norm as an ordinary op
                decoded = prepare_cpu_decode(gm, weights, config)
            if fuse:
                fused = fuse_norm_sparsify(gm, weights)
            if triton is not None:
                if decode:
                    decoded = prepare_cuda_decode(gm, weights, device_type=triton)
                block_linear = use_block_sparse_linear(gm)
                if triton != "cuda":  # no device key routes CPU tensors to the kernels
                    lowered = lower_to_triton(gm)
    gm.graph.lint()
    return PassResult(records, shared, fused, relu2, decoded, rotations, triton=triton,
                      block_linear=block_linear, lowered=lowered)
