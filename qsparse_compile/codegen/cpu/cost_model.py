"""A measured cost model: should a projection group run the fused sparse decode op on this CPU?

Nothing here is a guess about hardware. For a projection shape (``in_features`` K,
``out_features`` N, ``tokens``, ``dtype``) at the current thread count, :func:`calibrate` times
the fused decode op ``qsparse::cpu_topk_linear`` (selection inside the sparse GEMV, dense
activations in)

* through its fallback (the generic ``topk_sparsify`` op, then a dense ``addmm``: the
  alternative is not a bare dense product, since the model must be sparsified either way), and
* fused, at two fractions of weight rows read (the sparse side includes the selection),

each with cold caches (a buffer four times the size of the last-level cache is read before every
timed call, because in a real decode step the other layers' weights have evicted this one's),
interleaved so that noise from other processes hits all three alike; each path keeps the fastest
of a few repeats, because on a shared machine noise only ever adds time (a neighbour on one of
two cores stalls every barrier for a scheduler slice) and a median of five is ruined by three
such samples, which happened in practice.
The sparse time is then modelled as ``a + b * rows_read`` (a fixed cost for the gather and the
thread team plus a streaming cost proportional to the weight bytes read), which is what the
kernel does, and :func:`choose_sparse` compares it with the dense time.

Only 1..8 rows are measured (more always fall back).

A weight format (``fmt``: ``"int8"``, ``"int4"``, ``"ternary"``) times the packed kernel
``qsparse::cpu_packed_linear`` instead, against the same fallback (the generic sparsify and a
dense ``addmm`` with the dequantised weights held in the activation's dtype: what the group
costs when the packed kernel does not take it).

A projection the model leaves dense (the output head by default, DESIGN.md point 8) has a
different alternative: a bare dense product. ``dense=True`` (:func:`choose_dense`) times the
fused kernel keeping every feature (``k = D``: no selection, K-major weight rows streamed
once) against ``torch.mm`` of the activation with the ``[out, in]`` weight transposed, which is
what the graph computes otherwise. On the 2-core EPYC this project measures on, SmolLM2's
tied 576 -> 49152 head took 8-10 ms through ``torch.mm`` and 2.5-4.4 ms through the kernel.

Calibrations are cached in memory and on disk (``<cache>/cpu/cost_model/*.json``, keyed by shape,
dtype, tokens, threads, host CPU, torch version and kernel source), so each shape is measured once
per machine; one calibration costs a few dozen kernel calls (0.1–1 s for 7B-model shapes on 2
cores). One measured while other processes kept half a CPU or more busy
(:class:`~.machine.LoadProbe`) is used by this process only and not written to disk: on a
2-core machine busy with a build, every fused call timed 4-8 ms instead of 30-100 us, and that
calibration, stored, would have left every group of every later process on the slow path.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from . import topk_linear_op
from .compiler import cache_dir, host_fingerprint
from .machine import CacheFlusher, LoadProbe
from .packed_linear_op import prepare_packed_weight
from .packed_linear_template import PackedLinearSpec
from .packed_linear_template import render as render_packed_linear
from .topk_linear_template import MAX_ROWS, SUPPORTED_DTYPES
from .topk_linear_template import render as render_topk_linear

__all__ = [
    "Calibration",
    "calibrate",
    "choose_dense",
    "choose_sparse",
    "clear_cache",
    "rows_read_fraction",
]

#: Fractions of weight rows read at which the sparse kernel is timed; the line through the two
#: points models every other fraction. Far enough apart that noise barely moves the slope.
CALIBRATION_DENSITIES = (0.25, 0.75)
#: The same for a dense projection: the kernel keeping all features is the point that matters.
DENSE_DENSITIES = (0.5, 1.0)

_memory_cache: dict[str, Calibration] = {}


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Timings (milliseconds, fastest of the repeats) of one projection shape on this machine.

    Attributes:
        in_features, out_features, tokens, dtype, threads: what was measured (``dtype`` as its
            name, e.g. ``"float32"``).
        dense_ms: the op's fallback (generic sparsify + dense ``addmm``), or for a dense
            projection (``fallback == "mm"``) the bare ``torch.mm``.
        sparse_ms: the fused kernel at each fraction in ``densities`` of weight rows read.
        densities: the fractions of rows read that ``sparse_ms`` belongs to.
        kernel: the kernel timed (``"topk_linear"``, or ``"packed_linear_<format>"``).
        fallback: what ``dense_ms`` timed: ``"sparsify_addmm"`` or ``"mm"``.
    """

    in_features: int
    out_features: int
    tokens: int
    dtype: str
    threads: int
    dense_ms: float
    sparse_ms: tuple[float, ...]
    densities: tuple[float, ...] = CALIBRATION_DENSITIES
    kernel: str = "topk_linear"
    fallback: str = "sparsify_addmm"

    def predict_sparse_ms(self, rows_read: float) -> float:
        """The sparse kernel's time when it reads the fraction ``rows_read`` of weight rows."""
        (d0, d1), (t0, t1) = self.densities, self.sparse_ms
        slope = (t1 - t0) / (d1 - d0)
        return max(t0 + slope * (rows_read - d0), 1e-6)

    def speedup(self, rows_read: float) -> float:
        """Predicted dense time over sparse time (above 1: the sparse kernel is faster)."""
        return self.dense_ms / self.predict_sparse_ms(rows_read)


