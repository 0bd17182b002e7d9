"""Find the linear projections of an FX graph: ``x @ W^T (+ b)`` with ``W`` a constant weight.

Recognised spellings, at the torch level (Dynamo) and the ATen level (``torch.export``):
``F.linear`` / ``aten.linear``; ``matmul`` / ``mm`` / ``@`` with the weight, or its transpose,
on the right; ``addmm(b, x, W)`` (GPT-2's ``Conv1D``, weight stored ``[in, out]``, and
decomposed ``linear``); ``bmm(x, W^T expanded over the batch)`` (how the ATen decomposition
spells a ``linear`` whose 3-D input is not contiguous). A product whose right operand is not
a weight (attention scores, attention times values) is not a projection and is never returned.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx
import torch.nn.functional as F

from .module_path import projection_path, role_of
from .weights import WeightTable

aten = torch.ops.aten

_LINEAR = {torch._C._nn.linear, F.linear, aten.linear.default}
_MATMUL = {torch.matmul, operator.matmul, aten.matmul.default, torch.mm, aten.mm.default}
_ADDMM = {torch.addmm, aten.addmm.default}
_BMM = {torch.bmm, aten.bmm.default}
_BROADCASTS = {aten.expand.default, aten.view.default, aten._unsafe_view.default,
               aten.reshape.default}
_MATMUL_METHODS = {"matmul", "__matmul__", "mm"}
_TRANSPOSE_FUNCS = {torch.t, aten.t.default, aten.numpy_T.default}


@dataclasses.dataclass
class Projection:
    """One projection found in a graph.

    ``weight`` is the constant node; ``weight_layout`` is ``"out_in"`` (``nn.Linear``) or
    ``"in_out"`` (``Conv1D``, ``x @ W``); ``bias`` is a node, or None.
    """

    node: torch.fx.Node
    x: torch.fx.Node
    weight: torch.fx.Node
    weight_layout: str
    bias: torch.fx.Node | None
    path: str
    in_features: int
    out_features: int

    @property
    def role(self) -> str:
        return role_of(self.path)

    @property
    def params(self) -> int:
        return self.in_features * self.out_features


def tensor_meta(node: object) -> torch.Tensor | None:
    """The (fake) tensor a node produces, as recorded by the tracer."""
    if not isinstance(node, torch.fx.Node):
        return None
    value = node.meta.get("val", node.meta.get("example_value"))
    if value is None and "grapharg" in node.meta:
        value = getattr(node.meta["grapharg"], "fake_tensor", None)
    return value if isinstance(value, torch.Tensor) else None


def _arg(node: torch.fx.Node, index: int, name: str):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name)


def _transposed_weight(node: object, weights: WeightTable) -> torch.fx.Node | None:
    """The weight ``W`` if ``node`` is ``W.t()`` / ``W.T`` / ``W.transpose(0, 1)``."""
    if not isinstance(node, torch.fx.Node) or not node.args:
        return None
    base = node.args[0]
    if not weights.is_weight(base):
        return None
    if node.op == "call_function" and node.target in _TRANSPOSE_FUNCS:
        return base
    if node.op == "call_method" and node.target == "t":
        return base
    if node.op == "call_function" and node.target is getattr and node.args[1] in ("T", "mT"):
        return base
    dims = tuple(node.args[1:]) or tuple(node.kwargs.values())
    if node.target in (torch.transpose, aten.transpose.int, "transpose") and set(dims) in (
        {0, 1}, {0, -1}, {-2, -1}, {-2, 1}
    ):
        return base
    if node.target in (torch.permute, aten.permute.default, "permute"):
        perm = dims[0] if len(dims) == 1 and isinstance(dims[0], (list, tuple)) else dims
        if list(perm) in ([1, 0], [-1, -2], [1, -2], [-1, 0]):
            return base
    return None


def _weight_operand(rhs: object, weights: WeightTable) -> tuple[torch.fx.Node, str] | None:
    if weights.is_weight(rhs):
        return rhs, "in_out"
    base = _transposed_weight(rhs, weights)
    return (base, "out_in") if base is not None else None


def _batch_broadcast_weight(rhs: object, weights: WeightTable
                            ) -> tuple[torch.fx.Node, str] | None:
    """The weight operand under ``view(expand(w, [b, in, out]), [b, in, out])``.

    Every wrapper must keep the weight's two dimensions as its last two, so the batch
    dimension is a pure broadcast of one matrix and ``bmm`` is ``b`` copies of ``x @ w``.
    """
    node = rhs
    meta = tensor_meta(rhs)
    if meta is None or meta.dim() != 3:
        return None
    while isinstance(node, torch.fx.Node) and node.op == "call_function" \
            and node.target in _BROADCASTS and node.args:
        out = tensor_meta(node)
        if out is None or tuple(out.shape[-2:]) != tuple(meta.shape[-2:]):
            return None
        node = node.args[0]
    base = tensor_meta(node)
    if base is None or base.dim() != 2 or tuple(base.shape) != tuple(meta.shape[-2:]):
        return None
    return _weight_operand(node, weights)


def _match(node: torch.fx.Node, weights: WeightTable):
    """(x, weight, layout, bias) if ``node`` is a projection, else None."""
    if node.op == "call_function" and node.target in _LINEAR:
        x, w, b = _arg(node, 0, "input"), _arg(node, 1, "weight"), _arg(node, 2, "bias")
        if weights.is_weight(w):
            return x, w, "out_in", b
        return None
    is_matmul = (node.op == "call_function" and node.target in _MATMUL) or (
        node.op == "call_method" and node.target in _MATMUL_METHODS
    )
    if is_matmul and len(node.args) >= 2:
        found = _weight_operand(node.args[1], weights)
        if found is not None:
            return node.args[0], found[0], found[1], None
        return None
    if node.op == "call_function" and node.target in _ADDMM and len(node.args) >= 3:
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            return None
        found = _weight_operand(node.args[2], weights)
        if found is not None:
            return node.args[1], found[0], found[1], node.args[0]
    if node.op == "call_function" and node.target in _BMM and len(node.args) == 2:
        x_meta = tensor_meta(node.args[0])
        found = _batch_broadcast_weight(node.args[1], weights)
        if found is not None and x_meta is not None and x_meta.dim() == 3:
            return node.args[0], found[0], found[1], None
    return None


def find_projections(gm: torch.fx.GraphModule, weights: WeightTable) -> list[Projection]:
    """Every projection of ``gm`` in graph order."""
    found = []
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        match = _match(node, weights)
        if match is None:
            continue
        x, weight, layout, bias = match
        w_meta = tensor_meta(weight)
        if not isinstance(x, torch.fx.Node) or weights.is_weight(x):
            continue
        if w_meta is None or w_meta.dim() != 2:
            continue
        shape = tuple(int(s) for s in w_meta.shape)
        out_f, in_f = shape if layout == "out_in" else shape[::-1]
        found.append(Projection(
            node=node, x=x, weight=weight, weight_layout=layout,
            bias=bias if isinstance(bias, torch.fx.Node) else None,
            path=projection_path(node, weights.name(weight)),
            in_features=in_f, out_features=out_f,
        ))
    return found
