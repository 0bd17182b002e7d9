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

**Expert weights** (a 3-D parameter ``[E, a, b]``, one matrix per expert) are projections too,
recognised by the parameter and the op, never by names:

* ``mm`` / ``addmm`` / ``mv`` on one expert ``select``-ed from it (a loop over experts);
* ``bmm`` on the weight ``index``-ed by a tensor of expert ids (one matrix per token row,
  Hugging Face's ``batched_mm``), or on the whole weight (batched over the experts) where the
  model's structure says it is an expert weight (any other batch of matrices is not a
  projection);
* a grouped product fed the whole weight (``aten._grouped_mm``, and
  ``transformers::grouped_mm_fallback``, which Hugging Face's default ``grouped_mm``
  implementation calls for non-bf16 weights under ``torch.compile``): rows sorted by expert,
  each multiplied by its expert's matrix.

Each is one projection whose path is the parameter's name (``...experts.gate_up_proj``), whose
``in_features`` / ``out_features`` are one expert's, and which the rewrite sparsifies in place:
the product is kept and its activation operand (one row per token) goes through the sparsify
op. Roles come from the weight table (:mod:`qsparse_compile.roles`); where it knows no module
structure (exported programs), the product whose output is the graph's output up to views,
casts and scaling, with as many outputs as an embedding the graph looks up has rows, is the
head.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx

from .dims import GATHERED, Traced, trace_dims
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
    #: what the projection does (:mod:`qsparse_compile.roles`)
    role: str = "other"
    #: an expert weight: how many experts it holds (0: an ordinary projection) and how many
    #: each token reads (None: unknown)
    experts: int = 0
    experts_per_token: int | None = None
    #: the rewrite keeps the product and sparsifies its activation operand in place (expert
    #: products: grouped, batched over experts or over gathered per-row weights)
    in_place: bool = False

    @property
    def params(self) -> int:
        return max(self.experts, 1) * self.in_features * self.out_features


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


def _expert_side(operand: object, weights: WeightTable, batch: bool) -> Traced | None:
    """The 3-D expert weight behind a product operand: one expert selected (2-D operand, or
    broadcast over a batch), gathered per row (batch dim :data:`GATHERED`) or batched over the
    experts (batch dim 0). Its last two dims are the expert matrix's (labels 1 and 2)."""
    traced = trace_dims(operand, weights.is_weight, experts=True)
    if traced is None:
        return None
    w = tensor_meta(traced.source)
    if w is None or w.dim() != 3:
        return None
    labels = traced.labels
    if len(labels) != (3 if batch else 2) or set(labels[-2:]) != {1, 2}:
        return None
    if batch and labels[0] not in (0, GATHERED, None):
        return None
    if batch and labels[0] == 0 and weights.expert_count(
            weights.projection_path(traced.source, traced.source)) is None:
        return None  # a batch of different matrices is expert weights only if the model says so
    return traced


def _is_expert_activation(node: object, weights: WeightTable) -> bool:
    return isinstance(node, torch.fx.Node) and trace_dims(
        node, weights.is_weight, experts=True) is None


def _match_products(node: torch.fx.Node, weights: WeightTable, side, is_activation):
    """(x, traced weight, weight_left, bias, x_arg, weight_arg) if ``node`` is a product of an
    activation and the weight ``side(operand, weights, batch)`` finds behind the other
    operand (``is_activation(operand, weights)``: the operand is not one)."""
    args = arguments(node)
    if node.target is aten.mv.default:
        left = side(args["self"], weights, False)
        if left is not None and is_activation(args["vec"], weights):
            return args["vec"], left, True, None, "vec", "self"
        return None
    if node.target is aten.addmm.default:
        if args["beta"] != 1 or args["alpha"] != 1:
            return None
        a_arg, b_arg, bias = "mat1", "mat2", args["self"]
    else:
        a_arg, b_arg, bias = "self", "mat2", None
    batch = node.target is aten.bmm.default
    right = side(args[b_arg], weights, batch)
    if right is not None and is_activation(args[a_arg], weights):
        return args[a_arg], right, False, bias, a_arg, b_arg
    left = side(args[a_arg], weights, batch)
    if left is not None and is_activation(args[b_arg], weights) and bias is None:
        return args[b_arg], left, True, None, b_arg, a_arg
    return None


def _match(node: torch.fx.Node, weights: WeightTable):
    """A projection on a 2-D weight (see :func:`_match_products`)."""
    return _match_products(node, weights, _weight_side, _is_activation)


def _match_expert(node: torch.fx.Node, weights: WeightTable):
    """As :func:`_match`, for a product reading an expert weight (see the module docstring)."""
    return _match_products(node, weights, _expert_side, _is_expert_activation)


def grouped_products() -> dict[object, tuple[str, str]]:
    """Grouped products this PyTorch (and transformers, if imported) has: op -> (activation
    argument, weight argument). The weight is ``[E, in, out]``; rows are sorted by expert."""
    ops: dict[object, tuple[str, str]] = {}
    grouped = getattr(aten, "_grouped_mm", None)
    if grouped is not None:
        ops[grouped.default] = ("self", "mat2")
    try:  # registered when transformers' MoE integration is imported
        ops[torch.ops.transformers.grouped_mm_fallback.default] = ("input", "weight")
    except (AttributeError, RuntimeError):
        pass
    return ops