def rows_read_fraction(density: float, tokens: int) -> float:
    """Fraction of weight rows the kernel reads when each token keeps ``density`` of features.

    Rows are read under the union of the tokens' masks (at most ``MAX_ROWS`` per call); masks
    are assumed independent, which is the worst case (top-K masks of neighbouring tokens
    overlap more than chance, so real unions are smaller).
    """
    return 1.0 - (1.0 - density) ** min(tokens, MAX_ROWS)


def _check_args(in_features: int, out_features: int, tokens: int, dtype: torch.dtype) -> None:
    for label, value in (("in_features", in_features), ("out_features", out_features),
                         ("tokens", tokens)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"cost model: {label} must be a positive int, got {value!r}")
    if dtype not in SUPPORTED_DTYPES:
        allowed = ", ".join(str(d) for d in SUPPORTED_DTYPES)
        raise TypeError(f"cost model: dtype {dtype} is not supported; allowed: {allowed}")
    if tokens > MAX_ROWS:
        raise ValueError(f"cost model: the fused decode op takes at most {MAX_ROWS} rows per "
                         f"call (more always fall back), got tokens={tokens}")


def _kernel_name(fmt: str | None) -> str:
    return "topk_linear" if fmt is None else f"packed_linear_{fmt}"


@functools.cache
def _key(in_features: int, out_features: int, tokens: int, dtype: torch.dtype,
         threads: int, fmt: str | None = None, dense: bool = False) -> str:
    # the kernel's source is part of the key: retuning the kernel invalidates old timings
    if fmt is None:
        source = render_topk_linear(topk_linear_op.default_spec(dtype, tokens))
    else:
        source = render_packed_linear(PackedLinearSpec(dtype, fmt, tokens))
    digest = hashlib.sha256(
        "\0".join([source, host_fingerprint(), torch.__version__]).encode()
    ).hexdigest()[:12]
    name = str(dtype).removeprefix("torch.")
    vs = "_vs_mm" if dense else ""
    return (f"{_kernel_name(fmt)}{vs}_k{in_features}_n{out_features}_t{tokens}_{name}"
            f"_th{threads}_{digest}")


