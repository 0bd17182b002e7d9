"""Calibrated rotations that are folded into the weights: what they are, how they are found,
what they cost at runtime.

A :class:`FoldedRotations` holds the rotations of the training-free mode:

* ``residual``: one ``[D, D]`` rotation ``Q`` of the residual stream, folded by
  :func:`~.rotation_folding.fold_rotation` (norm weights into readers, ``Q`` into embedding,
  readers and writers): q/k/v and gate/up read ``n Q`` (``n`` the weightless RMSNorm output)
  at **no runtime cost**;
* ``heads``: per layer, one ``[head_dim, head_dim]`` rotation per kv head, folded into v and o
  by :func:`~.rotation_folding.fold_head_rotations`: o reads the rotated attention output,
  again at no runtime cost;
* ``scale_power``: after the rotations, every projection input scaled by its weight columns'
  norms (to this power) by :func:`~.rotation_folding.fold_importance_scales`, folded into
  norm weights / readers, v / o and up / down: top-K then keeps the largest
  ``|x_j| ||W[:, j]||`` instead of the largest ``|x_j|``, at no runtime cost;
* ``layers``: alternatively to ``residual``, one rotation ``Q_l`` per decoder layer (its two
  norms' readers and its two writers). The residual stream then changes basis between layers,
  which needs a ``D x D`` product ``h (Q_l^T Q_{l+1})`` per layer boundary at runtime (the
  LaRoSA-style correction): :meth:`FoldedRotations.added_macs` counts it, and
  :meth:`FoldedRotations.apply` installs it as a forward pre-hook on each layer (eager and
  Dynamo-traceable, but not a product the compiler sparsifies).
* ``down``: per layer, a block-diagonal rotation ``[blocks, block, block]`` of the down
  projection's input (behind the GLU, where nothing folds), applied online by
  :func:`~.rotation_folding.fold_down_rotations` (``d_ff x block`` multiply-adds per token and
  layer, counted by :meth:`FoldedRotations.added_macs`), its inverse folded into down.

Rotations are found from calibration batches by :func:`calibrate_folded`: PCA (eigenvectors of
the uncentred second moment, by descending eigenvalue) of what top-K will see after folding,
i.e. of the *weightless* normalised residual stream ``n`` (all norm sites pooled for
``residual``, per layer for ``layers``), of o's per-head input (the q heads of one kv
head pooled) and of each block of the down input. ``"hadamard"`` (a randomised
Hadamard-like rotation, data-free) is the comparison point.

The file format is one safetensors file (tensors, and a JSON header in the metadata), like
:class:`~.calibration.Calibration`'s.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .rotation_folding import (
    check_orthogonal,
    check_supported,
    fold_down_rotations,
    fold_head_rotations,
    fold_importance_scales,
    fold_norm_weights,
    fold_rotation,
    hadamard,
    head_layout,
    random_orthogonal,
)

__all__ = ["FOLDED_FORMAT", "KINDS", "READABLE_FORMATS", "FoldedRotations",
           "calibrate_folded", "hadamard_like", "pca_rotation"]

FOLDED_FORMAT = "qsparse-folded-rotations/2"
#: Older formats :meth:`FoldedRotations.load` still reads (/1: no ``down`` rotations; code
#: that knows only /1 refuses /2 files rather than drop their down rotations).
READABLE_FORMATS = ("qsparse-folded-rotations/1", FOLDED_FORMAT)
#: How a rotation may be chosen: from data (``"pca"``) or data-free (``"hadamard"``).
KINDS = ("pca", "hadamard")


def pca_rotation(moment: torch.Tensor) -> torch.Tensor:
    """Eigenvectors (columns) of a symmetric second moment, by descending eigenvalue, float64."""
    values, vectors = torch.linalg.eigh(moment.double())
    return vectors[:, torch.argsort(values, descending=True)]


def hadamard_like(dim: int, seed: int = 0) -> torch.Tensor:
    """A data-free rotation that spreads every coordinate evenly where Sylvester allows:
    ``diag(signs) (O_m ⊗ H_{2^a})`` with ``dim = m 2^a`` (``m`` odd), ``O_m`` Haar-random
    (``m = 1`` gives the plain randomised Hadamard), random signs from ``seed``."""
    power = dim & -dim  # the largest power of two dividing dim
    odd = dim // power
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (dim,), generator=gen).double() * 2 - 1
    core = torch.kron(random_orthogonal(odd, seed=seed).contiguous(), hadamard(power))
    return signs.unsqueeze(1) * core


@dataclasses.dataclass(eq=False)
class FoldedRotations:
    """Rotations folded into a model's weights (see the module docstring).

    Attributes:
        residual: ``[D, D]`` residual-stream rotation, or None.
        layers: per decoder layer ``[D, D]`` rotations (exclusive with ``residual``), or None.
        heads: per decoder layer ``[kv_heads, head_dim, head_dim]``, or None.
        down: per decoder layer ``[blocks, block, block]`` (the down input's online
            block-diagonal rotation), or None.
        scale_power: the power of the folded importance scales, or None (no scales).
        metadata: JSON-serialisable facts (kinds, tokens, seed).
    """

    residual: torch.Tensor | None = None
    layers: list[torch.Tensor] | None = None
    heads: list[torch.Tensor] | None = None
    down: list[torch.Tensor] | None = None
    scale_power: float | None = None
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.residual is not None and self.layers is not None:
            raise ValueError("FoldedRotations: give residual (one rotation) or layers (one per "
                             "layer), not both")

    # --- cost ------------------------------------------------------------------------

    def added_macs(self, model: nn.Module) -> int:
        """Multiply-adds per token that the rotations add at runtime: 0 for ``residual`` and
        ``heads`` (folded), ``D^2`` per layer boundary for ``layers`` (the basis change),
        ``d_ff x block`` per layer for ``down``."""
        total = 0
        if self.layers is not None:
            dim = model.config.hidden_size
            total += _basis_changes(self.layers) * dim * dim
        for r in self.down or []:
            total += r.shape[0] * r.shape[1] * r.shape[2]
        return total

    # --- folding -----------------------------------------------------------------------

    @torch.no_grad()
    def apply(self, model: nn.Module) -> nn.Module:
        """A folded deep copy of ``model``: the same function (to rounding), with every
        projection the rotations reach reading its input in the rotated basis. With no
        rotation at all only the norm weights are folded (the un-rotated baseline)."""
        check_supported(model)
        if self.residual is not None:
            folded = fold_rotation(model, self.residual)
        elif self.layers is not None:
            folded = _fold_per_layer(model, self.layers)
        else:
            folded = fold_norm_weights(model)
        if self.heads is not None:
            fold_head_rotations(folded, self.heads, inplace=True)
        if self.scale_power is not None:
            fold_importance_scales(folded, self.scale_power, inplace=True,
                                   down=self.down is None)
        if self.down is not None:
            fold_down_rotations(folded, self.down, self.scale_power, inplace=True)
        return folded

    # --- file --------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write to one safetensors file; return its path."""
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        if self.residual is not None:
            tensors["residual"] = self.residual.contiguous()
        for name, values in (("layers", self.layers), ("heads", self.heads),
                             ("down", self.down)):
            for i, t in enumerate(values or []):
                tensors[f"{name}.{i}"] = t.contiguous().clone()  # segments share one tensor
        header = {"format": FOLDED_FORMAT, "layers": len(self.layers or []),
                  "heads": len(self.heads or []), "down": len(self.down or []),
                  "scale_power": self.scale_power,
                  "metadata": self.metadata}
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(target), metadata={"qsparse": json.dumps(header)})
        return target

    @classmethod
    def load(cls, path: str | os.PathLike) -> FoldedRotations:
        """Read a file written by :meth:`save`."""
        from safetensors import safe_open

        target = Path(path)
        if not target.is_file():
            raise FileNotFoundError(f"folded rotations file {str(target)!r} does not exist")
        with safe_open(str(target), framework="pt") as f:
            header = json.loads((f.metadata() or {}).get("qsparse", "{}"))
            if header.get("format") not in READABLE_FORMATS:
                raise ValueError(f"{str(target)!r} is not a folded-rotations file (format "
                                 f"{header.get('format')!r}, expected one of "
                                 f"{list(READABLE_FORMATS)})")
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
        return cls(residual=tensors.get("residual"),
                   layers=[tensors[f"layers.{i}"] for i in range(header["layers"])] or None,
                   heads=[tensors[f"heads.{i}"] for i in range(header["heads"])] or None,
                   down=[tensors[f"down.{i}"] for i in range(header.get("down", 0))] or None,
                   scale_power=header.get("scale_power"), metadata=header["metadata"])


