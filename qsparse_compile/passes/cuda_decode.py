"""Triton decode: one ``qsparse_triton::sparse_gemv`` per group of projections sharing an input.

The GPU analogue of :mod:`.cpu_decode`. After the rewrite, sharing and norm fusion a decoder
layer reads each sparsified tensor with several projections::

    S = qsparse.norm_sparsify(x, "rms", w, None, eps, k, 0, 0, rescale, quant, ste)
    q = qsparse.sparse_linear(S, W_q, b_q)
    k = qsparse.sparse_linear(S, W_k, b_k)
    v = qsparse.sparse_linear(S, W_v, b_v)

This pass replaces the projections with::

    y = qsparse_triton.sparse_gemv(S, Wt_cat, b_cat)
    q, k, v = y[..., 0:Nq], y[..., Nq:Nq+Nk], y[..., Nq+Nk:]          # views

where ``Wt_cat = cat([W_q^T, W_k^T, W_v^T], dim=1)`` (K-major, what the GEMV reads) is built
once, here, from the real weights and added to the graph as a constant (:mod:`.constants`): it
is never rebuilt per call. The GEMV skips the weight rows of features that are zero in every
row. The sparsifying op ``S`` is retargeted to its Triton kernel by :mod:`.triton_lowering`.

The pass runs after norm fusion (unlike the CPU pass, which fuses the selection into its own
GEMV and so wants the norm unfused): the Triton path fuses the norm into the selection instead.

Conditions (mirroring the CPU pass; otherwise the group keeps ``sparse_linear``):

* the graph is compiled for inference: the GEMV op has no backward (see :mod:`.cpu_decode`
  on why the compile-time grad mode is the one the graph runs under);
* the activation is fp32, fp16 or bf16 and every weight (and bias) is a real tensor of that
  dtype on the activation's device (CUDA for ``kernels="auto"``);
* the graph's rows per call (product of the leading dimensions) are static and at most the
  GEMV's ``MAX_TOKENS`` (8): one launch, the decode regime. Prefill graphs keep the generic
  path (and, for 2:4 patterns, :mod:`.block_prefill`). There is no measured cost model for the
  GPU yet, so every qualifying group is taken.

Quantized activations qualify (the GEMV reads whatever values the sparsify wrote).

Weight formats (``weights=``, ``head_weights=``, ``quant="bitnet"``): a group whose products
read their weights through one weight fake quantizer (``int8_weight_fake_quant``,
``int4_weight_fake_quant``, ``ternary_fake_quant``; the same for every member, recognised as
the CPU pass recognises them, :func:`~.decode_groups.group_members`) becomes::

    y = qsparse_triton.packed_gemv(S, fmt, N, packed, b_cat)

over the members' weights packed once, here, in the CPU kernel's K-major layout
(:func:`qsparse_compile.codegen.triton.packed_gemv.prepare_packed_weight`), on the
activation's device; the GEMV dequantises in registers. The quantizer nodes go with the
products. This pass therefore runs before :mod:`.fold_weights`, which folds the quantizers of
the groups left (prefill graphs, groups that do not qualify) into constants. The condition on
the weights' dtype and device is checked on the weight before its quantizer.
"""

from __future__ import annotations

import torch
import torch.fx

from .constants import AddConstant
from .decode_groups import (
    Member,
    group_members,
    k_major_weight,
    out_in_weights,
    prepared_constants,
    sparse_linear_inputs,
    splice_group,
    static_rows,
)
from .graph_utils import insert_op, tensor_meta
from .weights import WeightTable

__all__ = ["DTYPES", "lower_cuda_decode", "packed_weight"]

#: Activation dtypes the Triton GEMV accepts (``template_common.DTYPES``, which imports Triton).
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def lower_cuda_decode(gm: torch.fx.GraphModule, weights: WeightTable, add_constant: AddConstant,
                      *, device_type: str = "cuda") -> int:
    """Replace qualifying projection groups of ``gm`` by ``qsparse_triton.sparse_gemv``, or by
    ``qsparse_triton.packed_gemv`` where the weights take a format.

    Args:
        gm: an inference graph rewritten by :func:`~.rewrite.sparsify_graph` (optionally
            shared and norm-fused); edited in place.
        weights: the graph's weight table; ``weights.value`` must give the real tensors.
        add_constant: how the prepared weights join the graph (:mod:`.constants`).
        device_type: the device the weights and activations must be on: ``"cuda"`` for the
            automatic selection; ``"cpu"`` when ``kernels="triton"`` forces the kernels onto CPU
            tensors (Triton's interpreter, for tests).

    Returns:
        The number of groups replaced.
    """
    # imported here: the compiler must work without Triton until a Triton path is selected
    from ..codegen.triton import ops as triton_ops  # noqa: F401  (registers qsparse_triton)
    from ..codegen.triton.gemv import MAX_TOKENS

    graph = gm.graph
    replaced = 0
    for x_node in sparse_linear_inputs(graph):
        meta = tensor_meta(x_node)
        if meta is None or meta.dtype not in DTYPES or meta.dim() < 1 or \
                meta.device.type != device_type:
            continue
        rows = static_rows(meta)
        if rows is None or not 1 <= rows <= MAX_TOKENS:
            continue
        members = group_members(
            weights, x_node,
            lambda t, like=meta: t.device == like.device and t.dtype == like.dtype,
            formats=True)
        if members is None:
            continue
        fmt = members[0].format
        with graph.inserting_before(members[0].node):
            if fmt is None:
                wt_node, b_node = prepared_constants(
                    add_constant, members, meta.dtype, x_node,
                    lambda group, dtype=meta.dtype: k_major_weight(group, dtype))
                y = insert_op(graph, torch.ops.qsparse_triton.sparse_gemv.default,
                              {"x": x_node, "weight_t": wt_node, "bias": b_node},
                              members[0].node)
            else:
                packed_node, b_node = prepared_constants(
                    add_constant, members, meta.dtype, x_node,
                    lambda group, fmt=fmt: packed_weight(group, fmt))
                y = insert_op(graph, torch.ops.qsparse_triton.packed_gemv.default, {
                    "x": x_node, "fmt": fmt,
                    "out_features": sum(mb.out_features for mb in members),
                    "packed": packed_node, "bias": b_node}, members[0].node)
            splice_group(graph, members, y)
        replaced += 1
    return replaced


def packed_weight(members: list[Member], fmt: str) -> torch.Tensor:
    """The members' weights packed side by side in ``fmt``, on their device (the Triton
    packed GEMV's operand; the members' ``[in, out]`` Conv1D weights are transposed first)."""
    from ..codegen.triton.packed_gemv import prepare_packed_weight

    return prepare_packed_weight(out_in_weights(members), fmt, members[0].weight.device)
