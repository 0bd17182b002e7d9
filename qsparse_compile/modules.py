"""The one walker over a model's projections, as eager tools see them.

The compiler finds projections in graphs, whatever their spelling; eager tools (the reference
model, the report of a module, calibration, sparsity measurement, the roles) find them by
walking the module tree. They all walk it here, so they agree on what a projection is:

* ``nn.Linear`` (and subclasses): weight ``[out_features, in_features]``, layout ``"out_in"``;
* a ``Conv1D`` as Hugging Face's GPT-2 family defines it (``y = x @ W + b``): a module of that
  class name whose ``weight`` is a 2-D tensor ``[in_features, out_features]``, layout
  ``"in_out"``;
* the **router** of a mixture-of-experts block when it is not an ``nn.Linear`` (Mixtral's and
  Qwen-MoE's ``TopKRouter``: a 2-D ``weight`` ``[num_experts, hidden]`` used with
  ``F.linear`` inside its own forward): ``output_is_product`` is False, since its output is
  the routing decision, not the product.

And, apart (:func:`expert_weights`), the **expert weights** of a mixture-of-experts block: one
3-D parameter per projection holding every expert's matrix (``experts.gate_up_proj``
``[E, 2I, D]``, ``experts.down_proj`` ``[E, D, I]``). A module is an experts module by its
structure, never its name (:func:`moe_blocks`): it is not a convolution, it holds 3-D
parameters that share their first dimension ``E >= 2``, and its parent (the MoE block) holds a
router: a 2-D projection, in the block itself or one of its other children, with ``E`` outputs.

Paths are ``named_modules()`` names (for expert weights the parameter's qualified name), the
names the configuration's globs match.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["ExpertWeight", "MoEBlock", "ProjectionModule", "all_projections", "expert_weights",
           "moe_blocks", "projection_layout", "projection_modules"]


def projection_layout(module: nn.Module) -> str | None:
    """``"out_in"`` for an ``nn.Linear``, ``"in_out"`` for a ``Conv1D``, else None."""
    if isinstance(module, nn.Linear):
        return "out_in"
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) \
            and weight.dim() == 2:
        return "in_out"
    return None


@dataclasses.dataclass(frozen=True)
class ProjectionModule:
    """One projection module of a model, at ``path``.

    ``output_is_product``: the module's output is its product (``nn.Linear``, ``Conv1D``), so
    a tool may replace it; False for a router module whose forward computes the product
    itself and returns the routing.
    """

    path: str
    module: nn.Module
    layout: str  # "out_in" (nn.Linear, routers) or "in_out" (Conv1D)
    output_is_product: bool = True

    #: an ordinary projection holds no experts (compare :attr:`ExpertWeight.experts`)
    experts = 0
    experts_per_token = None

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.module, "bias", None)

    def weight_out_in(self) -> torch.Tensor:
        """The weight as ``[out_features, in_features]`` (a view for ``Conv1D``)."""
        return self.weight if self.layout == "out_in" else self.weight.t()

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1 if self.layout == "out_in" else 0])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0 if self.layout == "out_in" else 1])


@dataclasses.dataclass(frozen=True)
class ExpertWeight:
    """One 3-D parameter holding the matrix of one projection for each of ``num_experts``.

    ``layout`` is the layout of each expert's matrix: ``"out_in"`` for ``[E, out, in]``
    (Hugging Face's default), ``"in_out"`` for ``[E, in, out]`` (experts modules whose
    ``is_transposed`` is True). ``experts_per_token`` is how many experts each token reads
    (the model's ``num_experts_per_tok``), None where the model does not say.
    """

    path: str
    module: nn.Module
    attr: str
    layout: str
    block_path: str
    experts_per_token: int | None

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.module, self.attr)

    @property
    def num_experts(self) -> int:
        return int(self.weight.shape[0])

    @property
    def experts(self) -> int:
        """The same as :attr:`num_experts` (the name :class:`ProjectionModule` shares)."""
        return self.num_experts

    def expert_out_in(self, index: int) -> torch.Tensor:
        """Expert ``index``'s matrix as ``[out_features, in_features]``."""
        w = self.weight[index]
        return w if self.layout == "out_in" else w.t()

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[2 if self.layout == "out_in" else 1])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[1 if self.layout == "out_in" else 2])


