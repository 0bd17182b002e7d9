"""Rotate projection inputs with calibrated rotations before they are sparsified.

For an orthogonal ``Q``, ``x W^T + b == (x Q)(W Q)^T + b``. Given
:class:`~qsparse_compile.rotations.Rotations`, every projection that will be sparsified (top-K
or block N:M) and whose module path has a rotation is rewritten so that its product reads
``x Q`` in place of ``x`` and ``W' = W Q`` in place of ``W`` (``Q^T W`` for a ``[in, out]``
weight). ``W'`` is computed **once, here** (float64, then the weight's dtype) and added to the
graph as a constant; ``x Q`` is computed once per rotated input: projections reading one
tensor (q/k/v, gate/up, through their views) share it, one ``D x D`` product per shared input
and token, which the report counts. The rewrite pass that runs next finds the products as
before (the folded weight keeps the original's name and path) and sparsifies ``x Q``: top-K
then acts in the rotated space.

Left exactly as they were: excluded projections, projections at sparsity 0 (quantization
alone is not a reason to rotate), and ReLU-method projections (ReLU is not rotation-invariant
and its sparsity is the data's, so a rotation would change the model, not the selection).

After this pass the rotated input is not a norm's output, so norm fusion leaves it alone; the
CPU decode lowering still takes the group (its prepared weights are then the rotated ones).
The folded weights are constants: training through them does not update ``W``.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
import torch.fx

from ..config import QSparseConfig
from ..rotations import Rotations
from .constants import AddConstant
from .graph_utils import insert_like, insert_op, tensor_meta
from .node_args import mutation_between
from .projections import Projection, find_projections
from .share_inputs import graph_mutates, root_view
from .weights import WeightTable

__all__ = ["RotatedInput", "rotate_projections"]

aten = torch.ops.aten


@dataclasses.dataclass(frozen=True)
class RotatedInput:
    """One ``x @ Q`` inserted in a graph, and the projections of that graph reading it."""

    paths: tuple[str, ...]
    dim: int

    @property
    def macs_per_token(self) -> int:
        """Multiply-adds the rotation adds per token (row): ``D * D``."""
        return self.dim * self.dim


def _replay(graph: torch.fx.Graph, chain: tuple[torch.fx.Node, ...],
            source: torch.fx.Node) -> torch.fx.Node:
    """The views ``chain`` applied to ``source`` instead of their original source."""
    out = source
    for view in chain:
        out = insert_like(graph, view, self=out)
    return out


def _folded(weight: torch.Tensor, q: torch.Tensor, layout: str) -> torch.Tensor:
    w64, q64 = weight.detach().double(), q.double().to(weight.device)
    folded = w64 @ q64 if layout == "out_in" else q64.T @ w64
    return folded.to(weight.dtype).contiguous()


def _check(proj: Projection, rotations: Rotations, group: int | None) -> torch.Tensor:
    if group is None:
        known = rotations.paths
        raise ValueError(
            f"calibration: projection {proj.path!r} is sparsified but the calibration has "
            f"no rotation for it (it knows {len(known)} projections, e.g. "
            f"{', '.join(map(repr, known[:3]))}); calibrate this model, or exclude it")
    q = rotations.groups[group].rotation
    if q.shape[0] != proj.in_features:
        raise ValueError(
            f"calibration: projection {proj.path!r} has input width {proj.in_features} "
            f"but its calibrated rotation is {q.shape[0]}x{q.shape[0]}")
    return q


def rotate_projections(gm: torch.fx.GraphModule, weights: WeightTable, config: QSparseConfig,
                       rotations: Rotations, add_constant: AddConstant) -> list[RotatedInput]:
    """Rewrite ``gm`` in place as described above; return the inserted rotations.

    Args:
        gm: the normalised graph, before :func:`~.rewrite.sparsify_graph`.
        weights: its weight table; must give the real weight tensors (the rotation is folded
            into them here). The folded weights are added to it under the original weights'
            names, so paths and reports do not change.
        config: decides which projections are sparsified (and so rotated).
        rotations: the rotations, looked up by module path.
        add_constant: how a tensor joins the graph (:mod:`.constants`).

    Raises:
        ValueError: a sparsified projection the calibration does not know, or whose width
            differs from its rotation's (a calibration of another model).
    """
    graph = gm.graph
    copies = not graph_mutates(graph)
    replaced: dict[torch.fx.Node, torch.fx.Node] = {}
    inserted: list[tuple[torch.fx.Node, list[str], int]] = []
    rotated: dict[tuple[torch.fx.Node, int], tuple[torch.fx.Node, list[str], int]] = {}
    rotation_nodes: dict[tuple[int, torch.dtype], torch.fx.Node] = {}
    warned = False
    for proj in find_projections(gm, weights):
        if proj.in_place or proj.weight_left or \
                config.plan_for(proj.path, proj.role).method not in ("topk", "block"):
            continue
        group = rotations.group_of(proj.path)
        q = _check(proj, rotations, group)
        weight = weights.value(proj.weight)
        if weight is None:
            raise ValueError(f"calibration: the real weight of projection {proj.path!r} is not "
                             f"available at compile time, so the rotation cannot be folded")
        if torch.is_grad_enabled() and weight.requires_grad and not warned:
            warnings.warn("calibration rotations fold into constant weights: gradients will "
                          "not reach the rotated projections' weights", stacklevel=2)
            warned = True
        root, chain = root_view(replaced.get(proj.x, proj.x), copies)
        x_meta = tensor_meta(root)
        key = (root, group)
        if key in rotated and mutation_between(rotated[key][0], proj.node):
            del rotated[key]  # the input was written in place since: rotate it again
        if key not in rotated:
            dtype = x_meta.dtype if x_meta is not None else weight.dtype
            q_node = rotation_nodes.get((group, dtype))
            if q_node is None:
                q_node = add_constant(q.to(device=weight.device, dtype=dtype), root, "rot")
                rotation_nodes[(group, dtype)] = q_node
            # before the first projection reading it (after the root and the constant)
            with graph.inserting_before(proj.node):
                xr = insert_op(graph, aten.matmul.default, {"self": root, "other": q_node},
                               root)
            rotated[key] = (xr, [], proj.in_features)
            inserted.append(rotated[key])
        xr, paths, _ = rotated[key]
        paths.append(proj.path)
        folded = _folded(weight, q, proj.weight_layout)
        w_node = add_constant(folded, proj.weight, "wrot", sources=[proj.weight],
                              recipe=lambda ts, q=q, layout=proj.weight_layout:
                              _folded(ts[0], q, layout))
        weights.add(w_node, proj.weight, folded)
        with graph.inserting_before(proj.node):
            x_new = _replay(graph, chain, xr)
            w_new = _replay(graph, proj.weight_chain, w_node)
            new = insert_like(graph, proj.node, **{proj.x_arg: x_new, proj.weight_arg: w_new})
        proj.node.replace_all_uses_with(new)
        replaced[proj.node] = new  # a projection reading this one's output directly
        graph.erase_node(proj.node)
    return [RotatedInput(tuple(paths), dim) for _, paths, dim in inserted]
