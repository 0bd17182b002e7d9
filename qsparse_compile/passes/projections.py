"""Find the linear projections of a normalised graph: products with a constant weight matrix.

After :mod:`.normalise`, every spelling of ``x @ W^T (+ b)`` — ``F.linear``, ``x @ W.t()``,
``W.T``, ``transpose``, ``permute``, ``einsum`` with subscripts that contract an activation
with a weight, ``bmm`` with a weight broadcast over the batch, GPT-2 ``Conv1D``'s ``addmm``,
``W @ x`` — is one of three ATen products whose operands are reached through view-like ops:

* ``mm(A, B)`` and ``addmm(bias, A, B)`` (``beta = alpha = 1``);
* ``bmm(A, B)``, where the weight side is one matrix broadcast over the batch.

A product is a projection when one operand is a 2-D weight (a constant of the graph's
:class:`~.weights.WeightTable`) up to a transpose and size-1 or broadcast dimensions
(:mod:`.dims`), and the other operand is an activation (it does not itself come from weights).
The dimension the product contracts is the projection's input (its features), so the weight's
layout follows: ``"out_in"`` (``nn.Linear``) when the weight's second dimension is contracted,
``"in_out"`` (``Conv1D``, ``x @ W``) when its first is. ``W @ x`` (weight on the left)
contracts the activation's second-to-last dimension: its input is ``A^T``.
Products of two activations (attention scores, attention times values) are never projections.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx

from ..roles import role_of
from .dims import Traced, trace_dims
from .graph_utils import tensor_meta
from .node_args import arguments, is_call
from .weights import WeightTable

__all__ = ["Projection", "find_projections", "unsupported_projections"]

aten = torch.ops.aten

_PRODUCTS = (aten.mm.default, aten.addmm.default, aten.bmm.default, aten.mv.default)
#: products with a weight operand the rewrite does not take (scaled or accumulating forms):
#: found, recorded as dense with a note, and warned about, never skipped silently
_OTHER_PRODUCTS = (aten.addmv.default, aten.baddbmm.default, aten.addbmm.default)


@dataclasses.dataclass
class Projection:
    """One projection found in a graph.

    ``node`` is the product; ``x`` the activation operand as the product takes it; ``weight``
    the constant node; ``weight_layout`` ``"out_in"`` or ``"in_out"``; ``weight_left`` whether
    the product is ``W @ x`` (then the input is ``x``'s second-to-last dimension); ``bias`` a
    node (``addmm``), or None; ``casts`` the dtype conversions between the weight and the
    product (autocast), applied to the weight again in the rewrite.
    """

    node: torch.fx.Node
    x: torch.fx.Node
    weight: torch.fx.Node
    weight_layout: str
    bias: torch.fx.Node | None
    path: str
    in_features: int
    out_features: int
    weight_left: bool = False
    casts: tuple[torch.dtype, ...] = ()
    #: names of the product's arguments holding the activation and the weight side
    x_arg: str = "self"
    weight_arg: str = "mat2"
    #: view-like nodes from the weight to the product's weight operand
    weight_chain: tuple[torch.fx.Node, ...] = ()
    #: every path the projection may have (more than one: a tied weight, see WeightTable)
    aliases: tuple[str, ...] = ()
    #: ``mv``: ``x`` is one vector (no rows to transpose)
    vector: bool = False
    #: why the product cannot be rewritten ("" when it can)
    unsupported: str = ""

    @property
    def role(self) -> str:
        return role_of(self.path)

    @property
    def params(self) -> int:
        return self.in_features * self.out_features


def _weight_side(operand: object, weights: WeightTable, batch: bool) -> Traced | None:
    """The 2-D weight behind a product operand, its last two dims labelled 0/1 (the weight's
    dims) and any batch dims broadcast (None)."""
    traced = trace_dims(operand, weights.is_weight)
    if traced is None:
        return None
    w = tensor_meta(traced.source)
    if w is None or w.dim() != 2:
        return None
    labels = traced.labels
    if len(labels) != (3 if batch else 2) or set(labels[-2:]) != {0, 1}:
        return None
    if batch and labels[0] is not None:
        return None
    return traced


def _is_activation(node: object, weights: WeightTable) -> bool:
    """Whether ``node`` is not a weight viewed (the product is not weight x weight)."""
    return isinstance(node, torch.fx.Node) and trace_dims(node, weights.is_weight) is None


def _match(node: torch.fx.Node, weights: WeightTable):
    """(x, traced weight, weight_left, bias, x_arg, weight_arg) if ``node`` is a projection."""
    args = arguments(node)
    if node.target is aten.mv.default:
        left = _weight_side(args["self"], weights, False)
        if left is not None and _is_activation(args["vec"], weights):
            return args["vec"], left, True, None, "vec", "self"
        return None
    if node.target is aten.addmm.default:
        if args["beta"] != 1 or args["alpha"] != 1:
            return None
        a_arg, b_arg, bias = "mat1", "mat2", args["self"]
    else:
        a_arg, b_arg, bias = "self", "mat2", None
    a, b = args[a_arg], args[b_arg]
    batch = node.target is aten.bmm.default
    right = _weight_side(b, weights, batch)
    if right is not None and _is_activation(a, weights):
        return a, right, False, bias, a_arg, b_arg
    left = _weight_side(a, weights, batch)
    if left is not None and _is_activation(b, weights) and bias is None:
        return b, left, True, None, b_arg, a_arg
    return None


def find_projections(gm: torch.fx.GraphModule, weights: WeightTable) -> list[Projection]:
    """Every projection of the normalised graph ``gm``, in graph order."""
    found = []
    for node in gm.graph.nodes:
        if not is_call(node, *_PRODUCTS):
            continue
        match = _match(node, weights)
        if match is None:
            continue
        x, traced, weight_left, bias, x_arg, weight_arg = match
        w_shape = tuple(int(s) for s in tensor_meta(traced.source).shape)
        # the dimension of the weight the product contracts: the operand's second-to-last
        # when the weight is on the right (x @ B), its last when on the left (B @ x)
        contracted = traced.labels[-1] if weight_left else traced.labels[-2]
        layout = "out_in" if contracted == 1 else "in_out"
        out_f, in_f = w_shape if layout == "out_in" else w_shape[::-1]
        paths = weights.projection_paths(traced.source, node)
        found.append(Projection(
            node=node, x=x, weight=traced.source, weight_layout=layout,
            bias=bias if isinstance(bias, torch.fx.Node) else None,
            path=paths[0], aliases=tuple(paths),
            in_features=in_f, out_features=out_f, weight_left=weight_left,
            casts=traced.casts, x_arg=x_arg, weight_arg=weight_arg,
            weight_chain=traced.chain, vector=node.target is aten.mv.default))
    return found


def unsupported_projections(gm: torch.fx.GraphModule, weights: WeightTable
                            ) -> list[Projection]:
    """Products with a 2-D weight operand that :func:`find_projections` does not take
    (``addmm`` with ``alpha`` or ``beta`` other than 1, ``addmv``, ``baddbmm``, ``addbmm``),
    each with the reason in ``unsupported``."""
    out = []
    for node in gm.graph.nodes:
        scaled = is_call(node, aten.addmm.default) and (
            arguments(node)["beta"] != 1 or arguments(node)["alpha"] != 1)
        if not (scaled or is_call(node, *_OTHER_PRODUCTS)):
            continue
        args = arguments(node)
        for name in ("mat1", "mat2", "batch1", "batch2", "mat", "vec"):
            traced = trace_dims(args.get(name), weights.is_weight)
            w = None if traced is None else tensor_meta(traced.source)
            if w is None or w.dim() != 2:
                continue
            out_f, in_f = (int(s) for s in w.shape)
            reason = (f"{node.target.name()} with alpha={args.get('alpha')}, "
                      f"beta={args.get('beta')}" if scaled else node.target.name())
            out.append(Projection(
                node=node, x=node, weight=traced.source, weight_layout="out_in", bias=None,
                path=weights.projection_path(traced.source, node), in_features=in_f,
                out_features=out_f, unsupported=f"left dense: {reason} is not rewritten"))
            break
    return out
