"""Fused decode projection on the CPU: ``qsparse::cpu_topk_linear`` (select + sparse GEMV).

``y = sparsify(x) @ weight_t + bias`` in one C call, where ``sparsify`` is top-K (``m == 0``)
or block ``n:m`` with the optional L2 rescale (DESIGN.md points 1-4), and ``weight_t`` is the
K-major weight ``W^T`` (``[in_features, out_features]``). Projections that read the same input
(q/k/v, gate/up) share one call: their weights are concatenated along the output dimension
once (:func:`prepare_group_weight`) and the caller splits the output with views.

Why one fused op: at decode a projection of a small model (SmolLM2: 576 -> 960) streams about
a megabyte of weights, 50-100 us, while the generic ``topk_sparsify`` op costs ~120 us and every
extra op call through the dispatcher costs 5-20 us. Selecting inside the GEMV's C call makes the
sparsify nearly free and leaves one op call per projection group.

* Rows ``<= max_sparse_rows`` (1..8): the fused kernel, called through ctypes with a minimum of
  Python (a cached entry point, shape checks memoised per signature).
* More rows (prefill), or ``max_sparse_rows == 0``: the generic ``qsparse`` sparsify op, then a
  dense product with ``weight_t`` (the selection no longer saves weight bytes once the union of
  many rows' masks covers almost every feature).

The op is inference-only: it has no backward, and calling it on inputs that require grad with
grad mode on raises. It is defined with a plain ``torch.library.Library`` rather than
``torch.library.custom_op`` because the latter's Python wrapper layers cost ~12 us per call
(measured), which at 120 calls per SmolLM2 token is several percent of the step.

Numerics: selection is exact (same mask as ``qsparse.topk_sparsify``); products accumulate in
fp32 in another order than a dense matmul; bf16 rows are rounded to bf16 after the rescale, as
the reference rounds the sparsified activation. A feature no row
kept is never read, so inf/NaN in its weight row cannot reach ``y`` (a dense product would give
``0 * inf = NaN``).
"""

from __future__ import annotations

import ctypes
import functools
import time
from collections.abc import Callable, Sequence

import torch

from ... import reference
from ..gemv_operands import check_gemv_operands
from .compiler import load_entry_point
from .machine import last_level_cache_bytes
from .native_dispatch import define_with_native_kernel, publish_kernel, publish_threads
from .thread_policy import kernel_threads
from .topk_linear_template import MAX_ROWS, SUPPORTED_DTYPES, TopkLinearSpec, render

__all__ = [
    "MAX_ROWS",
    "check_no_grad",
    "cpu_topk_linear",
    "decode_threads",
    "default_spec",
    "measure_split_gain",
    "prepare_group_weight",
    "topk_linear",
    "topk_linear_reference",
]

_OP = "qsparse.cpu_topk_linear"
SCHEMA = (
    "cpu_topk_linear(Tensor x, int k, int n, int m, bool rescale, Tensor weight_t, "
    "Tensor? bias, int max_sparse_rows) -> Tensor"
)


def default_spec(dtype: torch.dtype, rows: int) -> TopkLinearSpec:
    """The tiling used for ``rows`` activation rows of ``dtype``.

    Measured on a 2-core EPYC (32 KiB L1d), cold caches, SmolLM2-135M shapes (576 x 576 ..
    576 x 3072, 1536 x 576): 8 weight rows per sweep and a 4096-float accumulator tile (16 KiB,
    half of L1, so the weight lines streaming through do not evict it) with software prefetch
    of the next sweep's rows.
    """
    return TopkLinearSpec(dtype, rows)


_ARGTYPES = [
    ctypes.c_void_p,  # x
    ctypes.c_int64,  # x_stride_t
    ctypes.c_int64,  # x_stride_k
    ctypes.c_int64,  # D
    ctypes.c_int64,  # k
    ctypes.c_int64,  # n
    ctypes.c_int64,  # m
    ctypes.c_int64,  # rescale
    ctypes.c_void_p,  # wt
    ctypes.c_int64,  # ldw
    ctypes.c_int64,  # N
    ctypes.c_void_p,  # bias (NULL for none)
    ctypes.c_void_p,  # y
    ctypes.c_int64,  # ldy
    ctypes.c_int64,  # nthreads
]


