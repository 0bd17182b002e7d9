"""Share one sparsify node among projections that read the same tensor.

Top-K and N:M act on each row independently, so ``sparsify(view(x)) == view(sparsify(x))``
whenever the view keeps the last dimension. Graphs often reach one tensor through different
views (decomposed ``linear`` reshapes its input per projection; GPT-2 flattens before
``addmm``). We build the graph of row-preserving view edges with networkx; every connected
component has one root tensor; sparsify nodes with the same root and the same arguments become
one sparsify of the root, followed by each projection's own view. This makes q/k/v (and gate/up)
select once, and puts the sparsify right after the norm that produced the root, where the
fusion pass can find it.
"""

from __future__ import annotations

from collections import defaultdict

import networkx as nx
import torch
import torch.fx

from .graph_utils import insert_call
from .projections import tensor_meta

aten = torch.ops.aten
qsparse = torch.ops.qsparse

SPARSIFY_OPS = (qsparse.topk_sparsify.default, qsparse.block_sparsify.default)
_VIEW_FUNCS = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.clone.default,
    aten.alias.default, aten.contiguous.default, torch.reshape,
}
_VIEW_METHODS = {"view", "reshape", "contiguous", "clone"}


def _row_preserving(node: torch.fx.Node) -> bool:
    """A view/copy whose output rows are the input's rows (same last dimension)."""
    is_view = (node.op == "call_function" and node.target in _VIEW_FUNCS) or (
        node.op == "call_method" and node.target in _VIEW_METHODS)
    if not is_view or not node.args or not isinstance(node.args[0], torch.fx.Node):
        return False
    src, out = tensor_meta(node.args[0]), tensor_meta(node)
    return (src is not None and out is not None and src.dim() > 0 and out.dim() > 0
            and src.shape[-1] == out.shape[-1])


def view_forest(graph: torch.fx.Graph) -> nx.DiGraph:
    """Directed graph of row-preserving view edges (input -> view) over the FX graph."""
    forest = nx.DiGraph()
    for node in graph.nodes:
        if _row_preserving(node):
            forest.add_edge(node.args[0], node)
    return forest


def _root_and_chain(forest: nx.DiGraph, node: torch.fx.Node):
    """The component root of ``node`` and the view nodes from the root down to ``node``."""
    if node not in forest:
        return node, []
    roots = [a for a in nx.ancestors(forest, node) if forest.in_degree(a) == 0]
    root = roots[0] if roots else node
    path = nx.shortest_path(forest, root, node)
    return root, path[1:]


def _quant_user(node: torch.fx.Node) -> torch.fx.Node | None:
    """The int8 quantizer applied to a sparsify's output, when it is its only user."""
    users = list(node.users)
    if len(users) == 1 and users[0].op == "call_function" and \
            users[0].target == qsparse.int8_fake_quant.default:
        return users[0]
    return None


def share_sparsify_inputs(gm: torch.fx.GraphModule) -> int:
    """Rewrite ``gm`` in place; return how many sparsify nodes were removed by sharing.

    A sparsify followed only by ``int8_fake_quant`` moves as one unit (quantization is per row
    too), so the fusion pass later finds the quantizer right after the sparsify.
    """
    graph = gm.graph
    forest = view_forest(graph)
    groups: dict[tuple, list] = defaultdict(list)
    for node in graph.nodes:
        if node.op == "call_function" and node.target in SPARSIFY_OPS:
            root, chain = _root_and_chain(forest, node.args[0])
            quant = _quant_user(node)
            key = (root, node.target, tuple(node.args[1:]), quant is not None)
            groups[key].append((node, quant, chain))
    removed = 0
    for (root, target, rest, quantized), members in groups.items():
        if len(members) == 1 and not members[0][2]:
            continue
        first = members[0][0]
        with graph.inserting_before(first):
            shared = insert_call(graph, target, (root, *rest), first)
            if quantized:
                shared = insert_call(graph, qsparse.int8_fake_quant.default, (shared,),
                                     members[0][1])
        for node, quant, chain in members:
            end = quant if quantized else node
            out = shared
            with graph.inserting_before(end):
                for view in chain:
                    out = insert_call(graph, view.target, (out, *view.args[1:]), view,
                                      kwargs=dict(view.kwargs), op=view.op)
            end.replace_all_uses_with(out)
            if quantized:
                graph.erase_node(quant)
            graph.erase_node(node)
        removed += len(members) - 1
    graph.eliminate_dead_code()
    gm.recompile()
    return removed
