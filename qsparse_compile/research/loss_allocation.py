"""Per-role sparsity allocation driven by the *measured* calibration loss (TEAL's greedy).

Start dense; at each step try raising the sparsity of every role group (q/k/v, o, gate/up,
down) by ``step`` and keep the one whose step increases the measured loss the least **per
weight it stops reading** (the loss is the mean next-token NLL of the eager reference model,
:func:`qsparse_compile.reference.reference_model`, on held-out calibration batches: the
semantics the compiled model runs); stop when the activated weights per token reach the budget
of uniform top-K at the target sparsity. The price per weight matters because the groups'
steps are not the same size: on SmolLM2 a 0.1 step of gate/up (3,072 outputs per input column)
skips 5.3x the weights of a step of o (576), so ranking steps by their loss increase alone
spends the steps on the cheap-to-sparsify small group and reaches the budget with a worse
loss. The last step is partial: each candidate is raised only as far as the budget needs (and
credited only with the weights the budget needs: whatever it drops beyond is worth nothing), so
every target's allocation reads **at most** the budget, short of it by less than one input
column of one group (the ``gap`` reported).

The budget is :func:`~.allocation.budget`: ``sum_i topk_count(D_i, s) O_i`` over the
sparsified projections (the head excluded), the activated weights of uniform top-K at ``s``.
One greedy trajectory serves every target (a lower target's allocation is a state passed on
the way to a higher one's), so 40% and 50% cost one run.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..config import check_sparsity, topk_count
from ..reference import reference_model
from ..roles import role_of
from .allocation import budget

__all__ = ["ROLE_GROUPS", "LossAllocation", "cheapest_step", "group_overrides",
           "loss_allocation", "projection_sizes"]

#: Role groups whose sparsity moves together (projections sharing an input share a group).
ROLE_GROUPS: dict[str, tuple[str, ...]] = {"qkv": ("q", "k", "v"), "o": ("o",),
                                           "gate_up": ("gate", "up"), "down": ("down",)}
_GLOBS = {"q": "*.q_proj", "k": "*.k_proj", "v": "*.v_proj", "o": "*.o_proj",
          "gate": "*.gate_proj", "up": "*.up_proj", "down": "*.down_proj"}


@dataclasses.dataclass
class LossAllocation:
    """One target's allocation: per-group kept inputs and what it reads and costs."""

    target: float
    kept: dict[str, int]  # group -> k (the group's projections share their input width)
    sparsity: dict[str, float]  # group -> 1 - k / D
    overrides: dict[str, float]  # glob -> sparsity, the compiler's ``overrides`` option
    budget: int
    activated: int
    calib_loss: float
    uniform_calib_loss: float  # uniform top-K at the target, same batches: the baseline
    steps: int

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "gap": self.budget - self.activated}


def projection_sizes(model: nn.Module) -> dict[str, list[tuple[int, int]]]:
    """``(in, out)`` of every sparsified ``nn.Linear`` by role group (the head excluded)."""
    out: dict[str, list[tuple[int, int]]] = {g: [] for g in ROLE_GROUPS}
    group_of = {role: g for g, roles in ROLE_GROUPS.items() for role in roles}
    for path, module in model.named_modules():
        if not isinstance(module, nn.Linear) or role_of(path) == "head":
            continue
        role = role_of(path)
        if role not in group_of:
            raise ValueError(f"loss_allocation: projection {path!r} has role {role!r}; "
                             f"only {sorted(group_of)} (and the head) are allocated")
        out[group_of[role]].append((module.in_features, module.out_features))
    for group, sizes in out.items():
        if not sizes or len({d for d, _ in sizes}) != 1:
            raise ValueError(f"loss_allocation: group {group!r} needs projections of one input "
                             f"width, got {sorted({d for d, _ in sizes})}")
    return out


def group_overrides(kept: Mapping[str, int], widths: Mapping[str, int]) -> dict[str, float]:
    """The ``overrides`` option giving each group's projections ``kept[group]`` inputs."""
    out = {}
    for group, k in kept.items():
        dim = widths[group]
        s = 1.0 - k / dim
        if topk_count(dim, round(s, 6)) == k:
            s = round(s, 6)
        for role in ROLE_GROUPS[group]:
            out[_GLOBS[role]] = max(0.0, s)
    return out


