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

Quantized activations qualify (the GEMV reads whatever values the sparsify wrote); ternary
weights do not, since the weight is then a ``ternary_fake_quant`` node, not a real tensor.
"""

from __future__ import annotations

import torch
import torch.fx

from .constants import AddConstant
from .decode_groups import (
    group_members,
    k_major_weight,
    prepared_constants,
    sparse_linear_inputs,
    splice_group,
    static_rows,
)
from .graph_utils import insert_op, tensor_meta
from .weights import WeightTable

__all__ = ["DTYPES", "lower_cuda_decode"]

#: Activation dtypes the Triton GEMV accepts (``template_common.DTYPES``, which imports Triton).
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def lower_cuda_decode(gm: torch.fx.GraphModule, weights: WeightTable, add_constant: AddConstant,
                      *, device_type: str = "cuda") -> int:
    """Replace qualifying projection groups of ``gm`` by ``qsparse_triton.sparse_gemv``.

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
            lambda t, like=meta: t.device == like.device and t.dtype == like.dtype)
        if members is None:
            continue
        with graph.inserting_before(members[0].node):
            wt_node, b_node = prepared_constants(
                add_constant, members, meta.dtype, x_node,
                lambda group, dtype=meta.dtype: k_major_weight(group, dtype))
            y = insert_op(graph, torch.ops.qsparse_triton.sparse_gemv.default,
                          {"x": x_node, "weight_t": wt_node, "bias": b_node}, members[0].node)
            splice_group(graph, members, y)
        replaced += 1
    return replaced
