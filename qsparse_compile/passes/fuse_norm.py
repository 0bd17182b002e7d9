"""Fuse a norm, the sparsify after it, and the int8 quantizer into ``qsparse::norm_sparsify``.

Pattern: ``sparsify(norm(x))`` [``-> int8_fake_quant``] where ``norm`` is

* RMSNorm as Llama-family models trace it: ``w * (h * rsqrt(mean(h^2, -1) + eps)).to(dtype)``
  with ``h = x.to(float32)`` (the pow/mean/add/rsqrt/mul chain, torch-level or ATen), or
  ``rms_norm`` ops;
* LayerNorm: ``layer_norm(x, (D,), w, b, eps)``.

The norm's output must feed nothing but sparsify nodes (run :mod:`share_inputs` first so q/k/v
read one sparsify); otherwise it would still have to be materialised and fusing gains nothing.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx
import torch.nn.functional as F

from .graph_utils import insert_call
from .projections import tensor_meta
from .share_inputs import SPARSIFY_OPS
from .weights import WeightTable

aten = torch.ops.aten
qsparse = torch.ops.qsparse

_CAST_FUNCS = {aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout}
_CAST_METHODS = {"to", "float", "type"}
_MUL = {operator.mul, torch.mul, aten.mul.Tensor, "mul"}
_ADD = {operator.add, torch.add, aten.add.Tensor, "add"}
_RSQRT = {torch.rsqrt, aten.rsqrt.default, "rsqrt"}
_POW = {torch.pow, aten.pow.Tensor_Scalar, "pow"}
_MEAN = {torch.mean, aten.mean.dim, "mean"}
_LAYER_NORM = {F.layer_norm, torch.layer_norm, aten.layer_norm.default}
_RMS_NORM = {torch.rms_norm, aten.rms_norm.default} | (
    {F.rms_norm} if hasattr(F, "rms_norm") else set())


@dataclasses.dataclass
class NormMatch:
    """A matched norm: ``norm(x)`` with its parameters."""

    kind: str  # "rms" | "layer"
    x: torch.fx.Node
    weight: torch.fx.Node | None
    bias: torch.fx.Node | None
    eps: float


def _is(node: object, targets: set) -> bool:
    return isinstance(node, torch.fx.Node) and node.op in ("call_function", "call_method") \
        and node.target in targets


def _is_cast(node: object) -> bool:
    return isinstance(node, torch.fx.Node) and (
        (node.op == "call_function" and node.target in _CAST_FUNCS)
        or (node.op == "call_method" and node.target in _CAST_METHODS))


def _strip_casts(node: object) -> object:
    while _is_cast(node):
        node = node.args[0]
    return node


def _last_dim_mean(node: torch.fx.Node) -> bool:
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    dims = list(dims) if isinstance(dims, (list, tuple)) else [dims]
    meta = tensor_meta(node.args[0])
    last = {-1, meta.dim() - 1} if meta is not None else {-1}
    return keepdim is True and len(dims) == 1 and dims[0] in last


def _split(node: torch.fx.Node, pred) -> tuple[object, object] | None:
    """For a binary ``node``, the (operand matching ``pred``, other operand), in either order."""
    if len(node.args) != 2:
        return None
    a, b = node.args
    if pred(a):
        return a, b
    if pred(b):
        return b, a
    return None


def match_rms_chain(out: torch.fx.Node, weights: WeightTable) -> NormMatch | None:
    """``[w *] cast(h * rsqrt(mean(h^2) + eps))`` with ``h = cast(x)`` computed in float32."""
    weight = None
    core = out
    if _is(out, _MUL):
        split = _split(out, lambda n: weights.is_weight(n) and tensor_meta(n) is not None
                       and tensor_meta(n).dim() == 1)
        if split is not None:
            weight, core = split
    core = _strip_casts(core)
    if not _is(core, _MUL):
        return None
    split = _split(core, lambda n: _is(n, _RSQRT))
    if split is None:
        return None
    rsqrt, h = split
    add = rsqrt.args[0]
    if not _is(add, _ADD):
        return None
    split = _split(add, lambda n: _is(n, _MEAN))
    if split is None or not isinstance(split[1], (int, float)):
        return None
    mean, eps = split
    if not _last_dim_mean(mean):
        return None
    power = mean.args[0]
    if not (_is(power, _POW) and power.args[1] == 2 and power.args[0] is h):
        return None
    x = _strip_casts(h)
    h_meta, x_meta = tensor_meta(h), tensor_meta(x)
    if h_meta is None or x_meta is None or h_meta.dtype != torch.float32:
        return None  # the fused op computes the norm in float32, as this chain does
    return NormMatch("rms", x, weight, None, float(eps))


def match_norm(node: torch.fx.Node, weights: WeightTable) -> NormMatch | None:
    """Any supported norm producing ``node``."""
    if not isinstance(node, torch.fx.Node):
        return None
    meta = tensor_meta(node)
    if meta is None or meta.dim() == 0:
        return None
    if node.op == "call_function" and node.target in _LAYER_NORM | _RMS_NORM:
        is_layer = node.target in _LAYER_NORM
        names = ("input", "normalized_shape", "weight", "bias", "eps") if is_layer else (
            "input", "normalized_shape", "weight", "eps")
        args = dict(zip(names, node.args, strict=False)) | dict(node.kwargs)
        shape = args.get("normalized_shape")
        w, b = args.get("weight"), args.get("bias")
        eps = args.get("eps", 1e-5)
        if list(shape or []) != [meta.shape[-1]] or eps is None:
            return None
        if any(p is not None and not weights.is_weight(p) for p in (w, b)):
            return None
        return NormMatch("layer" if is_layer else "rms", args["input"], w, b, float(eps))
    return match_rms_chain(node, weights)


def fuse_norm_sparsify(gm: torch.fx.GraphModule, weights: WeightTable) -> int:
    """Rewrite ``gm`` in place; return the number of fused ops inserted."""
    graph = gm.graph
    fused = 0
    for node in list(graph.nodes):
        if not (node.op == "call_function" and node.target in SPARSIFY_OPS):
            continue
        norm_out = node.args[0]
        match = match_norm(norm_out, weights)
        if match is None:
            continue
        if any(not (u.op == "call_function" and u.target in SPARSIFY_OPS)
               for u in norm_out.users):
            continue
        if node.target == qsparse.topk_sparsify.default:
            _, k, rescale, ste = node.args
            n = m = 0
        else:
            _, n, m, rescale, ste = node.args
            k = 0
        users = list(node.users)
        quant = len(users) == 1 and users[0].op == "call_function" and \
            users[0].target == qsparse.int8_fake_quant.default
        replaced = users[0] if quant else node
        with graph.inserting_before(node):
            new = insert_call(graph, qsparse.norm_sparsify.default,
                              (match.x, match.kind, match.weight, match.bias, match.eps,
                               k, n, m, rescale, quant, ste), node)
        replaced.replace_all_uses_with(new)
        if quant:
            graph.erase_node(replaced)
        graph.erase_node(node)
        fused += 1
    _drop_dead_asserts(graph)
    graph.eliminate_dead_code()
    gm.recompile()
    return fused


def _drop_dead_asserts(graph: torch.fx.Graph) -> None:
    """Export graphs assert the dtype of norm intermediates; once fused, those are dead."""
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is aten._assert_tensor_metadata.default:
            src = node.args[0]
            if isinstance(src, torch.fx.Node) and len(src.users) == 1:
                graph.erase_node(node)
