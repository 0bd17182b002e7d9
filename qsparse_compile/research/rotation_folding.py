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
* **not o** by the residual rotation: its input is the concatenation of per-head attention
  outputs, in no way touched by it. :func:`fold_head_rotations` rotates it instead: one
  ``head_dim`` square rotation ``R_j`` per *kv* head, folded into v's output rows of that kv
  head (``R_j^T W_v``, ``b_v R_j``) and into o's input columns of every q head reading it
  (``W_o[:, h] R_j``). Exact, because attention mixes tokens, not features: a q head's
  output is a convex combination of its kv head's value rows, so it arrives rotated by
  ``R_j`` too (under GQA all q heads sharing a kv head share its ``R_j``).
* **not down** for free: its input ``act(gate) * up`` lies behind an elementwise
  non-linearity, which no rotation commutes with. :func:`fold_importance_scales` folds a
  per-channel *scale* there (up's rows, down's columns), exact because the GLU's product is
  linear in ``up``; :func:`fold_down_rotations` rotates it with an online block-diagonal
  transform (a runtime product of ``d_ff x block`` multiply-adds per token and layer, the
  inverse folded into down's columns).

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
    "check_supported",
    "DownRotation",
    "fold_down_rotations",
    "fold_head_rotations",
    "fold_importance_scales",
    "fold_norm_weights",
    "fold_rotation",
    "head_layout",
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


def check_supported(model: nn.Module) -> None:
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
    check_supported(model)
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
    check_supported(model)
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


def head_layout(model: nn.Module) -> tuple[int, int, int]:
    """``(q_heads, kv_heads, head_dim)`` of a supported model, from its config and checked
    against v's and o's weight shapes (v: ``[kv_heads * head_dim, D]``, o:
    ``[D, q_heads * head_dim]``)."""
    check_supported(model)
    config = model.config
    q_heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or q_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // q_heads
    attn = model.model.layers[0].self_attn
    if (attn.v_proj.out_features != kv_heads * head_dim
            or attn.o_proj.in_features != q_heads * head_dim or q_heads % kv_heads):
        raise ValueError(f"head rotations: config says {q_heads} q heads, {kv_heads} kv heads "
                         f"of dim {head_dim}, but v_proj has {attn.v_proj.out_features} outputs "
                         f"and o_proj {attn.o_proj.in_features} inputs")
    return q_heads, kv_heads, head_dim


def _orthogonal_blocks(blocks: torch.Tensor, where: str) -> torch.Tensor:
    """``[n, b, b]`` blocks, each checked by :func:`check_orthogonal` (float64)."""
    return torch.stack([check_orthogonal(block, blocks.shape[-1], f"{where}[{j}]")
                        for j, block in enumerate(blocks)])


def _check_power(power: object, where: str) -> None:
    if not isinstance(power, (int, float)) or not 0 <= power <= 4:
        raise ValueError(f"{where}: power must be a number in [0, 4], got {power!r}")


def _check_one_per_layer(model: nn.Module, rotations: object, where: str, what: str) -> None:
    """``rotations`` must be a list or tuple with one entry per decoder layer."""
    count = len(model.model.layers)
    if not isinstance(rotations, (list, tuple)) or len(rotations) != count:
        given = (len(rotations) if isinstance(rotations, (list, tuple))
                 else type(rotations).__name__)
        raise ValueError(f"{where}: need one {what} tensor per layer ({count}), got {given}")


@torch.no_grad()
def fold_head_rotations(model: nn.Module, rotations: list[torch.Tensor], *,
                        inplace: bool = False) -> nn.Module:
    """The model with o's input rotated per kv head, folded into v and o (no runtime product).

    ``rotations[i]`` is ``[kv_heads, head_dim, head_dim]``: layer ``i``'s rotation ``R_j`` of
    each kv head ``j`` (each orthogonal). v's output rows of kv head ``j`` become
    ``R_j^T W_v[j]`` (its bias ``b_v[j] R_j``), o's input columns of each q head ``h`` reading
    kv head ``j = h // (q_heads / kv_heads)`` become ``W_o[:, h] R_j``; the logits are
    unchanged and o's top-K acts on the rotated attention output. Independent of (and
    composable with) :func:`fold_rotation`, which touches neither v's outputs nor o's inputs.
    """
    q_heads, kv_heads, head_dim = head_layout(model)
    _check_one_per_layer(model, rotations, "fold_head_rotations",
                         "[kv_heads, head_dim, head_dim]")
    checked = []
    for i, r in enumerate(rotations):
        where = f"fold_head_rotations: rotations[{i}]"
        if not isinstance(r, torch.Tensor) or tuple(r.shape) != (kv_heads, head_dim, head_dim):
            shape = list(r.shape) if isinstance(r, torch.Tensor) else type(r).__name__
            raise ValueError(f"{where} must be [{kv_heads}, {head_dim}, {head_dim}] "
                             f"(kv heads, head_dim, head_dim), got {shape}")
        checked.append(_orthogonal_blocks(r, where))
    folded = model if inplace else copy.deepcopy(model)
    group = q_heads // kv_heads
    for layer, r in zip(folded.model.layers, checked, strict=True):
        v, o = layer.self_attn.v_proj, layer.self_attn.o_proj
        r = r.to(v.weight.device)
        wv = v.weight.detach().double().reshape(kv_heads, head_dim, -1)
        _assign(v.weight, torch.einsum("jab,jac->jbc", r, wv).reshape(v.weight.shape))
        if v.bias is not None:
            bv = v.bias.detach().double().reshape(kv_heads, head_dim)
            _assign(v.bias, torch.einsum("ja,jab->jb", bv, r).reshape(v.bias.shape))
        wo = o.weight.detach().double().reshape(o.out_features, q_heads, head_dim)
        per_q = r.repeat_interleave(group, dim=0)  # q head h reads kv head h // group
        _assign(o.weight, torch.einsum("ohb,hbc->ohc", wo, per_q).reshape(o.weight.shape))
    return folded


def _column_norms(weights: list[torch.Tensor]) -> torch.Tensor:
    """``sqrt(sum_r ||W_r[:, j]||^2)`` over the readers of one input, float64."""
    return torch.sqrt(sum(w.detach().double().pow(2).sum(0) for w in weights))


def _importance(norms: torch.Tensor, power: float) -> torch.Tensor:
    """``norms ** power`` normalised to RMS 1 (the scale is free; RMS 1 keeps magnitudes
    where the unscaled model had them), floored so no channel's weight becomes 0."""
    c = norms.clamp_min(norms.max() * 1e-6) ** power
    return c / c.pow(2).mean().sqrt()


@torch.no_grad()
def fold_importance_scales(model: nn.Module, power: float = 1.0, *, inplace: bool = False,
                           down: bool = True) -> nn.Module:
    """The same function with each projection input scaled by its weight columns' norms, so
    top-K's ``|x_j|`` becomes ``|x_j| * c_j``, ``c_j = (sum_r ||W_r[:, j]||^2) ** (power / 2)``
    (``power=1``: Wanda's ``|x| ||W_col||`` importance of dropping input ``j``).

    Every scale is a diagonal folded exactly where the algebra allows, with no runtime op:

    * q/k/v and gate/up: the RMSNorm weight becomes ``w_j c_j`` and the readers
      ``W diag(1 / c)`` (``n diag(w c) (W diag(1/c))^T == n diag(w) W^T``);
    * o: v's output channel ``(kv head j, a)`` times ``c_{j,a}``, o's input columns of every
      q head reading it divided by it (attention is linear in the values), ``c`` pooling
      those q heads' columns;
    * down: up's output channel times ``c_j``, down's input column divided by it
      (``act(gate) * up`` is linear in ``up``).

    Composes with :func:`fold_rotation` and :func:`fold_head_rotations` (apply it last: it
    measures the column norms of the weights as they then are). ``down=False`` leaves up and
    down alone (:func:`fold_down_rotations` then folds the down input's scales into its
    transform, after the rotation).
    """
    check_supported(model)
    _check_power(power, "fold_importance_scales")
    q_heads, kv_heads, head_dim = head_layout(model)
    folded = model if inplace else copy.deepcopy(model)
    _untie_head(folded)  # the final norm's scale reaches the head, not the embedding
    for norm, readers in _layer_groups(folded):
        c = _importance(_column_norms([r.weight for r in readers]), power)
        for linear in readers:
            _assign(linear.weight, linear.weight.detach().double() / c.unsqueeze(0))
        _assign(norm.weight, norm.weight.detach().double() * c)
    group = q_heads // kv_heads
    for layer in folded.model.layers:
        v, o, up, down = (layer.self_attn.v_proj, layer.self_attn.o_proj, layer.mlp.up_proj,
                          layer.mlp.down_proj)
        wo = o.weight.detach().double().reshape(o.out_features, kv_heads, group, head_dim)
        c_kv = _importance(wo.pow(2).sum((0, 2)).sqrt().reshape(-1), power)  # [kv * hd]
        _scale_rows(v, c_kv)
        per_q = c_kv.reshape(kv_heads, 1, head_dim).expand(kv_heads, group, head_dim)
        _assign(o.weight, (wo / per_q).reshape(o.weight.shape))
        if down:
            c = _importance(_column_norms([down.weight]), power)
            _scale_rows(up, c)
            _assign(down.weight, down.weight.detach().double() / c.unsqueeze(0))
    return folded


class DownRotation(nn.Module):
    """The online transform of a down projection's input: ``x -> x blockdiag(T_1, ..., T_n)``,
    ``blocks`` ``[n, b, b]`` (one ``T_i`` per ``b`` consecutive features), run as a forward
    pre-hook of ``down_proj`` (installed by :func:`fold_down_rotations`)."""

    def __init__(self, blocks: torch.Tensor):
        super().__init__()
        self.register_buffer("blocks", blocks)

    def hook(self, _module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        count, width, _ = self.blocks.shape
        # einsum, not a broadcast matmul: that would copy the blocks once per token
        rows = torch.einsum("...ja,jab->...jb", x.unflatten(-1, (count, width)),
                            self.blocks.to(x.dtype))
        return (rows.flatten(-2), *args[1:])


@torch.no_grad()
def fold_down_rotations(model: nn.Module, rotations: list[torch.Tensor],
                        scale_power: float | None = None, *, inplace: bool = False
                        ) -> nn.Module:
    """The model with each down projection's input rotated online, blockwise.

    ``rotations[i]`` is ``[n, b, b]`` (``n b`` = down's input width, each block orthogonal):
    layer ``i``'s down input ``x`` becomes ``x R`` (``R`` the block-diagonal of the blocks)
    before top-K, by a :class:`DownRotation` pre-hook (submodule ``mlp.down_rotation``,
    buffer ``blocks``, a batch of matrices the compiler never takes for a projection), and down's
    weight becomes ``W R`` (``(x R)(W R)^T == x W^T``). With ``scale_power`` the rotated
    input is also scaled by the importance of ``W R``'s columns (as
    :func:`fold_importance_scales` does, folded into the blocks and down's columns, so top-K
    keeps the largest ``|(x R)_j| ||(W R)[:, j]||``). Costs ``n b^2`` multiply-adds per token
    and layer at runtime.
    """
    check_supported(model)
    _check_one_per_layer(model, rotations, "fold_down_rotations", "[blocks, block, block]")
    if scale_power is not None:
        _check_power(scale_power, "fold_down_rotations")
    width = model.model.layers[0].mlp.down_proj.in_features
    checked = []
    for i, r in enumerate(rotations):
        where = f"fold_down_rotations: rotations[{i}]"
        if (not isinstance(r, torch.Tensor) or r.dim() != 3 or r.shape[1] != r.shape[2]
                or r.shape[0] * r.shape[1] != width):
            shape = list(r.shape) if isinstance(r, torch.Tensor) else type(r).__name__
            raise ValueError(f"{where} must be [blocks, block, block] with blocks * block = "
                             f"{width} (down's input width), got {shape}")
        checked.append(_orthogonal_blocks(r, where))
    folded = model if inplace else copy.deepcopy(model)
    for layer, r in zip(folded.model.layers, checked, strict=True):
        down = layer.mlp.down_proj
        r = r.to(down.weight.device)
        w = down.weight.detach().double() @ torch.block_diag(*r)
        if scale_power is not None:
            c = _importance(_column_norms([w]), scale_power)
            r = r * c.reshape(r.shape[0], 1, r.shape[1])  # column j of the transform times c_j
            w = w / c.unsqueeze(0)
        _assign(down.weight, w)
        layer.mlp.down_rotation = DownRotation(r.to(down.weight.dtype))
        down.register_forward_pre_hook(layer.mlp.down_rotation.hook)
    return folded


def _scale_rows(linear: nn.Linear, c: torch.Tensor) -> None:
    """Output channel ``i`` of ``linear`` times ``c_i`` (weight row and bias)."""
    _assign(linear.weight, linear.weight.detach().double() * c.unsqueeze(1))
    if linear.bias is not None:
        _assign(linear.bias, linear.bias.detach().double() * c)
