"""Fused decode projection over packed weights: ``qsparse::cpu_packed_linear``.

``y = q?(sparsify(x)) @ dequant(packed) + bias`` in one C call: the selection of
:mod:`.topk_linear_op` (top-K ``m == 0`` with ``k == D`` meaning "keep all", or block
``n:m``, optional L2 rescale), then optionally the int8 activation quantizer (``quant``:
``quant="bitnet"``), then a sparse GEMV over weights packed by :func:`prepare_packed_weight`
(int8, int4 or ternary codes, K-major, :mod:`.packed_weights`), dequantised in registers with
fp32 accumulation. A group of projections reading one input shares one call, as for
``cpu_topk_linear``; the output head (dense input) uses it with ``k == D``.

* Rows ``<= max_sparse_rows`` (1..8): the fused kernel through ctypes.
* More rows: the generic sparsify op (and quantizer), then a product with the dequantised
  weights (unpacked on every call: graphs with many rows are never lowered to this op, so
  this is for direct calls only).

Inference only (no backward), as ``cpu_topk_linear``.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable, Sequence

import torch

from ... import reference
from .compiler import load_entry_point
from .native_dispatch import (
    define_with_native_kernel,
    publish_kernel,
    publish_layout,
    publish_threads,
)
from .packed_linear_template import PackedLinearSpec, render
from .packed_weights import FORMATS, PackedLayout, dequantize, pack, quantize
from .topk_linear_op import check_no_grad, decode_threads
from .topk_linear_template import MAX_ROWS, SUPPORTED_DTYPES

__all__ = [
    "cpu_packed_linear",
    "check_packed_buffer",
    "packed_layout",
    "packed_linear",
    "packed_linear_reference",
    "prepare_packed_weight",
]

_OP = "qsparse.cpu_packed_linear"
SCHEMA = (
    "cpu_packed_linear(Tensor x, int k, int n, int m, bool rescale, bool quant, str format, "
    "int out_features, Tensor packed, Tensor? bias, int max_sparse_rows) -> Tensor"
)

_ARGTYPES = [
    ctypes.c_void_p,  # x
    ctypes.c_int64,  # x_stride_t
    ctypes.c_int64,  # x_stride_k
    ctypes.c_int64,  # D
    ctypes.c_int64,  # k
    ctypes.c_int64,  # n
    ctypes.c_int64,  # m
    ctypes.c_int64,  # rescale
    ctypes.c_int64,  # quant
    ctypes.c_void_p,  # packed
    ctypes.c_int64,  # panel_bytes
    ctypes.c_int64,  # scale_off
    ctypes.c_int64,  # min_off
    ctypes.c_int64,  # N
    ctypes.c_int64,  # Np
    ctypes.c_void_p,  # bias (NULL for none)
    ctypes.c_void_p,  # y
    ctypes.c_int64,  # ldy
    ctypes.c_int64,  # nthreads
]


@functools.cache
def _kernel(spec: PackedLinearSpec) -> Callable[..., int]:
    return load_entry_point(spec.name, render(spec), _ARGTYPES)


#: (format, dtype, rows) -> entry point, (format, D, N) -> layout: one look-up per call.
_KERNELS: dict[tuple[str, torch.dtype, int], Callable[..., int]] = {}
_LAYOUTS: dict[tuple[str, int, int], PackedLayout] = {}
_VALIDATED: set[tuple] = set()


def packed_layout(fmt: str, in_features: int, out_features: int) -> PackedLayout:
    """The (memoised) layout of a packed ``[in_features, out_features]`` weight."""
    key = (fmt, in_features, out_features)
    layout = _LAYOUTS.get(key)
    if layout is None:
        layout = _LAYOUTS[key] = PackedLayout(fmt, in_features, out_features)
    return layout


def check_packed_buffer(op: str, layout: PackedLayout, in_features: int, out_features: int,
                        packed: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Raise ValueError unless ``packed`` is the uint8 buffer ``layout`` describes and
    ``bias`` (if any) has ``out_features`` entries; ``op`` names the caller in the message."""
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != layout.nbytes:
        raise ValueError(f"{op}: packed must be the uint8 buffer of prepare_packed_weight for "
                         f"format {layout.format!r}, in_features={in_features}, out_features="
                         f"{out_features} ({layout.nbytes} bytes), got {packed.dtype} of shape "
                         f"{tuple(packed.shape)}")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"{op}: bias must have shape ({out_features},), got "
                         f"{tuple(bias.shape)}")


