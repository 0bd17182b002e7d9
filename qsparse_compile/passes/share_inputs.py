"""Share one sparsify node among projections that read the same tensor.

Top-K and N:M act on each row independently, so ``sparsify(view(x)) == view(sparsify(x))``
whenever the view keeps the features as the last dimension and only rearranges rows
(:func:`~.dims.feature_view`). Graphs often reach one tensor through different views (a
decomposed ``linear`` reshapes its input per projection; GPT-2 flattens before ``addmm``; an
``einsum`` permutes). Sparsify nodes whose inputs are feature views of one root tensor, with
the same arguments, become one sparsify of the root, followed by each projection's own view.
This makes q/k/v (and gate/up) select once, and puts the sparsify right after the norm that
produced the root, where the fusion pass finds it. Casts are not views here: top-K of a
rounded tensor is not the rounded top-K.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.fx

from .dims import VIEW_OPS, feature_view
from .graph_utils import insert_call, insert_like, insert_op
from .node_args import arguments, freeze, is_call, is_mutation, mutation_between

__all__ = ["SPARSIFY_OPS", "graph_mutates", "root_view", "share_sparsify_inputs"]

aten = torch.ops.aten
qsparse = torch.ops.qsparse

SPARSIFY_OPS = (qsparse.topk_sparsify.default, qsparse.block_sparsify.default)


def _quant_user(node: torch.fx.Node) -> torch.fx.Node | None:
    """The int8 quantizer applied to a sparsify's output, when it is its only user."""
    users = list(node.users)
    if len(users) == 1 and is_call(users[0], qsparse.int8_fake_quant.default):
        return users[0]
    return None


def graph_mutates(graph: torch.fx.Graph) -> bool:
    """Whether any op of ``graph`` writes to a tensor in place."""
    return any(is_mutation(n) for n in graph.nodes)


def root_view(x: torch.fx.Node, copies: bool = True
              ) -> tuple[torch.fx.Node, tuple[torch.fx.Node, ...]]:
    """(root, views from it to ``x``): the furthest node back along view-like ops of which
    ``x`` is a feature view (``x`` itself, with no views, when there is none). ``copies=False``
    stops at copies (for graphs with in-place writes: see :func:`~.dims.trace_dims`)."""
    best: tuple[torch.fx.Node, tuple[torch.fx.Node, ...]] = (x, ())
    node: object = x
    while is_call(node, *VIEW_OPS):
        node = arguments(node)["self"]
        traced = feature_view(x, lambda n, candidate=node: n is candidate, copies=copies)
        if traced is not None:
            best = (traced.source, traced.chain)
    return best


def share_sparsify_inputs(gm: torch.fx.GraphModule) -> int:
    """Rewrite ``gm`` in place; return how many sparsify nodes were removed by sharing.

    A sparsify followed only by ``int8_fake_quant`` moves as one unit (quantization is per row
    too), so the fusion pass later finds the quantizer right after the sparsify.
    """
    graph = gm.graph
    copies = not graph_mutates(graph)
    nodes = [n for n in graph.nodes if is_call(n, *SPARSIFY_OPS)]
    groups: dict[tuple, list] = defaultdict(list)
    for node in nodes:
        args = arguments(node)
        x = args.pop("x")
        root, chain = root_view(x, copies)
        quant = _quant_user(node)
        key = (root, node.target, freeze(args), quant is not None)
        groups[key].append((node, quant, chain))
    removed = 0
    for (root, target, rest, quantized), group in groups.items():
        for members in _between_mutations(group):
            removed += _share(graph, root, target, rest, quantized, members)
    return removed


def _between_mutations(group: list) -> list[list]:
    """``group`` (in graph order) cut wherever an in-place write runs between two members:
    a sparsify computed before it must not serve a projection after it."""
    runs = [[group[0]]]
    for member in group[1:]:
        if mutation_between(runs[-1][-1][0], member[0]):
            runs.append([member])
        else:
            runs[-1].append(member)
    return runs


def _share(graph: torch.fx.Graph, root: torch.fx.Node, target, rest, quantized: bool,
           members: list) -> int:
    """Replace ``members`` (sparsify nodes of feature views of ``root``) by one sparsify of
    ``root``; return how many nodes that removed."""
    if len(members) == 1 and not members[0][2]:
        return 0
    first = members[0][0]
    with graph.inserting_before(first):
        shared = insert_op(graph, target, {"x": root, **dict(rest)}, first)
        if quantized:
            shared = insert_call(graph, qsparse.int8_fake_quant.default, (shared,),
                                 members[0][1])
    views: dict[tuple, torch.fx.Node] = {}  # one copy of each distinct view of `shared`
    for node, quant, chain in members:
        end = quant if quantized else node
        out = shared
        with graph.inserting_before(end):
            for view in chain:
                key = (out, view.target, freeze({k: v for k, v in arguments(view).items()
                                                 if k != "self"}))
                if key not in views:
                    views[key] = insert_like(graph, view, self=out)
                out = views[key]
        end.replace_all_uses_with(out)
        if quantized:
            graph.erase_node(quant)
        graph.erase_node(node)
    return len(members) - 1
