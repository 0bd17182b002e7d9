"""The eager reference: Q-Sparse's exact semantics (DESIGN.md) in plain, readable PyTorch.

This module is the oracle every op, kernel and pass is compared against. It uses no custom ops
and favours clarity over speed: the top-K mask comes from a stable sort, not from the
threshold selection the ops and kernels use, so agreeing with it is evidence, not tautology.

Everything acts on the last dimension (a row is one token's features).
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator

import torch
from torch.overrides import TorchFunctionMode

from . import plan as plan_module
from .config import ProjectionPlan, QSparseConfig
from .modules import ProjectionModule, all_projections
from .plan import resolve_plan
from .roles import projection_roles

__all__ = [
    "topk_mask",
    "block_mask",
    "l2_rescale_factor",
    "topk_sparsify",
    "block_sparsify",
    "int8_fake_quant",
    "ternary_fake_quant",
    "int8_weight",
    "int4_weight",
    "sparsify_input",
    "projection",
    "reference_model",
    "rms_norm",
    "norm_sparsify",
    "REFERENCE_OPS",
]


def topk_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask keeping the ``k`` largest ``|x|`` of each row.

    Ties at the k-th magnitude go to the lower index: a stable descending sort keeps equal
    magnitudes in index order. ``torch.sort`` orders NaN above every number, so NaNs are kept.
    """
    order = torch.sort(x.abs(), dim=-1, descending=True, stable=True).indices
    mask = torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    return mask.scatter(-1, order[..., :k], True)