@dataclasses.dataclass(frozen=True)
class MoEBlock:
    """A mixture-of-experts block: its experts module, their weights and its routers.

    ``routers`` are the block's projections that score the experts: those owned by the block
    or by one of its children other than the experts, whose output width is ``num_experts``
    (the router proper) or 1 (a shared expert's scalar gate, as in Qwen2-MoE).
    """

    path: str
    experts_path: str
    experts: nn.Module
    num_experts: int
    experts_per_token: int | None
    weights: tuple[ExpertWeight, ...]
    routers: tuple[ProjectionModule, ...]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _expert_parameters(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The module's own 3-D parameters if they share a first dimension >= 2, else []."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return []  # a convolution's weight is 3-D too: [out, in / groups, kernel]
    found = [(n, p) for n, p in module.named_parameters(recurse=False) if p.dim() == 3]
    if not found or len({int(p.shape[0]) for _, p in found}) != 1 or found[0][1].shape[0] < 2:
        return []
    return found


def _router_candidates(block: nn.Module, path: str, skip: nn.Module
                       ) -> Iterator[ProjectionModule]:
    """2-D projections of the block's children other than ``skip`` (the experts)."""
    for name, child in block.named_children():
        if child is skip:
            continue
        layout = projection_layout(child)
        if layout is not None:
            yield ProjectionModule(_join(path, name), child, layout)
            continue
        weight = getattr(child, "weight", None)
        if isinstance(weight, nn.Parameter) and weight.dim() == 2 \
                and not isinstance(child, nn.Embedding):
            # a router module computing F.linear(x, self.weight) in its own forward
            yield ProjectionModule(_join(path, name), child, "out_in", output_is_product=False)


def _experts_per_token(block: nn.Module, experts: nn.Module,
                       routers: tuple[ProjectionModule, ...]) -> int | None:
    """The model's ``num_experts_per_tok`` (the config the experts or the block hold), else a
    router's or the block's ``top_k``."""
    for owner in (experts, block):
        value = getattr(getattr(owner, "config", None), "num_experts_per_tok", None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    for owner in (*(r.module for r in routers), block):
        value = getattr(owner, "top_k", None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def moe_blocks(model: nn.Module) -> list[MoEBlock]:
    """Every mixture-of-experts block of ``model`` (see the module docstring), in module order."""
    blocks = []
    for path, block in model.named_modules():
        for name, child in block.named_children():
            params = _expert_parameters(child)
            if not params:
                continue
            num_experts = int(params[0][1].shape[0])
            routers = tuple(r for r in _router_candidates(block, path, child)
                            if r.out_features in (num_experts, 1))
            if not any(r.out_features == num_experts for r in routers):
                continue  # 3-D parameters without a router scoring them: not experts
            experts_path = _join(path, name)
            per_token = _experts_per_token(block, child, routers)
            layout = "in_out" if getattr(child, "is_transposed", False) is True else "out_in"
            weights = tuple(ExpertWeight(_join(experts_path, attr), child, attr, layout, path,
                                         per_token) for attr, _ in params)
            blocks.append(MoEBlock(path, experts_path, child, num_experts, per_token, weights,
                                   routers))
    return blocks


def expert_weights(model: nn.Module) -> Iterator[ExpertWeight]:
    """Every expert weight of ``model`` (3-D, one matrix per expert), in module order."""
    for block in moe_blocks(model):
        yield from block.weights


def projection_modules(model: nn.Module) -> Iterator[ProjectionModule]:
    """Every projection module of ``model``, in ``named_modules()`` order: ``nn.Linear``,
    ``Conv1D``, and router modules that are neither (``output_is_product=False``)."""
    routers = {id(r.module): r for block in moe_blocks(model) for r in block.routers
               if not r.output_is_product}
    for path, module in model.named_modules():
        layout = projection_layout(module)
        if layout is not None:
            yield ProjectionModule(path, module, layout)
        elif id(module) in routers:
            yield ProjectionModule(path, module, "out_in", output_is_product=False)


def all_projections(model: nn.Module) -> list[ProjectionModule | ExpertWeight]:
    """Projection modules and expert weights together, in ``named_modules()`` order (an
    experts module's weights where the module is)."""
    blocks = moe_blocks(model)
    routers = {id(r.module) for b in blocks for r in b.routers if not r.output_is_product}
    experts = {id(b.experts): b.weights for b in blocks}
    out: list[ProjectionModule | ExpertWeight] = []
    for path, module in model.named_modules():
        layout = projection_layout(module)
        if layout is not None:
            out.append(ProjectionModule(path, module, layout))
        elif id(module) in routers:
            out.append(ProjectionModule(path, module, "out_in", output_is_product=False))
        out.extend(experts.get(id(module), ()))
    return out
