"""Fold an orthogonal rotation of the residual stream into a pre-norm decoder's weights.

Computational invariance (as SliceGPT and QuaRot use it): in a pre-norm RMSNorm decoder the
residual stream ``h`` (a row vector per token) is only ever read through an RMSNorm and only
ever written by adding a projection's output. For an orthogonal ``Q`` (``Q^T Q = I``) the
norm's *weightless* part commutes with ``Q``: ``||h Q|| == ||h||``, so
``h Q / rms(h Q) == (h / rms(h)) Q``. Once each norm's weight ``g`` is moved into the
projections that read it, the whole model can carry ``h Q`` in place of ``h``:

* every RMSNorm weight becomes ones; a projection ``W`` reading it becomes ``W diag(g)``;
* embedding ``E`` (``[vocab, D]``, one row per token) becomes ``E Q``, so ``h_0`` arrives rotated;
* a projection reading the residual stream (q/k/v, gate/up, and the head) gets
  ``W' = W diag(g) Q``: ``(n Q)(W diag(g) Q)^T == n diag(g) W^T`` (``n`` the weightless norm);
* a projection writing to it (o, down) gets ``W' = Q^T W`` and ``b' = b Q``: its output
  ``y W^T + b`` arrives as ``(y W^T + b) Q``, added to ``h Q``;
* the head reads the final norm like any reader (``W diag(g_final) Q``). When the head is tied
  to the embedding the two need different matrices (``E Q`` and ``E diag(g) Q``), so the folded
  model unties them (``config.tie_word_embeddings = False``) and keeps both.

Which projection inputs this rotates for free (no runtime product):

* **q, k, v** and **gate, up**: their input is ``norm(h Q) == norm_unweighted(h) Q``; top-K
  then acts in the rotated basis, with the ``x Q`` that
  :mod:`qsparse_compile.passes.rotate` would compute at runtime already folded away.
* **not o**: its input is the concatenation of per-head attention outputs, in no way touched by
  the residual rotation. A per-head rotation (``head_dim`` square, folded into v's output rows
  and o's input columns, exact because attention mixes tokens, not features) would be, but is
  not implemented here.
* **not down**: its input ``act(gate) * up`` lies behind an elementwise non-linearity, which no
  rotation commutes with; rotating it needs an online transform (a fast Walsh-Hadamard, or a
  block-diagonal rotation). Not implemented here.

Supported: the Llama family's layout (``model.embed_tokens``, ``model.layers[i]`` with
``input_layernorm`` / ``self_attn.{q,k,v,o}_proj`` / ``post_attention_layernorm`` /
``mlp.{gate,up,down}_proj``, ``model.norm``, ``lm_head``) for the model types in
:data:`SUPPORTED_MODEL_TYPES` (SmolLM2 is ``llama``; Qwen2's q/k/v biases are on the output
side and need no change). Everything is computed in float64 and cast back to each parameter's
dtype, so the folded fp32 model matches the original to rounding.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "check_orthogonal",
    "fold_norm_weights",
    "fold_rotation",
    "hadamard",
    "random_orthogonal",
]

#: ``config.model_type`` values whose layout and RMSNorm (``weight * x / rms(x)``) this
#: module knows. Gemma-style norms (``(1 + weight) * ...``), LayerNorm (mean subtraction does
#: not commute with an arbitrary ``Q``) and post-norm models are deliberately absent.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

#: Largest ``|Q^T Q - I|`` entry accepted: a float64 rotation is orthogonal to ~1e-15 and a
#: float32 one to ~1e-6; anything worse would change the model, not just rotate it.
ORTHOGONALITY_TOLERANCE = 1e-5

_READERS_ATTN = ("q_proj", "k_proj", "v_proj")
_READERS_MLP = ("gate_proj", "up_proj")


def random_orthogonal(dim: int, seed: int = 0) -> torch.Tensor:
    """A Haar-random ``[dim, dim]`` orthogonal matrix in float64 (QR of a Gaussian, signs fixed
    by R's diagonal so the distribution is uniform, not biased by the QR convention)."""
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"random_orthogonal: dim must be a positive int, got {dim!r}")
    generator = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def hadamard(dim: int) -> torch.Tensor:
    """The normalised Sylvester Hadamard matrix ``H / sqrt(dim)`` in float64 (orthogonal and
    symmetric); ``dim`` must be a power of two, the only orders Sylvester's construction has."""
    if not isinstance(dim, int) or dim < 1 or dim & (dim - 1):
        raise ValueError(f"hadamard: dim must be a power of two, got {dim!r} "
                         f"(use random_orthogonal for other sizes)")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < dim:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(dim)