def _match_grouped(node: torch.fx.Node, weights: WeightTable, ops: dict):
    """(x, traced weight, x_arg, weight_arg) if ``node`` is a grouped product of a 2-D
    activation with a whole expert weight."""
    x_arg, w_arg = ops[node.target]
    args = arguments(node)
    x = args.get(x_arg)
    meta = tensor_meta(x)
    if meta is None or meta.dim() != 2 or not _is_expert_activation(x, weights):
        return None
    traced = trace_dims(args.get(w_arg), weights.is_weight)
    w = None if traced is None else tensor_meta(traced.source)
    if w is None or w.dim() != 3 or traced.labels[0] != 0 or set(traced.labels[1:]) != {1, 2}:
        return None
    return x, traced, x_arg, w_arg


def _expert_projection(node: torch.fx.Node, x: torch.fx.Node, traced: Traced,
                       weights: WeightTable, contracted: int, **fields) -> Projection:
    shape = tuple(int(s) for s in tensor_meta(traced.source).shape)
    in_f, out_f = shape[contracted], shape[3 - contracted]
    path = weights.projection_path(traced.source, node)
    count = weights.expert_count(path)
    return Projection(
        node=node, x=x, weight=traced.source,
        weight_layout="out_in" if contracted == 2 else "in_out", bias=None, path=path,
        aliases=(path,), in_features=in_f, out_features=out_f, casts=traced.casts,
        weight_chain=traced.chain, experts=shape[0],
        experts_per_token=None if count is None else count.experts_per_token,
        in_place=True, **fields)


def find_projections(gm: torch.fx.GraphModule, weights: WeightTable) -> list[Projection]:
    """Every projection of the normalised graph ``gm``, in graph order, with its role."""
    found = _find(gm, weights)
    heads = set() if weights.roles.structural else _output_heads(gm, weights, found)
    for proj in found:
        proj.role = "head" if proj.node in heads else weights.role(proj.path)
    return found


def _find(gm: torch.fx.GraphModule, weights: WeightTable) -> list[Projection]:
    found = []
    grouped = grouped_products()
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in grouped:
            match = _match_grouped(node, weights, grouped)
            if match is not None:
                x, traced, x_arg, w_arg = match
                found.append(_expert_projection(node, x, traced, weights, traced.labels[1],
                                                x_arg=x_arg, weight_arg=w_arg))
            continue
        if not is_call(node, *_PRODUCTS):
            continue
        match = _match(node, weights)
        if match is None:
            expert = _match_expert(node, weights)
            if expert is not None:
                x, traced, weight_left, bias, x_arg, weight_arg = expert
                if bias is None:  # a per-expert bias would need its own gather: not seen yet
                    contracted = traced.labels[-1] if weight_left else traced.labels[-2]
                    found.append(_expert_projection(
                        node, x, traced, weights, contracted, weight_left=weight_left,
                        x_arg=x_arg, weight_arg=weight_arg,
                        vector=node.target is aten.mv.default))
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


_PASS_THROUGH = (aten.view.default, aten._unsafe_view.default, aten.reshape.default,
                 aten._to_copy.default, aten.clone.default, aten.alias.default,
                 aten.contiguous.default, aten.squeeze.dim, aten.unsqueeze.default,
                 aten.t.default, aten.transpose.int, aten.permute.default)
_SCALING = (aten.mul.Tensor, aten.div.Tensor, aten.mul.Scalar, aten.div.Scalar)


def _output_heads(gm: torch.fx.GraphModule, weights: WeightTable,
                  projections: list[Projection]) -> set[torch.fx.Node]:
    """Products whose output is the graph's output up to views, casts and scaling by a
    number, with as many outputs as an embedding the graph looks up has rows (the
    vocabulary): the head, where no module structure says it."""
    vocab = set()
    for node in gm.graph.nodes:
        if is_call(node, aten.embedding.default):
            table = tensor_meta(arguments(node)["weight"])
            if table is not None and table.dim() == 2:
                vocab.add(int(table.shape[0]))
    if not vocab:
        return set()
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    reached: set[torch.fx.Node] = set()
    stack = [a for a in torch.utils._pytree.tree_leaves(output.args)
             if isinstance(a, torch.fx.Node)]
    while stack:
        node = stack.pop()
        if node in reached:
            continue
        reached.add(node)
        if is_call(node, *_PASS_THROUGH):
            stack.append(node.args[0])
        elif is_call(node, *_SCALING) and not isinstance(node.args[1], torch.fx.Node):
            stack.append(node.args[0])
    return {p.node for p in projections
            if p.node in reached and p.out_features in vocab and not p.experts}


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
            path = weights.projection_path(traced.source, node)
            out.append(Projection(
                node=node, x=node, weight=traced.source, weight_layout="out_in", bias=None,
                path=path, in_features=in_f, role=weights.role(path),
                out_features=out_f, unsupported=f"left dense: {reason} is not rewritten"))
            break
    return out