def _measure(
    in_features: int, out_features: int, tokens: int, dtype: torch.dtype,
    repeats: int, budget_s: float, fmt: str | None = None, dense: bool = False,
) -> Calibration:  # fmt: skip
    """Time the fused kernel (two densities) and the fallback (sparsify + dense addmm; with
    ``dense``, the kernel at half and all of the features against a bare ``torch.mm``)."""
    K, N = in_features, out_features
    # values do not change the time of either path (no denormals, no zero tests on weights),
    # so constant fills stand in for real weights; writing them also commits the pages
    weight_t = torch.full((K, N), 0.01, dtype=dtype)
    generator = torch.Generator().manual_seed(0)
    op = torch.ops.qsparse.cpu_topk_linear.default
    if fmt is not None:
        packed = prepare_packed_weight([weight_t.t().float()], fmt)
        packed_op = torch.ops.qsparse.cpu_packed_linear.default

        def fused(x, k, rows):
            if rows == 0:  # the fallback: sparsify, then dense addmm in the activation dtype
                return op(x, k, 0, 0, False, weight_t, None, 0)
            return packed_op(x, k, 0, 0, False, False, fmt, N, packed, None, rows)
    elif dense:
        weight = weight_t.t().contiguous()  # [out, in], as the model holds it

        def fused(x, k, rows):
            if rows == 0:  # what the graph computes without the kernel
                return torch.mm(x, weight.t())
            return op(x, k, 0, 0, False, weight_t, None, rows)
    else:
        def fused(x, k, rows):
            return op(x, k, 0, 0, False, weight_t, None, rows)

    def activations() -> torch.Tensor:
        # identical rows (fresh values every call): the union of their top-K masks is exactly
        # k features, so the fraction of weight rows read is the density asked for
        row = torch.randn(K, generator=generator).to(dtype)
        return row.expand(tokens, K).contiguous()

    densities = DENSE_DENSITIES if dense else CALIBRATION_DENSITIES
    ks = [max(1, round(d * K)) for d in densities]
    flush = CacheFlusher()

    timed = flush.time_ms

    with torch.no_grad():
        fused(activations(), ks[0], MAX_ROWS)  # build, fault pages
        fused(activations(), ks[0], 0)
        fallback: list[float] = []
        sparse: list[list[float]] = [[] for _ in ks]
        deadline = time.perf_counter() + budget_s
        for i in range(repeats):
            x = activations()
            fallback.append(timed(lambda x=x: fused(x, max(1, K // 2), 0)))
            for k, samples in zip(ks, sparse, strict=True):
                x = activations()
                samples.append(timed(lambda x=x, k=k: fused(x, k, MAX_ROWS)))
            if i >= 2 and time.perf_counter() > deadline:
                break
    return Calibration(
        in_features=K, out_features=N, tokens=tokens, dtype=str(dtype).removeprefix("torch."),
        threads=torch.get_num_threads(), dense_ms=min(fallback),
        sparse_ms=tuple(min(s) for s in sparse),
        densities=tuple(k / K for k in ks), kernel=_kernel_name(fmt),
        fallback="mm" if dense else "sparsify_addmm",
    )


def _disk_path(key: str) -> Path:
    return cache_dir() / "cost_model" / f"{key}.json"


def _read_disk(key: str) -> Calibration | None:
    try:
        data = json.loads(_disk_path(key).read_text())
        data["sparse_ms"] = tuple(data["sparse_ms"])
        data["densities"] = tuple(data["densities"])
        return Calibration(**data)
    except (OSError, ValueError, TypeError, KeyError):
        return None  # absent or from an incompatible version: measure again


def _write_disk(key: str, calibration: Calibration) -> None:
    path = _disk_path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(dataclasses.asdict(calibration), f, indent=1)
        os.replace(tmp, path)  # atomic: concurrent calibrations of one shape cannot interleave
    except OSError:
        pass  # a read-only cache only costs a re-measurement next time


def calibrate(
    in_features: int,
    out_features: int,
    tokens: int,
    dtype: torch.dtype,
    *,
    repeats: int = 5,
    budget_s: float = 0.5,
    use_cache: bool = True,
    fmt: str | None = None,
    dense: bool = False,
) -> Calibration:
    """Measure (or fetch the cached measurement of) fused vs fallback for one group shape.

    Args:
        in_features: K, the length of the activation row (rows of ``W^T``).
        out_features: N, the length of the output row.
        tokens: rows of the activation per call (1 for single-sequence decode; at most 8).
        dtype: ``torch.float32`` or ``torch.bfloat16`` (the fallback runs in it too).
        repeats: interleaved repetitions; the fastest of each path is kept.
        budget_s: stop repeating (after at least 3) once this much time is spent.
        use_cache: look up and store the result in memory and on disk.
        fmt: a packed weight format: time ``cpu_packed_linear`` over it (None: fp32/bf16
            weights, ``cpu_topk_linear``).
        dense: a projection the model leaves dense: time the kernel against a bare
            ``torch.mm`` (fp32/bf16 weights only).
    """
    _check_args(in_features, out_features, tokens, dtype)
    if dense and fmt is not None:
        raise ValueError(f"cost model: dense=True times fp32/bf16 weights, got fmt={fmt!r}")
    key = _key(in_features, out_features, tokens, dtype, torch.get_num_threads(), fmt, dense)
    if use_cache:
        found = _memory_cache.get(key) or _read_disk(key)
        if found is not None:
            _memory_cache[key] = found
            return found
    probe = LoadProbe()
    result = _measure(in_features, out_features, tokens, dtype, max(1, repeats), budget_s, fmt,
                      dense)
    if use_cache:
        _memory_cache[key] = result
        if probe.quiet():  # a busy machine's timings decide for this process only
            _write_disk(key, result)
    return result


def choose_sparse(
    in_features: int,
    out_features: int,
    tokens: int,
    dtype: torch.dtype,
    density: float,
    *,
    min_speedup: float = 1.05,
    fmt: str | None = None,
) -> bool:
    """Whether the fused decode op beats its fallback for this projection group here.

    Args:
        in_features: K of the projection (``weight.shape[1]``).
        out_features: N of the projection (``weight.shape[0]``).
        tokens: rows of the activation per call (decode: the batch size).
        dtype: ``torch.float32`` or ``torch.bfloat16``.
        density: fraction of each token's features kept, ``1 - sparsity``, in ``[0, 1]``.
        min_speedup: predicted speed-up required to choose the fused kernel; the default
            demands a 5% margin so measurement noise does not flip a tie to the sparse path.
        fmt: the packed weight format of the group, or None (see :func:`calibrate`).

    Returns:
        ``True`` to run the fused path of ``qsparse::cpu_topk_linear``, ``False`` to take the
        fallback; never ``True`` for more than 8 rows. The first call for a shape measures it
        (see :func:`calibrate`); later calls are a dictionary look-up.
    """
    if (
        isinstance(density, bool)
        or not isinstance(density, (int, float))
        or not (0.0 <= density <= 1.0)
    ):
        raise ValueError(
            f"choose_sparse: density must be a number in [0, 1] (fraction of features kept, "
            f"1 - sparsity), got {density!r}"
        )
    if tokens > MAX_ROWS:
        return False
    calibration = calibrate(in_features, out_features, tokens, dtype, fmt=fmt)
    return calibration.speedup(rows_read_fraction(float(density), tokens)) >= min_speedup


def choose_dense(
    in_features: int,
    out_features: int,
    tokens: int,
    dtype: torch.dtype,
    *,
    min_speedup: float = 1.05,
) -> bool:
    """Whether the fused kernel keeping every feature (``k = D``) beats ``torch.mm`` for a
    projection the model leaves dense (the output head), measured here (see
    :func:`calibrate` with ``dense=True``); never ``True`` for more than 8 rows."""
    if tokens > MAX_ROWS:
        return False
    calibration = calibrate(in_features, out_features, tokens, dtype, dense=True)
    return calibration.speedup(1.0) >= min_speedup


def clear_cache(disk: bool = False) -> None:
    """Forget calibrations held in memory (and, with ``disk=True``, those on disk)."""
    _memory_cache.clear()
    if disk:
        for path in (cache_dir() / "cost_model").glob("*.json"):
            path.unlink(missing_ok=True)