def block_mask(x: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Boolean mask keeping the ``n`` largest ``|x|`` in each group of ``m`` consecutive entries."""
    groups = x.reshape(*x.shape[:-1], x.shape[-1] // m, m)
    return topk_mask(groups, n).reshape(x.shape)


def l2_rescale_factor(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-row float32 factor ``||x|| / ||x * mask||`` (1 where the masked row is all zero)."""
    full = torch.linalg.vector_norm(x.float(), dim=-1, keepdim=True)
    kept = torch.linalg.vector_norm(torch.where(mask, x, 0).float(), dim=-1, keepdim=True)
    return torch.where(kept > 0, full / kept, torch.ones_like(kept))


class _StraightThrough(torch.autograd.Function):
    """Forward: ``value``. Backward: the upstream gradient, optionally scaled and masked.

    This is DESIGN.md point 7: the mask (and any quantizer) is transparent to the gradient;
    ``grad_scale`` (the rescale factor) multiplies it as a constant; ``grad_mask`` is the
    ``ste=False`` ablation.
    """

    @staticmethod
    def forward(ctx, x, value, grad_scale, grad_mask):  # noqa: D102
        ctx.save_for_backward(grad_scale, grad_mask)
        return value

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        scale, mask = ctx.saved_tensors
        if scale is not None:
            grad = (grad.float() * scale).to(grad.dtype)
        if mask is not None:
            grad = torch.where(mask, grad, 0)
        return grad, None, None, None


def _apply_mask(x: torch.Tensor, mask: torch.Tensor, rescale: str, ste: bool) -> torch.Tensor:
    value = torch.where(mask, x, 0)
    scale = None
    if rescale == "l2":
        scale = l2_rescale_factor(x, mask)
        value = (value.float() * scale).to(x.dtype)
    return _StraightThrough.apply(x, value.detach(), scale, None if ste else mask)


def topk_sparsify(
    x: torch.Tensor, k: int, rescale: str = "none", ste: bool = True
) -> torch.Tensor:
    """Keep the top-``k`` magnitudes of each row (exact values), zero the rest."""
    return _apply_mask(x, topk_mask(x.detach(), k), rescale, ste)


def block_sparsify(
    x: torch.Tensor, n: int, m: int, rescale: str = "none", ste: bool = True
) -> torch.Tensor:
    """Keep the top-``n`` magnitudes of every group of ``m`` consecutive entries."""
    return _apply_mask(x, block_mask(x.detach(), n, m), rescale, ste)


def int8_fake_quant(x: torch.Tensor) -> torch.Tensor:
    """Per-row absmax int8 quantize-dequantize, straight-through in the backward pass."""
    xf = x.detach().float()
    gamma = xf.abs().amax(dim=-1, keepdim=True).clamp_min(1e-5)
    q = torch.clamp(torch.round(127.0 * xf / gamma), -128, 127)
    return _StraightThrough.apply(x, (q * gamma / 127.0).to(x.dtype), None, None)


def ternary_fake_quant(w: torch.Tensor) -> torch.Tensor:
    """Per-tensor absmean ternary weights ``{-a, 0, a}``, straight-through (BitNet b1.58)."""
    wf = w.detach().float()
    alpha = wf.abs().mean().clamp_min(1e-5)
    q = torch.clamp(torch.round(wf / alpha), -1, 1)
    return _StraightThrough.apply(w, (q * alpha).to(w.dtype), None, None)


def int8_weight(w: torch.Tensor) -> torch.Tensor:
    """Format ``"int8"`` of a ``[out, in]`` weight: one scale per output channel (row),
    ``s = max(max|W[o, :]|, 1e-8) / 127``, values ``clamp(round(W / s), -127, 127) * s``;
    straight-through."""
    wf = w.detach().float()
    s = wf.abs().amax(dim=1, keepdim=True).clamp_min(1e-8) / 127.0
    q = torch.clamp(torch.round(wf / s), -127, 127)
    return _StraightThrough.apply(w, (q * s).to(w.dtype), None, None)


def int4_weight(w: torch.Tensor) -> torch.Tensor:
    """Format ``"int4"`` of a ``[out, in]`` weight: per row and group of 32 consecutive
    input features (the last group may be shorter), ``m = min``, ``d = (max - m) / 15``, both
    rounded to float16 as they are stored, ``q = clamp(round((W - m) / d), 0, 15)`` (0 where
    ``d == 0``), values ``d * q + m``; straight-through."""
    wf = w.detach().float()
    out = torch.empty_like(wf)
    for start in range(0, wf.shape[1], 32):
        group = wf[:, start:start + 32]
        low = group.amin(dim=1, keepdim=True)
        d = ((group.amax(dim=1, keepdim=True) - low) / 15.0).to(torch.float16).float()
        m = low.to(torch.float16).float()
        q = torch.clamp(torch.round((group - m) / d), 0, 15)
        q = torch.where(d == 0, torch.zeros_like(q), q)
        out[:, start:start + 32] = d * q + m
    return _StraightThrough.apply(w, out.to(w.dtype), None, None)


#: The reference of each ``weights=`` format, for ``[out, in]`` weights.
WEIGHT_FORMATS = {"int8": int8_weight, "int4": int4_weight}


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Llama's RMSNorm: ``w * (x32 * rsqrt(mean(x32^2) + eps)).to(dtype)``."""
    xf = x.float()
    out = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return out if weight is None else weight * out


def norm_sparsify(x: torch.Tensor, norm: str, weight: torch.Tensor | None,
                  bias: torch.Tensor | None, eps: float, k: int, n: int, m: int,
                  rescale: bool, quant: bool, ste: bool) -> torch.Tensor:
    """What ``qsparse::norm_sparsify`` fuses: ``int8?(sparsify(norm(x)))``, unfused.

    ``m == 0`` selects top-``k``; otherwise block ``n:m``. Gradients flow through the norm by
    autograd and straight through the sparsifier and quantizer.
    """
    if norm == "rms":
        h = rms_norm(x, weight, eps)
    else:
        h = torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    mode = "l2" if rescale else "none"
    out = block_sparsify(h, n, m, mode, ste) if m else topk_sparsify(h, k, mode, ste)
    return int8_fake_quant(out) if quant else out


def autocast_operand(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``F.linear`` would multiply it: cast to the autocast dtype of its device when
    autocast is on there (the ``qsparse`` ops' autocast rule), else unchanged."""
    device = x.device.type
    if x.is_floating_point() and torch.amp.is_autocast_available(device) \
            and torch.is_autocast_enabled(device):
        return x.to(torch.get_autocast_dtype(device))
    return x


class _ReferenceOps:
    """The oracle's elementary operations, for :mod:`qsparse_compile.plan`.

    Under autocast each selects and quantizes the operand ``F.linear`` would multiply (cast
    to the autocast dtype), as the ``qsparse`` ops do.
    """

    @staticmethod
    def topk(x, k, rescale, ste):
        return topk_sparsify(autocast_operand(x), k, "l2" if rescale else "none", ste)

    @staticmethod
    def block(x, n, m, rescale, ste):
        return block_sparsify(autocast_operand(x), n, m, "l2" if rescale else "none", ste)

    @staticmethod
    def int8(x):
        return int8_fake_quant(autocast_operand(x))

    @staticmethod
    def ternary(w):
        return ternary_fake_quant(autocast_operand(w))

    @staticmethod
    def weights(w, fmt, in_dim):
        w = autocast_operand(w)
        if in_dim == -2:
            return WEIGHT_FORMATS[fmt](w.transpose(-1, -2)).transpose(-1, -2)
        if w.dim() == 2:
            return WEIGHT_FORMATS[fmt](w)
        return WEIGHT_FORMATS[fmt](w.flatten(0, -2)).view(w.shape)

    relu = staticmethod(torch.relu)
    linear = staticmethod(torch.nn.functional.linear)


#: The oracle's operations (sort-based masks, autograd.Function straight-through).
REFERENCE_OPS = _ReferenceOps()


def sparsify_input(x: torch.Tensor, plan: ProjectionPlan, config: QSparseConfig) -> torch.Tensor:
    """A projection's input as the model sees it: sparsified by ``plan``, then quantized."""
    return plan_module.sparsify_input(x, plan, config, REFERENCE_OPS, x.shape[-1])


def projection(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    plan: ProjectionPlan,
    config: QSparseConfig,
) -> torch.Tensor:
    """``y = sparsify(x) W^T + b`` as specified; ternary weights when ``quant="bitnet"``."""
    return plan_module.project(x, weight, bias, plan, config, REFERENCE_OPS, x.shape[-1])


#: ``observe(path, x)``: called with each projection's input as its product sees it.
Observer = Callable[[str, torch.Tensor], None]


def _product(path: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
             plan: ProjectionPlan, config: QSparseConfig, observe: Observer | None,
             ternary_done: bool = False) -> torch.Tensor:
    """:func:`projection`, telling ``observe`` what the product reads (``ternary_done``: the
    weight already holds ternary values, quantized over a whole expert weight)."""
    xs = x if plan.dense else sparsify_input(x, plan, config)
    if observe is not None:
        observe(path, xs)
    if plan.quant == "bitnet" and not ternary_done:
        weight = ternary_fake_quant(weight)
    if plan.weights is not None and not ternary_done:
        weight = REFERENCE_OPS.weights(weight, plan.weights, -1)
    return torch.nn.functional.linear(xs, weight, bias)


class _FunctionalProducts(TorchFunctionMode):
    """Inside one module's forward: products whose weight is a router's own weight, or one
    expert's matrix picked from an expert weight, computed by the reference semantics.

    ``weights`` maps ``id(parameter)`` to ``(path, plan, layout)``; a 2-D parameter is a
    router's weight read by ``F.linear``, a 3-D one an expert weight: picking an expert from it
    (``w[i]``) yields a tagged matrix, and ``F.linear(x, tagged)`` (``"out_in"``) or
    ``x @ tagged`` (``"in_out"``) sparsifies ``x``. For ``bitnet`` the whole expert weight is
    made ternary before the pick (one scale per weight tensor, as the compiler does); a weight
    format applies per expert, output channel and group, also before the pick.
    """

    def __init__(self, weights: dict[int, tuple[str, ProjectionPlan, str]],
                 config: QSparseConfig, observe: Observer | None):
        super().__init__()
        self.weights = weights
        self.config = config
        self.observe = observe
        self.picked: dict[int, tuple[torch.Tensor, str, ProjectionPlan]] = {}

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.__getitem__ and id(args[0]) in self.weights \
                and args[0].dim() == 3:
            path, plan, layout = self.weights[id(args[0])]
            source = ternary_fake_quant(args[0]) if plan.quant == "bitnet" else args[0]
            if plan.weights is not None:  # per expert, output channel and group
                source = REFERENCE_OPS.weights(source, plan.weights,
                                               -1 if layout == "out_in" else -2)
            out = func(source, *args[1:], **kwargs)
            if out.dim() == 2:  # one expert's matrix
                self.picked[id(out)] = (out, path, plan)  # the tensor kept: its id stays unique
            return out
        if func is torch.nn.functional.linear:
            x, w = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if id(w) in self.picked:
                _, path, plan = self.picked[id(w)]
                return _product(path, x, w, bias, plan, self.config, self.observe, True)
            entry = self.weights.get(id(w))
            if entry is not None and w.dim() == 2:
                path, plan, _ = entry
                return _product(path, x, w, bias, plan, self.config, self.observe)
        if func in (torch.matmul, torch.Tensor.__matmul__) and id(args[1]) in self.picked:
            _, path, plan = self.picked[id(args[1])]
            return _product(path, args[0], args[1].t(), None, plan, self.config, self.observe,
                            True)
        return func(*args, **kwargs)


def _eager_forward(module: torch.nn.Module):
    """The module's own forward, before a dispatching decorator (Hugging Face's
    ``use_experts_implementation`` wraps the plain per-expert loop, kept as ``__wrapped__``)."""
    forward = type(module).forward
    return getattr(forward, "__wrapped__", forward)


@contextlib.contextmanager
def _functional_products(module: torch.nn.Module,
                         weights: dict[int, tuple[str, ProjectionPlan, str]],
                         config: QSparseConfig, observe: Observer | None) -> Iterator[None]:
    """Within the block, ``module``'s forward (its plain eager one) runs under
    :class:`_FunctionalProducts`."""
    original = _eager_forward(module)

    def forward(self, *args, **kwargs):
        with _FunctionalProducts(weights, config, observe):
            return original(self, *args, **kwargs)

    had = "forward" in module.__dict__
    previous = module.__dict__.get("forward")
    module.forward = types.MethodType(forward, module)
    try:
        yield
    finally:
        if had:
            module.forward = previous
        else:
            del module.forward


@contextlib.contextmanager
def reference_model(model: torch.nn.Module, config: QSparseConfig | None = None, *,
                    observe: Observer | None = None, **options):
    """Within the block, ``model`` computes every projection through this module's oracle.

    Forward hooks replace the output of each ``nn.Linear`` (and ``Conv1D``-style module with a
    ``[in, out]`` weight) with :func:`projection` under the config's plan for its module path
    and role (:func:`qsparse_compile.roles.projection_roles`), so the eager model is the
    reference a compiled model must match, forward and backward. Routers that compute
    ``F.linear`` on their own weight, and mixture-of-experts experts modules (3-D weights), run
    their plain eager forward (for Hugging Face experts the per-expert loop, whatever
    ``experts_implementation`` the model uses) with each product's input sparsified by its
    plan: the expert's input rows are its tokens. Block patterns that do not divide a
    projection's width leave it dense, as the pass does. ``observe(path, x)``, if given, sees
    every projection's input as its product reads it.
    """
    config = QSparseConfig.from_options(config, **options)
    roles = projection_roles(model)
    handles = []
    functional: dict[int, tuple[torch.nn.Module, dict]] = {}

    def hook(plan, proj: ProjectionModule):
        def run(module, inputs, output):
            return _product(proj.path, inputs[0], proj.weight_out_in(), proj.bias, plan,
                            config, observe)
        return run

    for proj in all_projections(model):
        # block patterns that do not divide the width leave it dense, as the pass does
        plan = resolve_plan(proj.path, proj.in_features, config, warn=False,
                            role=roles.role(proj.path)).plan
        if isinstance(proj, ProjectionModule) and proj.output_is_product:
            handles.append(proj.module.register_forward_hook(hook(plan, proj)))
            continue
        _, weights = functional.setdefault(id(proj.module), (proj.module, {}))
        weights[id(proj.weight)] = (proj.path, plan, proj.layout)
    with contextlib.ExitStack() as stack:
        for module, weights in functional.values():
            stack.enter_context(_functional_products(module, weights, config, observe))
        try:
            yield model
        finally:
            for handle in handles:
                handle.remove()