def cheapest_step(loss: float, weights: int, candidates: Sequence[tuple[float, int]],
                  need: int | None = None) -> int:
    """Index of the candidate ``(loss, activated weights)`` whose loss increase per weight
    no longer read, from the state ``(loss, weights)``, is lowest (ties: the first).

    ``need``: the weights still to shed to reach the budget; a candidate saving more is
    credited with ``need`` only (weights dropped beyond the budget buy nothing, so a large
    group's overshooting last step must not look cheap for them). Every candidate must read
    fewer weights than the state."""
    if need is not None and need <= 0:
        raise ValueError(f"cheapest_step: need must be a positive weight count, got {need}")
    prices = []
    for i, (cand_loss, cand_weights) in enumerate(candidates):
        saved = weights - cand_weights
        if saved <= 0:
            raise ValueError(f"cheapest_step: candidate {i} reads {cand_weights} weights, "
                             f"not fewer than the state's {weights}")
        useful = saved if need is None else min(saved, need)
        prices.append(((cand_loss - loss) / useful, i))
    return min(prices)[1]


def _mean_nll(model: nn.Module, batches: Sequence[torch.Tensor]) -> float:
    total, count = 0.0, 0
    for ids in batches:
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        total += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").item()
        count += ids[:, 1:].numel()
    return total / count


@torch.no_grad()
def loss_allocation(model: nn.Module, batches: Sequence[torch.Tensor],
                    targets: Sequence[float] = (0.4, 0.5), step: float = 0.1,
                    max_sparsity: float = 0.9,
                    progress: Callable[[str], None] | None = None) -> dict[float, LossAllocation]:
    """Greedy allocations meeting each target's budget (see the module docstring).

    Args:
        model: the (possibly folded) causal LM; its ``nn.Linear`` projections are allocated.
        batches: ``[B, T]`` token-id tensors of held-out calibration text.
        targets: global sparsities whose uniform top-K budgets are met.
        step: sparsity added to one group per greedy step.
        max_sparsity: no group goes beyond it.
        progress: called with a line per step.
    """
    targets = sorted(check_sparsity(t, "loss_allocation: target") for t in targets)
    if not 0 < step < 1 or not targets[-1] < max_sparsity < 1:
        raise ValueError(f"loss_allocation: need 0 < step < 1 and max target < max_sparsity < 1,"
                         f" got step={step}, max_sparsity={max_sparsity}, targets={targets}")
    sizes = projection_sizes(model)
    widths = {g: s[0][0] for g, s in sizes.items()}
    outs = {g: sum(o for _, o in s) for g, s in sizes.items()}
    all_sizes = [size for s in sizes.values() for size in s]
    budgets = {t: budget(all_sizes, t) for t in targets}
    k_step = {g: max(1, round(step * widths[g])) for g in sizes}
    k_min = {g: topk_count(widths[g], max_sparsity) for g in sizes}
    kept = dict(widths)

    def activated(ks: Mapping[str, int]) -> int:
        return sum(ks[g] * outs[g] for g in ks)

    def loss(ks: Mapping[str, int]) -> float:
        with reference_model(model, sparsity=0.0, overrides=group_overrides(ks, widths)):
            return _mean_nll(model, batches)

    results: dict[float, LossAllocation] = {}
    steps = 0
    current = loss(kept)
    for target in targets:
        while True:
            need = activated(kept) - budgets[target]
            if need <= 0:
                break
            candidates = []
            for g in sizes:
                # a full step, or (last step) just as far as the budget needs
                drop = min(k_step[g], math.ceil(need / outs[g]), kept[g] - k_min[g])
                if drop > 0:
                    candidates.append({**kept, g: kept[g] - drop})
            if not candidates:
                raise ValueError(f"loss_allocation: budget of {target} unreachable with "
                                 f"max_sparsity={max_sparsity}")
            losses = [loss(c) for c in candidates]
            best = cheapest_step(current, activated(kept),
                                 [(lo, activated(c)) for lo, c in zip(losses, candidates,
                                                                       strict=True)], need)
            kept, current = candidates[best], losses[best]
            steps += 1
            if progress is not None:
                progress(f"step {steps}: {kept} loss {current:.4f} "
                         f"activated {activated(kept)}")
        results[target] = LossAllocation(
            target=target, kept=dict(kept),
            sparsity={g: round(1 - kept[g] / widths[g], 4) for g in kept},
            overrides=group_overrides(kept, widths), budget=budgets[target],
            activated=activated(kept), calib_loss=round(current, 5),
            uniform_calib_loss=round(loss({g: topk_count(widths[g], target) for g in sizes}), 5),
            steps=steps)
    return results
