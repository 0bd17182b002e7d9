"""Decode-time activation-sparse GEMV on the CPU: ``qsparse::cpu_sparse_gemv``.

``y = x @ weight_t + bias`` where ``weight_t = W^T`` is stored K-major (``[in_features,
out_features]``, prepared once with :func:`prepare_weight`) and ``x`` is a top-K-sparsified
activation. A feature that is zero in every row of a (≤ 8-row) chunk of ``x`` skips one whole
contiguous row of ``weight_t``, so at sparsity ``s`` a memory-bound decode step reads about
``1 - s`` of the weight bytes.

Numerics: fp32 accumulation for fp32 and bf16; bf16 outputs are rounded once from fp32 (round to
nearest even), as the reference :func:`sparse_gemv_reference` does. The one deliberate difference
from a dense product: a skipped feature contributes nothing even if its weight row holds inf or
NaN (a dense product would give ``0 * inf = NaN``).
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable

import torch

from ..gemv_operands import check_gemv_operands
from .compiler import load_entry_point
from .sparse_gemv_template import MAX_TOKENS, SUPPORTED_DTYPES, GemvSpec, render

__all__ = [
    "MAX_TOKENS",
    "cpu_sparse_gemv",
    "default_spec",
    "prepare_weight",
    "sparse_gemv",
    "sparse_gemv_reference",
]

_OP = "qsparse.cpu_sparse_gemv"


def default_spec(dtype: torch.dtype, tokens: int) -> GemvSpec:
    """The tiling used for ``tokens`` rows of ``dtype``, chosen from measurements on AVX2 CPUs.

    Measured on a 2-core EPYC (32 KiB L1d, 512 KiB L2), cold caches, 4096-11008 features:

    * 8 weight rows per sweep of the accumulator beat 2 and 4 (fewer accumulator loads and
      stores per weight byte) and 16 (more streams than the prefetchers follow well).
    * Wider tiles win: each row of ``W^T`` is then read in one long contiguous run per thread
      (a whole 8-22 KiB slice for one token) instead of many short ones. Up to 8192 floats the
      accumulator still fits L1; with several tokens a 64 KiB accumulator in L2 still beats
      cutting every row into short runs (8 tokens: 3.0 ms with 16384 floats against 8.4 ms
      with 4096, at 4096x4096 fp32).
    * ``acc_skew`` (16 floats between the tokens' accumulator rows) removes 4 KiB aliasing
      between them: 2.5 ms against 4.2 ms at 4 tokens.
    """
    if tokens <= 2:
        return GemvSpec(dtype, tokens, rows_per_pass=8, tile_floats=8192)
    return GemvSpec(dtype, tokens, rows_per_pass=8, tile_floats=16384)


_ARGTYPES = [
    ctypes.c_void_p,  # x
    ctypes.c_int64,  # x_stride_t
    ctypes.c_int64,  # x_stride_k
    ctypes.c_int64,  # K
    ctypes.c_void_p,  # wt
    ctypes.c_int64,  # ldw
    ctypes.c_int64,  # N
    ctypes.c_void_p,  # bias (NULL for none)
    ctypes.c_void_p,  # y
    ctypes.c_int64,  # ldy
    ctypes.c_int64,  # nthreads
]


@functools.cache
def _kernel(spec: GemvSpec) -> Callable[..., int]:
    """The compiled entry point of ``spec`` (built at first use, then from the disk cache)."""
    return load_entry_point(spec.name, render(spec), _ARGTYPES)


#: (dtype, tokens) -> compiled entry point; a plain dict so a call costs one look-up.
_KERNELS: dict[tuple[torch.dtype, int], Callable[..., int]] = {}


def _kernel_for(dtype: torch.dtype, tokens: int) -> Callable[..., int]:
    fn = _KERNELS[(dtype, tokens)] = _kernel(default_spec(dtype, tokens))
    return fn


def _check(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None) -> None:
    check_gemv_operands(_OP, x, weight_t, bias, SUPPORTED_DTYPES, "prepare_weight")


def prepare_weight(weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Lay out a linear layer's weight for the kernel, once: ``W^T`` contiguous, K-major.

    Args:
        weight: ``[out_features, in_features]``, as stored by ``torch.nn.Linear``.
        dtype: element type for the kernel (``torch.float32`` or ``torch.bfloat16``); default
            ``weight.dtype``.

    Returns:
        A detached ``[in_features, out_features]`` contiguous tensor: the row of feature ``k``
        is one contiguous run, which is what a zeroed activation lets the kernel skip.
    """
    dtype = weight.dtype if dtype is None else dtype
    if dtype not in SUPPORTED_DTYPES:
        allowed = ", ".join(str(d) for d in SUPPORTED_DTYPES)
        raise TypeError(f"prepare_weight: dtype {dtype} is not supported; allowed: {allowed}")
    if weight.dim() != 2:
        raise ValueError(
            f"prepare_weight: expected a 2-D weight [out_features, in_features], "
            f"got shape {tuple(weight.shape)}"
        )
    return weight.detach().to(dtype=dtype, device="cpu").t().contiguous()


def sparse_gemv(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    bias: torch.Tensor | None = None,
    num_threads: int | None = None,
) -> torch.Tensor:
    """Run the compiled kernel directly (no dispatcher): ``x @ weight_t + bias``.

    This is the implementation behind ``torch.ops.qsparse.cpu_sparse_gemv``; call the op in
    models (it is traceable and differentiable) and this function only where the few
    microseconds of dispatch matter, as in benchmarks.

    Args:
        x: ``[..., K]`` CPU activations, any strides; rows are processed in chunks of up to
            ``MAX_TOKENS``, and within a chunk a feature is skipped only if it is zero in
            every row.
        weight_t: ``[K, N]`` CPU weights (``W^T``) with contiguous rows (any row stride).
        bias: ``[N]`` or ``None``.
        num_threads: the most threads to use; default ``torch.get_num_threads()``.

    Returns:
        ``[..., N]`` tensor of ``x.dtype``.
    """
    _check(x, weight_t, bias)
    for label, t in (("x", x), ("weight_t", weight_t), ("bias", bias)):
        if t is not None and not t.is_cpu:
            raise ValueError(f"{_OP}: {label} must be on the CPU, got device {t.device}")
    K, N = weight_t.shape
    if N > 1 and weight_t.stride(1) != 1:
        # correct but slow: the kernel streams rows, so it needs them contiguous
        weight_t = weight_t.contiguous()
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    x2 = x if x.dim() == 2 else x.reshape(-1, K)
    M = x2.shape[0]
    out = torch.empty((M, N), dtype=x.dtype)
    if M and N:
        threads = torch.get_num_threads() if num_threads is None else num_threads
        ldw = weight_t.stride(0) if K > 1 else N
        sx_t, sx_k = x2.stride()
        elem = x2.element_size()
        x_ptr, y_ptr, wt_ptr = x2.data_ptr(), out.data_ptr(), weight_t.data_ptr()
        b_ptr = None if bias is None else bias.data_ptr()
        for start in range(0, M, MAX_TOKENS):
            rows = min(MAX_TOKENS, M - start)
            kernel = _KERNELS.get((x.dtype, rows)) or _kernel_for(x.dtype, rows)
            status = kernel(
                x_ptr + start * sx_t * elem, sx_t, sx_k, K,
                wt_ptr, ldw, N, b_ptr,
                y_ptr + start * N * elem, N, threads,
            )  # fmt: skip
            if status < 0:
                raise MemoryError(f"{_OP}: could not allocate index buffers for K={K}")
    return out if x.dim() == 2 else out.reshape(*x.shape[:-1], N)


def sparse_gemv_reference(
    x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """The pure-PyTorch meaning of the op: ``x @ weight_t + bias`` in fp32, then cast."""
    y = x.float() @ weight_t.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


@torch.library.custom_op("qsparse::cpu_sparse_gemv", mutates_args=(), device_types="cpu")
def cpu_sparse_gemv(
    x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``x @ weight_t + bias``, skipping the rows of ``weight_t`` of zeroed activations.

    ``x`` is ``[..., in_features]``, ``weight_t`` is ``W^T`` (``[in_features, out_features]``,
    from :func:`prepare_weight`), ``bias`` is ``[out_features]`` or ``None``; all fp32 or all
    bf16. fp32 accumulation; the result has ``x.dtype``.
    """
    return sparse_gemv(x, weight_t, bias)


@cpu_sparse_gemv.register_fake
def _(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    _check(x, weight_t, bias)
    return x.new_empty((*x.shape[:-1], weight_t.shape[1]))


def _setup_context(ctx, inputs, output) -> None:
    x, weight_t, bias = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight_t)


def _backward(ctx, grad: torch.Tensor):
    x, weight_t = ctx.saved_tensors
    grad_x = grad_w = grad_b = None
    flat = grad.reshape(-1, grad.shape[-1])
    if ctx.needs_input_grad[0]:
        grad_x = grad @ weight_t.t()
    if ctx.needs_input_grad[1]:
        grad_w = x.reshape(-1, x.shape[-1]).t() @ flat
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_b = flat.sum(0)
    return grad_x, grad_w, grad_b


cpu_sparse_gemv.register_autograd(_backward, setup_context=_setup_context)