def prepare_packed_weight(weights: Sequence[torch.Tensor], fmt: str) -> torch.Tensor:
    """The packed buffer for projections reading one input, their outputs side by side.

    Args:
        weights: the projections' ``[out, in]`` weights (the values the products read before
            the format: the model's own weights), all with the same ``in_features``.
        fmt: ``"int8"``, ``"int4"`` (DESIGN.md point 10) or ``"ternary"`` (point 6: each
            weight's absmean scale, ``quant="bitnet"``).

    Returns:
        A ``uint8`` CPU tensor laid out as :func:`packed_layout` says for
        ``(fmt, in_features, sum(out_features))``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"prepare_packed_weight: format {fmt!r} is not one of "
                         f"{', '.join(map(repr, FORMATS))}")
    if not weights:
        raise ValueError("prepare_packed_weight: needs at least one weight, got none")
    shapes = [tuple(w.shape) for w in weights]
    if any(len(s) != 2 for s in shapes) or len({s[1] for s in shapes}) != 1:
        raise ValueError(f"prepare_packed_weight: needs 2-D [out, in] weights sharing "
                         f"in_features, got {shapes}")
    wt = torch.cat([w.detach().to("cpu", torch.float32).t() for w in weights], dim=1)
    layout = packed_layout(fmt, wt.shape[0], wt.shape[1])
    if fmt == "ternary":
        scales = torch.cat([torch.clamp_min(w.detach().float().abs().mean(), 1e-5).expand(
            w.shape[0]) for w in weights]).cpu()
        return pack(layout, *quantize(wt, fmt, scales))
    return pack(layout, *quantize(wt, fmt))


def _check(x: torch.Tensor, k: int, n: int, m: int, fmt: str, out_features: int,
           packed: torch.Tensor, bias: torch.Tensor | None, max_sparse_rows: int) -> None:
    """Validate everything but the device (the fake implementation runs this on meta)."""
    if x.dtype not in SUPPORTED_DTYPES or (bias is not None and bias.dtype != x.dtype):
        allowed = ", ".join(str(d) for d in SUPPORTED_DTYPES)
        raise TypeError(f"{_OP}: x must have dtype {allowed} and bias the same, got x "
                        f"{x.dtype}, bias {None if bias is None else bias.dtype}")
    if fmt not in FORMATS:
        raise ValueError(f"{_OP}: format {fmt!r} is not one of {', '.join(map(repr, FORMATS))}")
    D = x.shape[-1] if x.dim() else 0
    layout = packed_layout(fmt, max(D, 1), max(out_features, 1))
    check_packed_buffer(_OP, layout, D, out_features, packed, bias)
    if m == 0:
        if not 1 <= k <= D:
            raise ValueError(f"{_OP}: k must be in [1, {D}] for in_features={D} (m=0 selects "
                             f"top-K; k={D} keeps every entry), got k={k}")
    elif m < 0 or not 1 <= n <= m or D % m:
        raise ValueError(f"{_OP}: block n:m must satisfy 1 <= n <= m with m dividing "
                         f"in_features={D}, got n={n}, m={m}")
    if not 0 <= max_sparse_rows <= MAX_ROWS:
        raise ValueError(f"{_OP}: max_sparse_rows must be in [0, {MAX_ROWS}], got "
                         f"{max_sparse_rows}")


def packed_linear_reference(x: torch.Tensor, k: int, n: int, m: int, rescale: bool,
                            quant: bool, fmt: str, out_features: int, packed: torch.Tensor,
                            bias: torch.Tensor | None = None) -> torch.Tensor:
    """The op's meaning in plain PyTorch: the oracle's sparsify (and int8 quantizer), then a
    product in fp32 with the dequantised weights; the result in ``x.dtype``."""
    mode = "l2" if rescale else "none"
    with torch.no_grad():
        xs = reference.topk_sparsify(x, k, mode) if m == 0 else \
            reference.block_sparsify(x, n, m, mode)
        if quant:
            xs = reference.int8_fake_quant(xs)
        w = dequantize(packed_layout(fmt, x.shape[-1], out_features), packed)
        y = xs.float() @ w
        if bias is not None:
            y = y + bias.float()
    return y.to(x.dtype)


def _fallback(x, k, n, m, rescale, quant, fmt, out_features, packed, bias):
    ops = torch.ops.qsparse
    xs = ops.topk_sparsify(x, k, rescale, True) if m == 0 else \
        ops.block_sparsify(x, n, m, rescale, True)
    if quant:
        xs = ops.int8_fake_quant(xs)
    w = dequantize(packed_layout(fmt, x.shape[-1], out_features), packed).to(x.dtype)
    flat = xs.reshape(-1, xs.shape[-1])
    y = flat @ w if bias is None else torch.addmm(bias, flat, w)
    return y.reshape(*x.shape[:-1], out_features)


def packed_linear(x: torch.Tensor, k: int, n: int, m: int, rescale: bool, quant: bool,
                  fmt: str, out_features: int, packed: torch.Tensor,
                  bias: torch.Tensor | None = None, max_sparse_rows: int = MAX_ROWS,
                  num_threads: int | None = None) -> torch.Tensor:
    """``q?(sparsify(x)) @ dequant(packed) + bias``: the implementation behind the op.

    Args:
        x: ``[..., D]`` CPU activations (fp32 or bf16), any strides.
        k, n, m, rescale: the selection, as :func:`.topk_linear_op.topk_linear`; ``k == D``
            with ``m == 0`` keeps every entry.
        quant: int8-quantize the kept values per row (DESIGN.md point 5) before the product.
        fmt, out_features, packed: the buffer of :func:`prepare_packed_weight` and what it
            holds (``N = out_features`` columns).
        bias: ``[N]`` or None; max_sparse_rows, num_threads: as for ``topk_linear``.
    """
    D = x.shape[-1]
    rows = x.numel() // D if D else 0
    signature = (x.dtype, D, x.is_cpu, fmt, out_features, packed.dtype, packed.shape,
                 packed.stride(), packed.is_cpu, None if bias is None else (bias.dtype, bias.shape,
                 bias.is_cpu, bias.is_contiguous()), k, n, m, max_sparse_rows)  # fmt: skip
    if signature not in _VALIDATED:
        _check(x, k, n, m, fmt, out_features, packed, bias, max_sparse_rows)
        for label, t in (("x", x), ("packed", packed), ("bias", bias)):
            if t is not None and not t.is_cpu:
                raise ValueError(f"{_OP}: {label} must be on the CPU, got device {t.device}")
        if not packed.is_contiguous() or (bias is not None and not bias.is_contiguous()):
            raise ValueError(f"{_OP}: packed and bias must be contiguous")
        _VALIDATED.add(signature)
    if not 0 < rows <= max_sparse_rows:
        return _fallback(x, k, n, m, rescale, quant, fmt, out_features, packed, bias)
    panel_bytes, scale_offset, min_offset, padded_out = \
        _LAYOUTS[(fmt, D, out_features)].kernel_offsets
    out = x.new_empty(x.shape[:-1] + (out_features,))
    if rows == 1:
        stride_t, stride_k = 0, x.stride(-1)
    else:
        if x.dim() != 2:
            x = x.reshape(rows, D)
        stride_t, stride_k = x.stride()
    kernel = _KERNELS.get((fmt, x.dtype, rows))
    if kernel is None:
        kernel = _KERNELS[(fmt, x.dtype, rows)] = _kernel(PackedLinearSpec(x.dtype, fmt, rows))
    status = kernel(
        x.data_ptr(), stride_t, stride_k, D, k, n, m, rescale, quant,
        packed.data_ptr(), panel_bytes, scale_offset, min_offset,
        out_features, padded_out, None if bias is None else bias.data_ptr(),
        out.data_ptr(), out_features,
        decode_threads() if num_threads is None else num_threads,
    )  # fmt: skip
    if status < 0:
        raise MemoryError(f"{_OP}: could not allocate scratch buffers for D={D}, "
                          f"N={out_features}")
    return out


# --- the op --------------------------------------------------------------------------------

_LIB = torch.library.Library("qsparse", "FRAGMENT")  # kept alive: dropping it unregisters
_PUBLISHED: set[tuple] = set()


def _publish(x: torch.Tensor, fmt: str, out_features: int, max_sparse_rows: int) -> None:
    """Hand what the call validated and compiled to the native kernel (:mod:`.native_dispatch`):
    the entry point for its rows, the weight layout and the thread count."""
    D = x.shape[-1]
    rows = x.numel() // D if D else 0
    if not 0 < rows <= max_sparse_rows:
        return
    # the thread count on every call (the native kernel holds only the last one published)
    publish_threads(torch.get_num_threads(), decode_threads())
    key = (fmt, x.dtype, rows, D, out_features)
    if key in _PUBLISHED:
        return
    layout = _LAYOUTS[(fmt, D, out_features)]
    publish_kernel("cpu_packed_linear", fmt, x.dtype, rows, _KERNELS[(fmt, x.dtype, rows)])
    publish_layout(fmt, D, out_features, *layout.kernel_offsets, layout.nbytes)
    _PUBLISHED.add(key)


def _cpu_impl(x, k, n, m, rescale, quant, format, out_features, packed, bias,  # noqa: A002
              max_sparse_rows):
    check_no_grad(_OP, x, bias)
    y = packed_linear(x, k, n, m, rescale, quant, format, out_features, packed, bias,
                      max_sparse_rows)
    _publish(x, format, out_features, max_sparse_rows)
    return y


def _fake(x, k, n, m, rescale, quant, format, out_features, packed, bias,  # noqa: A002
          max_sparse_rows):
    _check(x, k, n, m, format, out_features, packed, bias, max_sparse_rows)
    return x.new_empty((*x.shape[:-1], out_features))


define_with_native_kernel(_LIB, SCHEMA, _cpu_impl, _fake)


#: ``torch.ops.qsparse.cpu_packed_linear`` (see the module doc).
cpu_packed_linear = torch.ops.qsparse.cpu_packed_linear
