"""Follow a tensor's dimensions back through view-like ATen ops.

Normalised graphs reach a weight, or an activation's rows, through chains of ``t``,
``permute``, ``view``, ``unsqueeze``, ``expand`` (an ``einsum`` makes several of them). This
module answers, for a node: which source node does it view, and which of the node's dimensions
is which dimension of the source? Dimensions are tracked as *labels* (the source dimension's
index, or None for a dimension of size 1 or a broadcast). A view (``view``, ``reshape``) is
followed only where it moves no labelled dimension's data: its non-size-1 sizes, read in order,
are the same before and after (it only adds or drops size-1 dimensions); for activations,
merging or splitting the dimensions *before* the last (rows) is allowed as well.

Expert weights (a 3-D parameter, one matrix per expert) reach a product through one more step,
followed only when asked (``experts=True``): ``select`` of one expert (its dimension dropped)
or ``index`` by a tensor of expert ids (each row of the result one expert's matrix, labelled
:data:`GATHERED`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.fx

from .graph_utils import tensor_meta
from .node_args import arguments

__all__ = ["EXPERT_OPS", "GATHERED", "Traced", "feature_view", "trace_dims", "VIEW_OPS"]

aten = torch.ops.aten

_ALIASES = {aten.alias.default, aten.detach.default}
_COPIES = {aten.clone.default, aten.lift_fresh_copy.default, aten._to_copy.default,
           aten.contiguous.default}
_SAME = _ALIASES | _COPIES
_VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}
_TRANSPOSES = {aten.t.default, aten.transpose.int, aten.permute.default}
_UNSQUEEZE = {aten.unsqueeze.default}
_SQUEEZE = {aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default}
_EXPAND = {aten.expand.default}

#: Ops this module follows (one tensor input, the first argument).
VIEW_OPS = frozenset(_SAME | _VIEWS | _TRANSPOSES | _UNSQUEEZE | _SQUEEZE | _EXPAND)

#: Ops that pick experts out of a 3-D expert weight (followed with ``experts=True``).
EXPERT_OPS = frozenset({aten.select.int, aten.index.Tensor})

#: The label of dimensions that index a weight's first dimension by a tensor of ids.
GATHERED = "gathered"

Labels = tuple[object, ...]


@dataclasses.dataclass(frozen=True)
class Traced:
    """``node`` views ``source``: dimension ``i`` of ``node`` is ``labels[i]`` of the source
    (a source dimension index, ``"rows"`` for merged leading dimensions, or None)."""

    source: torch.fx.Node
    labels: Labels
    chain: tuple[torch.fx.Node, ...]  # the view nodes from the source (excluded) to the node
    casts: tuple[torch.dtype, ...]  # dtype conversions on the way


def _shape(node: object) -> tuple[int, ...] | None:
    meta = tensor_meta(node)
    return None if meta is None else tuple(meta.shape)


def _norm_dims(dims: object, rank: int) -> list[int]:
    seq = list(dims) if isinstance(dims, (list, tuple)) else [dims]
    return [d % rank if rank else 0 for d in seq]


def _apply(node: torch.fx.Node, labels: Labels, rows: bool) -> Labels | None:
    """The labels of ``node``'s output given its input's, or None if it cannot be followed."""
    target = node.target
    args = arguments(node)
    src, out = _shape(args["self"]), _shape(node)
    if src is None or out is None or len(src) != len(labels):
        return None
    if target in _SAME:
        return labels
    if target is aten.t.default:
        return labels[::-1] if len(labels) == 2 else labels
    if target is aten.transpose.int:
        d0, d1 = _norm_dims([args["dim0"], args["dim1"]], len(labels))
        new = list(labels)
        new[d0], new[d1] = new[d1], new[d0]
        return tuple(new)
    if target is aten.permute.default:
        return tuple(labels[d] for d in _norm_dims(args["dims"], len(labels)))
    if target in _UNSQUEEZE:
        new = list(labels)
        new.insert(args["dim"] % (len(labels) + 1), None)
        return tuple(new)
    if target in _SQUEEZE:
        return _follow_sizes(src, out, labels)
    if target in _EXPAND:
        lead = len(out) - len(src)
        new = [None] * lead + list(labels)
        for i, label in enumerate(new):
            # a labelled dimension must keep its size: broadcasting it would repeat data
            if label is not None and label != "rows" and out[i] != src[i - lead]:
                return None
        return tuple(new)
    if target is aten.select.int:
        dim = args["dim"] % len(labels)
        return labels[:dim] + labels[dim + 1:]
    if target is aten.index.Tensor:
        indices = args["indices"]
        # only ``w[ids]``: one index tensor, on the first dimension
        if len(indices) != 1 or not isinstance(indices[0], torch.fx.Node):
            return None
        ids = _shape(indices[0])
        if ids is None:
            return None
        return (GATHERED,) * len(ids) + labels[1:]
    if target in _VIEWS:
        found = _follow_sizes(src, out, labels)
        if found is None and rows:
            found = _merge_rows(src, out, labels)
        return found
    return None


def _follow_sizes(src: tuple[int, ...], out: tuple[int, ...], labels: Labels) -> Labels | None:
    """Labels across a view that only adds or removes size-1 dimensions."""
    kept = [(s, lab) for s, lab in zip(src, labels, strict=True) if s != 1]
    if [s for s in out if s != 1] != [s for s, _ in kept]:
        return None
    it = iter(lab for _, lab in kept)
    return tuple(None if s == 1 else next(it) for s in out)


def _merge_rows(src: tuple[int, ...], out: tuple[int, ...], labels: Labels) -> Labels | None:
    """Labels across a view that regroups the leading dimensions (rows) and keeps the last
    non-size-1 dimension, the features, whole and last."""
    non1 = [i for i, s in enumerate(src) if s != 1]
    if not non1 or not out:
        return None
    last = non1[-1]
    feature = labels[last]
    if any(lab == feature for i, lab in enumerate(labels) if i != last):
        return None
    if out[-1] != src[last]:
        return None
    return tuple(["rows" if s != 1 else None for s in out[:-1]] + [feature])


def trace_dims(node: object, is_source: Callable[[torch.fx.Node], bool], *,
               rows: bool = False, copies: bool = True, experts: bool = False,
               max_depth: int = 32) -> Traced | None:
    """Follow ``node`` back through view-like ops to the first node ``is_source`` accepts.

    ``rows=True`` also follows views that regroup the leading dimensions (activation rows);
    ``experts=True`` also follows :data:`EXPERT_OPS` (experts picked from a 3-D weight);
    ``copies=False`` follows only ops whose result aliases their input (no ``clone``, casts or
    other copies: a copy is a snapshot, which a later in-place write to its source does not
    reach). Returns None where the chain leaves those ops, or a view moves data between
    tracked dimensions.
    """
    chain: list[torch.fx.Node] = []
    current = node
    followed = VIEW_OPS | EXPERT_OPS if experts else VIEW_OPS
    while isinstance(current, torch.fx.Node) and not is_source(current):
        if len(chain) >= max_depth or current.op != "call_function" or \
                current.target not in followed or (not copies and current.target in _COPIES):
            return None
        chain.append(current)
        current = arguments(current)["self"]
    if not isinstance(current, torch.fx.Node):
        return None
    shape = _shape(current)
    if shape is None:
        return None
    labels: Labels = tuple(range(len(shape)))
    casts = []
    for view in reversed(chain):
        found = _apply(view, labels, rows)
        if found is None:
            return None
        labels = found
        if view.target is aten._to_copy.default and arguments(view).get("dtype") is not None:
            casts.append(arguments(view)["dtype"])
    return Traced(current, labels, tuple(reversed(chain)), tuple(casts))


def feature_view(node: object, is_source: Callable[[torch.fx.Node], bool], *,
                 copies: bool = True) -> Traced | None:
    """``node`` as a view of a source's rows: its last dimension is the source's last
    dimension, and every other dimension is rows (or size 1), so a row-wise op commutes with
    the chain (``sparsify(view(x)) == view(sparsify(x))``). None otherwise. ``copies``: as
    for :func:`trace_dims` (pass False where the graph mutates tensors in place)."""
    traced = trace_dims(node, is_source, rows=True, copies=copies)
    if traced is None or not traced.labels:
        return None
    if any(view.target is aten._to_copy.default for view in traced.chain):
        return None  # a cast does not commute with top-K (rounding makes new ties)
    last = len(_shape(traced.source) or ()) - 1
    if traced.labels[-1] != last:
        return None
    if any(lab == last for lab in traced.labels[:-1]):
        return None
    return traced
