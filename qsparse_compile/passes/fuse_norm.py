"""Fuse a norm, the sparsify after it, and the int8 quantizer into ``qsparse::norm_sparsify``.

The fusion is a set of patterns for PyTorch's pattern matcher (``PatternMatcherPass``): each
pattern is a small function — a norm, then ``topk_sparsify`` or ``block_sparsify``, optionally
``int8_fake_quant`` — traced with the normaliser the graphs go through
(:func:`~.normalise.trace_normalised`), so pattern and graph are the same dialect. Norms:

* RMSNorm as Llama-family models write it: ``w * (h * rsqrt(mean(h^2, -1) + eps)).to(dtype)``
  with ``h = x.to(float32)`` (the casts vanish when ``x`` is float32), the weight on either
  side of the product, or no weight;
* ``rms_norm`` (``F.rms_norm``, float32 only: in lower precision it computes in the input's
  dtype, which the fused op does not) and ``layer_norm``, with or without weight (and bias).

Scalars (``k``, ``n``, ``m``, ``eps``, the flags, dims and dtypes) are wildcards in the traced
patterns; :func:`_accepts` checks the ones that decide whether the fused op computes the same
thing (a mean over the last dimension with ``keepdim``, a square, float32 arithmetic, a
normalised shape of ``[D]``), and the replacement reads them from the matched nodes. The
norm's output must feed nothing but the sparsify (run :mod:`.share_inputs` first so q/k/v read
one): the pattern matcher refuses a match whose intermediate values have other users.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch
import torch.fx
import torch.nn.functional as F

from .. import ops  # noqa: F401  (registers torch.ops.qsparse)
from .graph_utils import insert_op, tensor_meta
from .node_args import arguments, is_call
from .normalise import trace_normalised
from .share_inputs import SPARSIFY_OPS

__all__ = ["fuse_norm_sparsify"]

aten = torch.ops.aten
qsparse = torch.ops.qsparse

_D = 8  # width of the tracing examples
_SKIP = Callable[[torch.fx.Node], bool]


@dataclasses.dataclass(frozen=True)
class _Norm:
    """A norm variant: how to write it, which parameters it takes, what the fused op calls it."""

    name: str
    kind: str  # "rms" | "layer"
    params: tuple[str, ...]  # of "w", "b"
    fn: Callable[..., torch.Tensor]
    dtype: torch.dtype = torch.float32  # the input dtype traced (casts appear below float32)


def _rms_chain(x, w=None, weight_first=True):
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    h = h.to(x.dtype)
    if w is None:
        return h
    return w * h if weight_first else h * w


def _norms() -> list[_Norm]:
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        tag = "fp32" if dtype == torch.float32 else "lowp"
        out += [
            _Norm(f"rms-chain-{tag}-w", "rms", ("w",), lambda x, w: _rms_chain(x, w), dtype),
            _Norm(f"rms-chain-{tag}-w-last", "rms", ("w",),
                  lambda x, w: _rms_chain(x, w, weight_first=False), dtype),
            _Norm(f"rms-chain-{tag}", "rms", (), lambda x: _rms_chain(x), dtype),
        ]
    out += [
        # the op computes in x's dtype: fused (as the RMS chain) only in float32, see _accepts
        _Norm("rms-op-w", "rms", ("w",), lambda x, w: F.rms_norm(x, (_D,), w, 1e-6)),
        _Norm("rms-op", "rms", (), lambda x: F.rms_norm(x, (_D,), None, 1e-6)),
        _Norm("rms-op-w-default-eps", "rms", ("w",), lambda x, w: F.rms_norm(x, (_D,), w)),
        _Norm("rms-op-default-eps", "rms", (), lambda x: F.rms_norm(x, (_D,))),
        _Norm("layer-op-wb", "layer", ("w", "b"),
              lambda x, w, b: F.layer_norm(x, (_D,), w, b, 1e-5)),
        _Norm("layer-op-w", "layer", ("w",), lambda x, w: F.layer_norm(x, (_D,), w, None, 1e-5)),
        _Norm("layer-op", "layer", (), lambda x: F.layer_norm(x, (_D,), None, None, 1e-5)),
    ]
    return out


def _search_fn(norm: _Norm, block: bool, quant: bool) -> Callable[..., torch.Tensor]:
    def search(*args):
        h = norm.fn(*args)
        s = qsparse.block_sparsify.default(h, 2, 4, False, True) if block else \
            qsparse.topk_sparsify.default(h, 3, False, True)
        return qsparse.int8_fake_quant.default(s) if quant else s

    return search


def _accepts(match, norm: _Norm) -> bool:
    """The scalar facts the traced (wildcard) pattern cannot check."""
    nodes = match.nodes
    out = match.output_node()
    sparsify = arguments(out)["x"] if is_call(out, qsparse.int8_fake_quant.default) else out
    h = arguments(sparsify)["x"]
    x = match.kwargs["x"]
    x_meta, h_meta = tensor_meta(x), tensor_meta(h)
    if x_meta is None or h_meta is None or x_meta.dim() == 0:
        return False
    dim = x_meta.shape[-1]
    for name in norm.params:  # a norm's parameters are vectors over the features
        param = tensor_meta(match.kwargs[name])
        if param is None or tuple(param.shape) != (dim,):
            return False
    if norm.name.startswith("rms-chain"):
        means = [n for n in nodes if is_call(n, aten.mean.dim)]
        powers = [n for n in nodes if is_call(n, aten.pow.Tensor_Scalar)]
        casts = [n for n in nodes if is_call(n, aten._to_copy.default)]
        if len(means) != 1 or len(powers) != 1:
            return False
        margs = arguments(means[0])
        dims = margs["dim"]
        dims = list(dims) if isinstance(dims, (list, tuple)) else [dims]
        if margs["keepdim"] is not True or len(dims) != 1 or dims[0] not in (-1, x_meta.dim() - 1):
            return False
        if arguments(powers[0])["exponent"] != 2:
            return False
        squared = tensor_meta(powers[0])
        if squared is None or squared.dtype != torch.float32:
            return False  # the fused op computes the norm in float32, as this chain must
        if any(arguments(c).get("dtype") not in (torch.float32, x_meta.dtype) for c in casts):
            return False
        return _eps(match, norm) is not None
    norm_node = next(n for n in nodes if is_call(n, aten.rms_norm.default,
                                                 aten.layer_norm.default))
    shape = arguments(norm_node)["normalized_shape"]
    if list(shape) != [dim]:
        return False
    if norm.kind == "rms":
        # rms_norm computes in x's dtype, the fused op (the Llama chain) in float32: the
        # same function only when everything is float32
        return x_meta.dtype == torch.float32 and all(
            tensor_meta(match.kwargs[p]).dtype == torch.float32 for p in norm.params)
    return True


def _eps(match, norm: _Norm) -> float | None:
    if norm.name.startswith("rms-chain"):
        adds = [n for n in match.nodes if is_call(n, aten.add.Tensor, aten.add.Scalar)]
        if len(adds) != 1:
            return None
        other = arguments(adds[0])["other"]
        return float(other) if isinstance(other, (int, float)) else None
    norm_node = next(n for n in match.nodes if is_call(n, aten.rms_norm.default,
                                                       aten.layer_norm.default))
    eps = arguments(norm_node)["eps"]
    if eps is None:  # rms_norm's default: the machine epsilon of the input's dtype
        x = tensor_meta(match.kwargs["x"])
        return torch.finfo(x.dtype).eps if norm.kind == "rms" else 1e-5
    return eps


def _replace(match, norm: _Norm, fused: list[int]) -> None:
    graph = match.graph
    out = match.output_node()
    quant = is_call(out, qsparse.int8_fake_quant.default)
    sparsify = arguments(out)["x"] if quant else out
    sargs = arguments(sparsify)
    if sparsify.target is qsparse.topk_sparsify.default:
        k, n, m = sargs["k"], 0, 0
    else:
        k, n, m = 0, sargs["n"], sargs["m"]
    eps = _eps(match, norm)
    eps = float(eps) if eps is not None else None
    with graph.inserting_before(out):
        new = insert_op(graph, qsparse.norm_sparsify.default, {
            "x": match.kwargs["x"], "norm": norm.kind,
            "weight": match.kwargs.get("w"), "bias": match.kwargs.get("b"),
            "eps": eps, "k": k, "n": n, "m": m, "rescale": sargs["rescale"], "quant": quant,
            "ste": sargs["ste"]}, sparsify)
    out.replace_all_uses_with(new)
    match.erase_nodes()
    fused[0] += 1


@functools.cache
def _patterns() -> tuple:
    """(pattern, norm) for every variant, traced once per process."""
    from torch._inductor.pattern_matcher import fx_to_pattern

    examples = {"w": torch.rand(_D) + 0.5, "b": torch.randn(_D)}
    out = []
    for norm in _norms():
        args = [torch.randn(2, _D).to(norm.dtype)] + [examples[p].to(norm.dtype)
                                                      for p in norm.params]
        for block in (False, True):
            for quant in (False, True):
                gm = trace_normalised(_search_fn(norm, block, quant), args)
                pattern = fx_to_pattern(
                    gm, argnames=("x", *norm.params),
                    ignore_types=(int, float, bool, list, tuple, torch.dtype, torch.device,
                                  torch.layout, torch.memory_format))
                out.append((pattern, norm))
    return tuple(out)


def fuse_norm_sparsify(gm: torch.fx.GraphModule, skip: _SKIP | None = None) -> int:
    """Rewrite ``gm`` in place; return the number of fused ops inserted.

    ``skip(sparsify_node)``: leave that sparsify unfused (the CPU decode lowering fuses its
    selection into the product instead, and wants the norm as it is).
    """
    from torch._inductor.pattern_matcher import PatternMatcherPass, register_graph_pattern

    fused = [0]
    patterns = PatternMatcherPass(pass_name="qsparse_fuse_norm")
    for pattern, norm in _patterns():
        def check(match, norm=norm):
            out = match.output_node()
            sparsify = arguments(out)["x"] if is_call(out, qsparse.int8_fake_quant.default) \
                else out
            if skip is not None and skip(sparsify):
                return False
            return _accepts(match, norm)

        def handle(match, *args, norm=norm, **kwargs):
            _replace(match, norm, fused)

        register_graph_pattern(pattern, extra_check=check, pass_dict=patterns)(handle)
    if any(is_call(n, *SPARSIFY_OPS) for n in gm.graph.nodes):
        patterns.apply(gm.graph)
    return fused[0]
