"""Top-K of a row sharded across ranks: the exact tensor-parallel mode (DESIGN.md point 11).

A row-parallel projection (o, down) under tensor parallelism reads a shard of each row: rank
``r`` of ``world`` holds features ``[r * D_s, (r + 1) * D_s)``. ``sharded_topk_sparsify`` keeps
the row's global top-``k`` (point 2: largest magnitudes, ties to the lower global index, NaN
above every number), so the result equals one device's.

How the ranks agree, with one all-gather of ``world * c`` keys per row (``c = min(k, D_s)``):

* every rank sends its ``c`` largest magnitude keys (:func:`~.mask.magnitude_key`), sorted;
  the row's top-``k`` lies within the union of these, since no rank contributes more than
  ``c`` entries to it;
* every rank finds the same k-th largest key ``t`` of the union, and the room left for ties,
  ``k - #(keys > t)``;
* ties at ``t`` go to the lower global index, that is to lower ranks first and then to lower
  local indices: rank ``r`` keeps ``room - (ties seen on ranks < r)`` of its own, in local
  order. A lower rank's tie count is only a lower bound when its ``c`` candidates were all
  ``>= t`` (truncated); but then that rank alone holds ``>= room`` ties, so ranks above it
  keep none either way.

No indices are sent: the tie-break needs only counts. The L2 rescale (point 4) needs the row's
two squared norms, one all-reduce of two floats per row.

The collectives are the ``_c10d_functional`` operators, addressed by the process group's name:
the same operators DTensor itself emits and Inductor schedules, and they run eagerly as well.
Inference only (tensor-parallel training is refused by the backend): the op has no autograd.
"""

from __future__ import annotations

import torch

from .checks import check_float, check_k
from .mask import magnitude_key

__all__ = ["sharded_topk_sparsify"]

_collectives = torch.ops._c10d_functional


def _all_gather(t: torch.Tensor, world: int, group: str) -> torch.Tensor:
    """``[world * rows, ...]``: every rank's ``t`` stacked along dim 0, in rank order.

    An all-gather only copies bytes, so 16-bit keys travel as float16 (neither gloo nor NCCL
    takes int16) and are read back as the integers they are.
    """
    sent = t.contiguous()
    if sent.dtype == torch.int16:
        sent = sent.view(torch.float16)
    out = _collectives.wait_tensor.default(
        _collectives.all_gather_into_tensor.default(sent, world, group))
    return out.view(t.dtype)


def _all_reduce_sum(t: torch.Tensor, group: str) -> torch.Tensor:
    out = _collectives.all_reduce.default(t.contiguous(), "sum", group)
    return _collectives.wait_tensor.default(out)


def _check(x: torch.Tensor, k: int, rank: int, world: int) -> None:
    check_float("sharded_topk_sparsify", "x", x)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"qsparse.sharded_topk_sparsify: rank {rank} of world {world}; "
                         f"allowed: 0 <= rank < world")
    check_k("sharded_topk_sparsify", k, x.shape[-1] * world)


@torch.library.custom_op("qsparse::sharded_topk_sparsify", mutates_args=())
def sharded_topk_sparsify(x: torch.Tensor, k: int, rank: int, world: int, group: str,
                          rescale: bool) -> torch.Tensor:
    """Keep this rank's part of the global top-``k`` of rows sharded over ``world`` ranks.

    ``x`` is ``[..., D_s]``, rank ``rank``'s shard of rows ``D = world * D_s`` wide; ``group``
    is the name of the process group of the ranks holding the shards
    (``ProcessGroup.group_name``). Every rank of the group must call it with the same ``k``.
    """
    _check(x, k, rank, world)
    shard = x.shape[-1]
    rows = x.reshape(-1, shard)
    key = magnitude_key(rows)
    c = min(k, shard)
    candidates = key.topk(c, dim=-1).values  # sorted, largest first
    gathered = _all_gather(candidates, world, group).view(world, rows.shape[0], c)
    union = gathered.permute(1, 0, 2).reshape(rows.shape[0], world * c)
    # the k-th largest key of the row; world * c >= k since world * D_s = D >= k
    kth = union.topk(k, dim=-1).values[:, -1:]
    room = k - (union > kth).sum(dim=-1, keepdim=True)
    ties_below = (gathered[:rank] == kth.unsqueeze(0)).sum(dim=(0, 2)).unsqueeze(-1)
    keep_ties = (room - ties_below).clamp(min=0)
    tied = key == kth
    mask = (key > kth) | (tied & (torch.cumsum(tied, dim=-1) <= keep_ties))
    out = torch.where(mask, rows, 0)
    if rescale:
        # ||x|| / ||x_masked|| of the whole row, 1 where the kept part is all zero
        norms = torch.stack([rows.float().square().sum(-1), out.float().square().sum(-1)], -1)
        full, kept = _all_reduce_sum(norms, group).sqrt().unbind(-1)
        factor = torch.where(kept > 0, full / kept, torch.ones_like(kept)).unsqueeze(-1)
        out = (out.float() * factor).to(x.dtype)
    return out.reshape(x.shape).contiguous()


@sharded_topk_sparsify.register_fake
def _(x: torch.Tensor, k: int, rank: int, world: int, group: str,
      rescale: bool) -> torch.Tensor:
    check_float("sharded_topk_sparsify", "x", x)
    return x.new_empty(x.shape)