@functools.cache
def _kernel(spec: TopkLinearSpec) -> Callable[..., int]:
    """The compiled entry point of ``spec`` (built at first use, then from the disk cache)."""
    return load_entry_point(spec.name, render(spec), _ARGTYPES)


#: (dtype, rows) -> compiled entry point; a plain dict so a call costs one look-up.
_KERNELS: dict[tuple[torch.dtype, int], Callable[..., int]] = {}

#: Argument signatures already validated: the checks run once per signature, not per call.
_VALIDATED: set[tuple] = set()

#: [torch.get_num_threads() it was decided for, threads the kernel uses] (see thread_policy).
_THREADS = [0, 1]


def measure_split_gain(threads: int, repeats: int = 5) -> float:
    """Time of the fused kernel on one thread over its time on ``threads`` threads (> 1: the
    split is faster), streaming a weight twice the size of the last-level cache."""
    K = 2048
    N = max(1024, 2 * last_level_cache_bytes() // (4 * K))  # fp32, 2x the LLC
    weight_t = torch.full((K, N), 0.01)
    generator = torch.Generator().manual_seed(0)
    best = {1: float("inf"), threads: float("inf")}
    with torch.no_grad():
        topk_linear(torch.randn(1, K), K // 2, 0, 0, False, weight_t, None, num_threads=1)
        for i in range(repeats):
            order = (1, threads) if i % 2 == 0 else (threads, 1)
            for team in order:
                x = torch.randn(1, K, generator=generator)
                start = time.perf_counter()
                topk_linear(x, K // 2, 0, 0, False, weight_t, None, num_threads=team)
                best[team] = min(best[team], time.perf_counter() - start)
    return best[1] / best[threads]


def decode_threads() -> int:
    """Threads for the CPU decode kernels: measured once per torch thread count
    (:mod:`.thread_policy`)."""
    torch_threads = torch.get_num_threads()
    if torch_threads != _THREADS[0]:
        _THREADS[:] = [torch_threads, kernel_threads(measure_split_gain)]
    return _THREADS[1]


def _kernel_for(dtype: torch.dtype, rows: int) -> Callable[..., int]:
    fn = _KERNELS[(dtype, rows)] = _kernel(default_spec(dtype, rows))
    return fn


def _check(x: torch.Tensor, k: int, n: int, m: int, weight_t: torch.Tensor,
           bias: torch.Tensor | None, max_sparse_rows: int) -> None:
    """Validate everything but the device (the fake implementation runs this on meta tensors)."""
    check_gemv_operands(_OP, x, weight_t, bias, SUPPORTED_DTYPES, "prepare_group_weight")
    D = x.shape[-1]
    if m == 0:
        if not 1 <= k <= D:
            raise ValueError(
                f"{_OP}: k (entries kept per row, m=0 selects top-K) must be in [1, {D}] for "
                f"in_features={D}, got k={k}"
            )
    elif m < 0 or not 1 <= n <= m or D % m:
        raise ValueError(
            f"{_OP}: block n:m must satisfy 1 <= n <= m with m dividing in_features={D} "
            f"(m=0 selects top-K instead), got n={n}, m={m}"
        )
    if not 0 <= max_sparse_rows <= MAX_ROWS:
        raise ValueError(
            f"{_OP}: max_sparse_rows must be in [0, {MAX_ROWS}] (rows handled by the fused "
            f"kernel; 0 always takes the dense fallback), got {max_sparse_rows}"
        )


def check_no_grad(op: str, *tensors: torch.Tensor | None) -> None:
    """Raise unless grad mode is off or no input requires grad: the decode ops have no
    backward."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise RuntimeError(
            f"{op} is inference-only (it has no backward), but an input requires grad with "
            f"grad mode on; run it under torch.no_grad() or torch.inference_mode(), or use "
            f"qsparse.topk_sparsify/block_sparsify + sparse_linear, which train"
        )


def _fallback(x: torch.Tensor, k: int, n: int, m: int, rescale: bool,
              weight_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Many rows: the generic sparsify op, then a dense product (``ste`` is moot: no grad)."""
    ops = torch.ops.qsparse
    if m == 0:
        xs = ops.topk_sparsify(x, k, rescale, True)
    else:
        xs = ops.block_sparsify(x, n, m, rescale, True)
    flat = xs.reshape(-1, xs.shape[-1])
    y = flat @ weight_t if bias is None else torch.addmm(bias, flat, weight_t)
    return y.reshape(*x.shape[:-1], weight_t.shape[1])


def topk_linear(
    x: torch.Tensor,
    k: int,
    n: int,
    m: int,
    rescale: bool,
    weight_t: torch.Tensor,
    bias: torch.Tensor | None = None,
    max_sparse_rows: int = MAX_ROWS,
    num_threads: int | None = None,
) -> torch.Tensor:
    """``sparsify(x) @ weight_t + bias``: the implementation behind the op, callable directly.

    Args:
        x: ``[..., D]`` dense CPU activations (fp32 or bf16), any strides.
        k: entries kept per row for top-K (``m == 0``), ``1 <= k <= D``.
        n, m: block pattern, keep ``n`` of every ``m`` consecutive entries (``m > 0``).
        rescale: multiply each row's kept values by ``||x|| / ||x_kept||``.
        weight_t: ``[D, N]`` CPU weights (``W^T``, e.g. from :func:`prepare_group_weight`),
            rows contiguous (any row stride).
        bias: ``[N]`` or ``None``.
        max_sparse_rows: the most rows (0..8) the fused kernel handles; more take the
            fallback (sparsify op + dense product).
        num_threads: the most threads the kernel uses; default: all of
            ``torch.get_num_threads()`` where splitting the GEMV was measured to pay on this
            machine, else one (:func:`.thread_policy.kernel_threads`).

    Returns:
        ``[..., N]`` tensor of ``x.dtype``.
    """
    D = x.shape[-1]
    rows = x.numel() // D if D else 0
    # everything the checks below depend on; cheap attributes only (``device`` objects cost)
    signature = (x.dtype, D, x.is_cpu, weight_t.dtype, weight_t.shape, weight_t.stride(),
                 weight_t.is_cpu, None if bias is None else (bias.dtype, bias.shape,
                 bias.stride(), bias.is_cpu), k, n, m, max_sparse_rows)  # fmt: skip
    if signature not in _VALIDATED:
        _check(x, k, n, m, weight_t, bias, max_sparse_rows)
        for label, t in (("x", x), ("weight_t", weight_t), ("bias", bias)):
            if t is not None and not t.is_cpu:
                raise ValueError(f"{_OP}: {label} must be on the CPU, got device {t.device}")
        if weight_t.shape[1] > 1 and weight_t.stride(1) != 1:
            raise ValueError(
                f"{_OP}: weight_t rows must be contiguous (stride(1) == 1), got strides "
                f"{weight_t.stride()}; use prepare_group_weight"
            )
        if bias is not None and not bias.is_contiguous():
            raise ValueError(f"{_OP}: bias must be contiguous, got stride {bias.stride()}")
        _VALIDATED.add(signature)
    if not 0 < rows <= max_sparse_rows:
        return _fallback(x, k, n, m, rescale, weight_t, bias)
    N = weight_t.shape[1]
    out = x.new_empty(x.shape[:-1] + (N,))  # cheaper than torch.empty(..., dtype=)
    if N == 0:
        return out
    if rows == 1:
        stride_t, stride_k = 0, x.stride(-1)
    else:
        if x.dim() != 2:
            x = x.reshape(rows, D)  # a view for the layouts decode produces
        stride_t, stride_k = x.stride()
    kernel = _KERNELS.get((x.dtype, rows)) or _kernel_for(x.dtype, rows)
    status = kernel(
        x.data_ptr(), stride_t, stride_k, D, k, n, m, rescale,
        weight_t.data_ptr(), weight_t.stride(0) if D > 1 else N, N,
        None if bias is None else bias.data_ptr(),
        out.data_ptr(), N,
        decode_threads() if num_threads is None else num_threads,
    )  # fmt: skip
    if status < 0:
        raise MemoryError(f"{_OP}: could not allocate scratch buffers for D={D}, N={N}")
    return out


def topk_linear_reference(
    x: torch.Tensor,
    k: int,
    n: int,
    m: int,
    rescale: bool,
    weight_t: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The op's meaning in plain PyTorch: the eager oracle's sparsify, then a product in fp32.

    The sparsified activation is held in ``x.dtype`` (as the model holds it), the product and
    bias are computed in fp32, and the result is cast to ``x.dtype``.
    """
    mode = "l2" if rescale else "none"
    with torch.no_grad():
        if m == 0:
            xs = reference.topk_sparsify(x, k, mode)
        else:
            xs = reference.block_sparsify(x, n, m, mode)
        y = xs.float() @ weight_t.float()
        if bias is not None:
            y = y + bias.float()
    return y.to(x.dtype)


def prepare_group_weight(
    weights: Sequence[torch.Tensor],
    layout: str = "out_in",
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """One K-major weight for projections that read the same input: ``cat([W_i^T], dim=1)``.

    Args:
        weights: the projections' weights, all with the same ``in_features``.
        layout: ``"out_in"`` (``torch.nn.Linear``: ``[out, in]``) or ``"in_out"`` (HF
            ``Conv1D``: ``[in, out]``, already K-major).
        dtype: element type for the kernel; default the first weight's dtype.

    Returns:
        A detached, contiguous ``[in_features, sum(out_features)]`` CPU tensor; the outputs of
        projection ``i`` are its columns ``[offset_i, offset_i + out_i)``, in the given order.
    """
    if layout not in ("out_in", "in_out"):
        raise ValueError(f"prepare_group_weight: layout must be 'out_in' or 'in_out', "
                         f"got {layout!r}")
    if not weights:
        raise ValueError("prepare_group_weight: needs at least one weight, got none")
    dtype = weights[0].dtype if dtype is None else dtype
    if dtype not in SUPPORTED_DTYPES:
        allowed = ", ".join(str(d) for d in SUPPORTED_DTYPES)
        raise TypeError(f"prepare_group_weight: dtype {dtype} is not supported; allowed: "
                        f"{allowed}")
    parts = []
    for i, w in enumerate(weights):
        if w.dim() != 2:
            raise ValueError(f"prepare_group_weight: weight {i} must be 2-D, got shape "
                             f"{tuple(w.shape)}")
        parts.append(w.detach().t() if layout == "out_in" else w.detach())
    widths = {p.shape[0] for p in parts}
    if len(widths) != 1:
        raise ValueError(
            f"prepare_group_weight: the weights must share in_features to be concatenated, "
            f"got {[tuple(w.shape) for w in weights]} (layout {layout!r})"
        )
    return torch.cat([p.to(device="cpu", dtype=dtype) for p in parts], dim=1).contiguous()


# --- the op --------------------------------------------------------------------------------

_LIB = torch.library.Library("qsparse", "FRAGMENT")  # kept alive: dropping it unregisters
_PUBLISHED: set[tuple] = set()


def _publish(x: torch.Tensor, max_sparse_rows: int) -> None:
    """Hand the entry point the call used and the thread count to the native kernel
    (:mod:`.native_dispatch`)."""
    D = x.shape[-1]
    rows = x.numel() // D if D else 0
    key = (x.dtype, rows)
    if not 0 < rows <= max_sparse_rows or key not in _KERNELS:
        return
    # the thread count on every call (the native kernel holds only the last one published)
    publish_threads(torch.get_num_threads(), decode_threads())
    if key in _PUBLISHED:
        return
    publish_kernel("cpu_topk_linear", None, x.dtype, rows, _KERNELS[(x.dtype, rows)])
    _PUBLISHED.add(key)


def _cpu_impl(x: torch.Tensor, k: int, n: int, m: int, rescale: bool, weight_t: torch.Tensor,
              bias: torch.Tensor | None, max_sparse_rows: int) -> torch.Tensor:
    check_no_grad(_OP, x, weight_t, bias)
    y = topk_linear(x, k, n, m, rescale, weight_t, bias, max_sparse_rows)
    _publish(x, max_sparse_rows)
    return y


def _fake(x: torch.Tensor, k: int, n: int, m: int, rescale: bool, weight_t: torch.Tensor,
          bias: torch.Tensor | None, max_sparse_rows: int) -> torch.Tensor:
    _check(x, k, n, m, weight_t, bias, max_sparse_rows)
    return x.new_empty((*x.shape[:-1], weight_t.shape[1]))


define_with_native_kernel(_LIB, SCHEMA, _cpu_impl, _fake)


#: ``torch.ops.qsparse.cpu_topk_linear``: ``sparsify(x) @ weight_t + bias`` (see the module doc).
cpu_topk_linear = torch.ops.qsparse.cpu_topk_linear