def check_orthogonal(q: torch.Tensor, dim: int, where: str = "rotation") -> torch.Tensor:
    """``q`` as float64 after checking it is a finite ``[dim, dim]`` orthogonal matrix; a
    ``ValueError`` / ``TypeError`` naming what was given otherwise."""
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"{where}: must be a torch.Tensor of shape [{dim}, {dim}], "
                        f"got {type(q).__name__}")
    if tuple(q.shape) != (dim, dim):
        raise ValueError(f"{where}: must have shape [{dim}, {dim}] (the model's hidden size), "
                         f"got {list(q.shape)}")
    if not q.is_floating_point():
        raise TypeError(f"{where}: must be a floating-point tensor, got {q.dtype}")
    q64 = q.detach().to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(q64).all():
        raise ValueError(f"{where}: has non-finite entries")
    error = (q64.T @ q64 - torch.eye(dim, dtype=torch.float64)).abs().max().item()
    if error > ORTHOGONALITY_TOLERANCE:
        raise ValueError(f"{where}: is not orthogonal (max |Q^T Q - I| = {error:.3g}, "
                         f"allowed {ORTHOGONALITY_TOLERANCE:g})")
    return q64


def _check_supported(model: nn.Module) -> None:
    """Raise unless ``model`` is a causal LM with the Llama family's layout and RMSNorms."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"rotation folding supports model types {list(SUPPORTED_MODEL_TYPES)}, "
                         f"got {model_type!r} ({type(model).__name__})")
    base = getattr(model, "model", None)
    head = getattr(model, "lm_head", None)
    missing = [name for name, found in (("model", base), ("lm_head", head)) if found is None]
    if base is not None:
        missing += [f"model.{name}" for name in ("embed_tokens", "layers", "norm")
                    if getattr(base, name, None) is None]
    if missing:
        raise ValueError(f"rotation folding needs a causal LM (e.g. LlamaForCausalLM) with "
                         f"model.embed_tokens, model.layers, model.norm and lm_head; "
                         f"{type(model).__name__} lacks {missing}")
    norms = [("model.norm", base.norm)]
    for i, layer in enumerate(base.layers):
        prefix = f"model.layers.{i}"
        for name in ("input_layernorm", "post_attention_layernorm"):
            norms.append((f"{prefix}.{name}", getattr(layer, name, None)))
        for owner, names in (("self_attn", (*_READERS_ATTN, "o_proj")),
                             ("mlp", (*_READERS_MLP, "down_proj"))):
            for name in names:
                found = getattr(getattr(layer, owner, None), name, None)
                if not isinstance(found, nn.Linear):
                    raise ValueError(f"rotation folding: {prefix}.{owner}.{name} must be an "
                                     f"nn.Linear, got {type(found).__name__}")
    for path, norm in norms:
        # The fold assumes ``weight * x / rms(x)``: a class named *RMSNorm with a [D] weight
        # (mean-subtracting norms and biased norms do not commute with Q).
        weight = getattr(norm, "weight", None)
        biased = getattr(norm, "bias", None) is not None
        if (not type(norm).__name__.endswith("RMSNorm") or weight is None or biased
                or weight.shape != (config.hidden_size,)):
            raise ValueError(f"rotation folding: {path} must be an RMSNorm with a "
                             f"[{config.hidden_size}] weight and no bias, got "
                             f"{type(norm).__name__}")


def _assign(param: nn.Parameter, value: torch.Tensor) -> None:
    """Write a float64 result into ``param`` in its own dtype and device."""
    param.data.copy_(value.to(device=param.device, dtype=param.dtype))


def _fold_norm_into(norm: nn.Module, readers: list[nn.Linear]) -> None:
    """``W diag(g)`` for every reader, then ``g = 1``: the same function of the norm's input."""
    g = norm.weight.detach().double()
    for linear in readers:
        _assign(linear.weight, linear.weight.detach().double() * g.unsqueeze(0))
    norm.weight.data.fill_(1.0)