def _basis_changes(rotations: list[torch.Tensor]) -> int:
    """Layer boundaries where the rotation changes (equal neighbours share a segment)."""
    return sum(not torch.equal(a, b) for a, b in itertools.pairwise(rotations))


class _BasisChange(nn.Module):
    """``h C`` on a decoder layer's incoming residual stream (per-layer rotations)."""

    def __init__(self, change: torch.Tensor):
        super().__init__()
        self.register_buffer("change", change)

    def hook(self, _module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (args[0] @ self.change.to(args[0].dtype), *args[1:]), kwargs
        hidden = kwargs["hidden_states"]
        return args, {**kwargs, "hidden_states": hidden @ self.change.to(hidden.dtype)}


def _fold_per_layer(model: nn.Module, rotations: list[torch.Tensor]) -> nn.Module:
    """Norm weights folded, layer ``l``'s readers/writers in basis ``Q_l``, the embedding in
    ``Q_0``, the head in ``Q_{L-1}``, and ``h Q_{l-1}^T Q_l`` before layer ``l >= 1``."""
    layers = model.model.layers
    dim = model.config.hidden_size
    if len(rotations) != len(layers):
        raise ValueError(f"FoldedRotations.layers: need one [{dim}, {dim}] rotation per layer "
                         f"({len(layers)}), got {len(rotations)}")
    qs = [check_orthogonal(q, dim, f"FoldedRotations.layers[{i}]")
          for i, q in enumerate(rotations)]
    folded = fold_norm_weights(model)
    base = folded.model

    def assign(param: nn.Parameter, value: torch.Tensor) -> None:
        param.data.copy_(value.to(device=param.device, dtype=param.dtype))

    assign(base.embed_tokens.weight, base.embed_tokens.weight.double() @ qs[0])
    for i, (layer, q) in enumerate(zip(base.layers, qs, strict=True)):
        attn, mlp = layer.self_attn, layer.mlp
        for reader in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
            assign(reader.weight, reader.weight.double() @ q)
        for writer in (attn.o_proj, mlp.down_proj):
            assign(writer.weight, q.T @ writer.weight.double())
            if writer.bias is not None:
                assign(writer.bias, writer.bias.double() @ q)
        if i and not torch.equal(qs[i - 1], q):  # a new segment: change basis
            change = _BasisChange((qs[i - 1].T @ q).to(base.embed_tokens.weight.dtype))
            layer.basis_change = change  # a submodule: moves with the model, visible in repr
            layer.register_forward_pre_hook(change.hook, with_kwargs=True)
    assign(folded.lm_head.weight, folded.lm_head.weight.double() @ qs[-1])
    return folded


# --- calibration -----------------------------------------------------------------------------


def _weightless(norm: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """An RMSNorm's output before its weight, as float64 rows."""
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    h64 = h.detach().double().reshape(-1, h.shape[-1])
    return h64 * torch.rsqrt(h64.pow(2).mean(-1, keepdim=True) + eps)


@torch.no_grad()
def calibrate_folded(model: nn.Module, batches: Iterable[Mapping[str, Any]], *,
                     residual: str | None = "pca", per_layer: bool = False,
                     segments: int | None = None, heads: str | None = "pca",
                     down: str | None = None, down_block: int = 64, seed: int = 0,
                     runner: nn.Module | None = None) -> FoldedRotations:
    """Rotations to fold, measured on ``batches`` (keyword arguments of ``runner``'s forward,
    ``runner`` defaulting to ``model``; ``model.model`` skips the head's vocabulary product).

    Args:
        residual: ``"pca"``, ``"hadamard"`` or None (no residual rotation).
        per_layer: one residual rotation per decoder layer (PCA of that layer's two norm
            inputs) instead of one for the whole stream; needs ``residual="pca"``.
        segments: with ``per_layer``, split the layers into this many consecutive segments
            of (nearly) equal length sharing one rotation (their norm inputs pooled): only
            ``segments - 1`` basis changes at runtime. None: one segment per layer.
        heads: ``"pca"``, ``"hadamard"`` or None: the per-kv-head rotations of o's input.
        down: ``"pca"``, ``"hadamard"`` or None: the down input's online block rotation
            (PCA of each block of ``down_block`` consecutive features, or one Hadamard-like
            block repeated).
        down_block: the width of those blocks; must divide the down input's width.
        seed: of the data-free rotations.
    """
    check_supported(model)
    for name, value in (("residual", residual), ("heads", heads), ("down", down)):
        if value is not None and value not in KINDS:
            raise ValueError(f"calibrate_folded: {name} must be one of {list(KINDS)} or None, "
                             f"got {value!r}")
    if per_layer and residual != "pca":
        raise ValueError(f"calibrate_folded: per_layer=True needs residual='pca', "
                         f"got {residual!r}")
    q_heads, kv_heads, head_dim = head_layout(model)
    dim = model.config.hidden_size
    layers = list(model.model.layers)
    hidden = layers[0].mlp.down_proj.in_features
    if down is not None and (not isinstance(down_block, int) or isinstance(down_block, bool)
                             or down_block < 1 or hidden % down_block):
        raise ValueError(f"calibrate_folded: down_block must be a positive int dividing the "
                         f"down input's width {hidden}, got {down_block!r}")
    blocks = hidden // down_block if down is not None else 0
    down_moments = [torch.zeros(blocks, down_block, down_block, dtype=torch.float64)
                    for _ in layers]
    norm_moments = [torch.zeros(dim, dim, dtype=torch.float64) for _ in range(len(layers) + 1)]
    head_moments = [torch.zeros(kv_heads, head_dim, head_dim, dtype=torch.float64)
                    for _ in layers]
    tokens = [0]
    handles = []

    def on_norm(index: int):
        def hook(norm: nn.Module, args: tuple) -> None:
            n = _weightless(norm, args[0])
            norm_moments[index] += n.T @ n
        return hook

    def on_o(index: int):
        def hook(_o: nn.Module, args: tuple) -> None:
            x = args[0].detach().double().reshape(-1, kv_heads, q_heads // kv_heads, head_dim)
            head_moments[index] += torch.einsum("tjha,tjhb->jab", x, x)
        return hook

    def on_down(index: int):
        def hook(_down: nn.Module, args: tuple) -> None:
            x = args[0].detach().double().reshape(-1, blocks, down_block)
            down_moments[index] += torch.einsum("tja,tjb->jab", x, x)
        return hook

    for i, layer in enumerate(layers):
        if down == "pca":
            handles.append(layer.mlp.down_proj.register_forward_pre_hook(on_down(i)))
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            handles.append(norm.register_forward_pre_hook(on_norm(i)))
        if heads == "pca":
            handles.append(layer.self_attn.o_proj.register_forward_pre_hook(on_o(i)))
    handles.append(model.model.norm.register_forward_pre_hook(on_norm(len(layers))))
    run = runner if runner is not None else model
    try:
        if "pca" in (residual, heads, down):
            for batch in batches:
                run(**batch)
                tokens[0] += int(batch["input_ids"].numel())
    finally:
        for handle in handles:
            handle.remove()
    out = FoldedRotations(metadata={"residual": residual, "per_layer": per_layer,
                                    "heads": heads, "down": down, "seed": seed,
                                    "tokens": tokens[0]})
    if residual == "hadamard":
        out.residual = hadamard_like(dim, seed)
    elif residual == "pca" and per_layer:
        count = len(layers) if segments is None else segments
        if not isinstance(count, int) or not 1 <= count <= len(layers):
            raise ValueError(f"calibrate_folded: segments must be an int in [1, {len(layers)}]"
                             f" (the layers), got {segments!r}")
        bounds = [round(i * len(layers) / count) for i in range(count + 1)]
        out.layers = []
        for lo, hi in itertools.pairwise(bounds):
            q = pca_rotation(sum(norm_moments[lo:hi]))
            out.layers += [q] * (hi - lo)
        out.metadata["segments"] = count
    elif residual == "pca":
        out.residual = pca_rotation(sum(norm_moments))
    if heads is not None:
        out.heads = _blockwise(heads, head_moments, seed)
    if down is not None:
        out.down = _blockwise(down, down_moments, seed)
        out.metadata["down_block"] = down_block
    return out


def _blockwise(kind: str, moments: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    """Per layer, one rotation per block of its ``[blocks, b, b]`` second moments: their PCA,
    or (``"hadamard"``) the same data-free Hadamard-like ``b x b`` rotation in every block."""
    if kind == "hadamard":
        count, width, _ = moments[0].shape
        one = hadamard_like(width, seed)
        return [one.expand(count, width, width).clone() for _ in moments]
    return [torch.stack([pca_rotation(block) for block in m]) for m in moments]


def fwht_macs(dim: int, block: int) -> int:
    """Additions of a blockwise fast Walsh-Hadamard transform of a ``dim`` row in blocks of
    ``block`` (a power of two): ``dim log2(block)``, plus ``dim`` multiplies for the scale."""
    if block & (block - 1) or dim % block:
        raise ValueError(f"fwht_macs: block must be a power of two dividing {dim}, got {block}")
    return dim * int(math.log2(block)) + dim
