"""Rotate projection inputs with a calibration's rotations before they are sparsified.

For an orthogonal ``Q``, ``x W^T + b == (x Q)(W Q)^T + b``. Given a
:class:`~qsparse_compile.calibration.Calibration`, every projection that will be sparsified
(top-K or block N:M) and whose module path the calibration knows is rewritten from
``linear(x, W, b)`` to ``linear(x @ Q, W', b)`` where ``W' = W Q`` is computed **once, here**
(float64, then the weight's dtype) and added to the graph as a constant. Projections that
share an input (q/k/v, gate/up) share one ``x @ Q`` node: one ``D x D`` product per shared
input and token, which the report counts. The rewrite pass that runs next finds the new
``linear`` like any other and sparsifies ``x @ Q``: top-K then acts in the rotated space.

Left exactly as they were: excluded projections, projections at sparsity 0 (quantization
alone is not a reason to rotate), and ReLU-method projections (ReLU is not rotation-invariant
and its sparsity is the data's, so a rotation would change the model, not the selection).

After this pass the rotated input is not a norm's output, so norm fusion leaves it alone; the
CPU decode pass still takes the group (its prepared weights are then the rotated ones).
The folded weights are constants: training through them does not update ``W``.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
import torch.fx

from ..calibration import Calibration
from ..config import QSparseConfig
from .constants import AddConstant, buffer_constants
from .decode_groups import real_value
from .graph_utils import insert_call
from .projections import find_projections, tensor_meta
from .share_inputs import _root_and_chain, view_forest
from .weights import WeightTable

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


def rotate_projections(gm: torch.fx.GraphModule, weights: WeightTable, config: QSparseConfig,
                       calibration: Calibration, add_constant: AddConstant | None = None
                       ) -> list[RotatedInput]:
    """Rewrite ``gm`` in place as described above; return the inserted rotations.

    Args:
        gm: the graph, before :func:`~.rewrite.sparsify_graph`.
        weights: its weight table; must give the real weight tensors (``weights.value`` or
            ``get_attr``): the rotation is folded into them here. The folded weights are
            added to it under the original weights' names, so paths and reports do not change.
        config: decides which projections are sparsified (and so rotated).
        calibration: the rotations, looked up by module path.
        add_constant: how a tensor joins the graph (default: a buffer of ``gm``; see
            :mod:`.constants` for exported programs).

    Raises:
        ValueError: a sparsified projection the calibration does not know, or whose width
            differs from its rotation's (a calibration of another model).
    """
    add_constant = add_constant or buffer_constants(gm)
    graph = gm.graph
    forest = view_forest(graph)
    rotated: dict[tuple[torch.fx.Node, int], tuple[torch.fx.Node, list[str], int]] = {}
    rotations: dict[tuple[int, torch.dtype], torch.fx.Node] = {}
    replaced: dict[torch.fx.Node, torch.fx.Node] = {}
    warned = False
    for proj in find_projections(gm, weights):
        plan = config.plan_for(proj.path)
        if plan.method not in ("topk", "block"):
            continue
        group = calibration.group_of(proj.path)
        if group is None:
            known = calibration.paths
            raise ValueError(
                f"calibration: projection {proj.path!r} is sparsified but the calibration has "
                f"no rotation for it (it knows {len(known)} projections, e.g. "
                f"{', '.join(map(repr, known[:3]))}); calibrate this model, or exclude it")
        q = calibration.groups[group].rotation
        if q.shape[0] != proj.in_features:
            raise ValueError(
                f"calibration: projection {proj.path!r} has input width {proj.in_features} "
                f"but its calibrated rotation is {q.shape[0]}x{q.shape[0]}")
        weight = real_value(gm, weights, proj.weight)
        if weight is None:
            raise ValueError(f"calibration: the real weight of projection {proj.path!r} is not "
                             f"available at compile time, so the rotation cannot be folded")
        if torch.is_grad_enabled() and weight.requires_grad and not warned:
            warnings.warn("calibration rotations fold into constant weights: gradients will "
                          "not reach the rotated projections' weights", stacklevel=2)
            warned = True
        node = proj.node
        x = replaced.get(proj.x, proj.x)
        x_meta = tensor_meta(x)
        root, chain = _root_and_chain(forest, x)
        root = replaced.get(root, root)  # a view chain may start at a projection rewritten here
        key = (root, group)
        with graph.inserting_before(node):
            if key not in rotated:
                dtype = x_meta.dtype if x_meta is not None else weight.dtype
                q_node = rotations.get((group, dtype))
                if q_node is None:
                    q_node = add_constant(q.to(device=weight.device, dtype=dtype), x, "rot")
                    rotations[(group, dtype)] = q_node
                rotated[key] = (insert_call(graph, aten.matmul.default, (root, q_node), node),
                                [], proj.in_features)
            xr, paths, _ = rotated[key]
            paths.append(proj.path)
            for view in chain:  # the projection's own views, now of the rotated input
                xr = insert_call(graph, view.target, (xr, *view.args[1:]), view,
                                 kwargs=dict(view.kwargs), op=view.op)
            w_out_in = weight.detach() if proj.weight_layout == "out_in" else weight.detach().t()
            folded = (w_out_in.double() @ q.double().to(weight.device)).to(weight.dtype)
            w_node = add_constant(folded.contiguous(), x, "wrot")
            weights.add(w_node, weights.name(proj.weight), folded)
            y = insert_call(graph, aten.linear.default, (xr, w_node, proj.bias), node)
        node.replace_all_uses_with(y)
        replaced[node] = y
        graph.erase_node(node)
    if rotated:
        graph.eliminate_dead_code()
        gm.recompile()
    return [RotatedInput(tuple(paths), dim) for _, paths, dim in rotated.values()]