def _untie_head(model: nn.Module) -> None:
    """Give ``lm_head`` its own weight when it shares the embedding's: folding needs two
    different matrices there. The config says so too, so a later ``tie_weights`` (loading,
    resizing) does not tie them back."""
    head, embed = model.lm_head, model.model.embed_tokens
    if head.weight is embed.weight or head.weight.data_ptr() == embed.weight.data_ptr():
        head.weight = nn.Parameter(embed.weight.detach().clone(),
                                   requires_grad=embed.weight.requires_grad)
    model.config.tie_word_embeddings = False
    text_config = getattr(model.config, "get_text_config", None)
    if text_config is not None:
        text_config().tie_word_embeddings = False


def _layer_groups(model: nn.Module) -> list[tuple[nn.Module, list[nn.Linear]]]:
    """(norm, projections reading it) for every RMSNorm of the model, the head included."""
    groups = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        groups.append((layer.input_layernorm, [getattr(attn, n) for n in _READERS_ATTN]))
        groups.append((layer.post_attention_layernorm, [getattr(mlp, n) for n in _READERS_MLP]))
    groups.append((model.model.norm, [model.lm_head]))
    return groups


@torch.no_grad()
def fold_norm_weights(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """The model with every RMSNorm's weight moved into the projections (and head) reading it.

    The same function as ``model`` (to rounding); the first half of :func:`fold_rotation`, and
    on its own the unrotated baseline whose q/k/v/gate/up inputs are the weightless norm's
    output. A tied head is untied (see the module docstring).
    """
    _check_supported(model)
    folded = model if inplace else copy.deepcopy(model)
    _untie_head(folded)
    for norm, readers in _layer_groups(folded):
        _fold_norm_into(norm, readers)
    return folded


@torch.no_grad()
def fold_rotation(model: nn.Module, rotation: torch.Tensor, *, inplace: bool = False
                  ) -> nn.Module:
    """The model with RMSNorm weights folded and the residual stream rotated by ``rotation``.

    ``rotation`` is an orthogonal ``[hidden_size, hidden_size]`` matrix (best built in float64:
    :func:`random_orthogonal`, :func:`hadamard`). The result (a deep copy unless ``inplace``)
    computes the same logits as ``model``, while the inputs of every q/k/v/gate/up projection
    are ``norm_unweighted(h) @ rotation``: compiled with top-K, they are sparsified in the
    rotated basis with no runtime product. A tied head is untied.
    """
    _check_supported(model)
    q = check_orthogonal(rotation, model.config.hidden_size)
    folded = fold_norm_weights(model, inplace=inplace)
    base = folded.model
    embed = base.embed_tokens.weight
    _assign(embed, embed.detach().double() @ q.to(embed.device))
    for _, readers in _layer_groups(folded):
        for linear in readers:  # input side: W diag(g) Q (diag(g) already folded)
            _assign(linear.weight, linear.weight.detach().double() @ q.to(linear.weight.device))
    for layer in base.layers:
        for writer in (layer.self_attn.o_proj, layer.mlp.down_proj):  # output side: Q^T W, b Q
            qd = q.to(writer.weight.device)
            _assign(writer.weight, qd.T @ writer.weight.detach().double())
            if writer.bias is not None:
                _assign(writer.bias, writer.bias.detach().double() @ qd)
    return folded
