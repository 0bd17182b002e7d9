"""A measured cost model: should a projection run the sparse GEMV or stay dense on this CPU?

Nothing here is a guess about hardware. For a projection shape (``in_features`` K,
``out_features`` N, ``tokens``, ``dtype``) at the current thread count, :func:`calibrate` times

* dense ``F.linear`` (weight ``[N, K]``), and
* the sparse kernel at two fractions of weight rows read (25% and 75%),

each with cold caches (a buffer four times the size of the last-level cache is read before every
timed call, because in a real decode step the other layers' weights have evicted this one's),
interleaved so that noise from other processes hits all three alike; each path keeps the fastest
of a few repeats, because on a shared machine noise only ever adds time (a neighbour on one of
two cores stalls every barrier for a scheduler slice) and a median of five is ruined by three
such samples, which happened in practice.
The sparse time is then modelled as ``a + b * rows_read`` (a fixed cost for the gather and the
thread team plus a streaming cost proportional to the weight bytes read), which is what the
kernel does, and :func:`choose_sparse` compares it with the dense time.

``kernel="topk_linear"`` asks the same question of the fused decode op
``qsparse::cpu_topk_linear`` (selection inside the sparse GEMV, dense activations in). Its
alternative is not a bare dense product: the model must still be sparsified, so the dense side
is the op's own fallback (the generic ``topk_sparsify`` op, then a dense ``addmm``), and the
sparse side includes the selection. Only 1..8 rows are measured (more always fall back).

Calibrations are cached in memory and on disk (``<cache>/cpu/cost_model/*.json``, keyed by shape,
dtype, tokens, threads, host CPU, torch version and kernel source), so each shape is measured once
per machine; one calibration costs a few dozen kernel calls (0.1–1 s for 7B-model shapes on 2
cores).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from . import topk_linear_op
from .compiler import cache_dir, host_fingerprint
from .sparse_gemv_op import MAX_TOKENS, default_spec
from .sparse_gemv_template import SUPPORTED_DTYPES, render
from .topk_linear_template import MAX_ROWS
from .topk_linear_template import render as render_topk_linear

__all__ = [
    "CacheFlusher",
    "Calibration",
    "calibrate",
    "choose_sparse",
    "clear_cache",
    "rows_read_fraction",
]

#: Fractions of weight rows read at which the sparse kernel is timed; the line through the two
#: points models every other fraction. Far enough apart that noise barely moves the slope.
CALIBRATION_DENSITIES = (0.25, 0.75)

#: The kernels the model can be asked about: the sparse GEMV on an already-sparse input
#: (``qsparse::cpu_sparse_gemv``) or the fused selection + GEMV (``qsparse::cpu_topk_linear``).
KERNELS = ("sparse_gemv", "topk_linear")

_memory_cache: dict[str, Calibration] = {}


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Timings (milliseconds, fastest of the repeats) of one projection shape on this machine.

    Attributes:
        in_features, out_features, tokens, dtype, threads: what was measured (``dtype`` as its
            name, e.g. ``"float32"``).
        dense_ms: dense ``F.linear`` (``kernel="topk_linear"``: the op's fallback, generic
            sparsify + dense ``addmm``).
        sparse_ms: the sparse kernel at each fraction in ``densities`` of weight rows read.
        densities: the fractions of rows read that ``sparse_ms`` belongs to.
        kernel: which kernel ``sparse_ms`` timed, one of ``KERNELS``.
    """

    in_features: int
    out_features: int
    tokens: int
    dtype: str
    threads: int
    dense_ms: float
    sparse_ms: tuple[float, ...]
    densities: tuple[float, ...] = CALIBRATION_DENSITIES
    kernel: str = "sparse_gemv"

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

    Rows are read under the union of the tokens' masks, processed in chunks of up to
    ``MAX_TOKENS`` tokens; masks are assumed independent, which is the worst case (top-K masks
    of neighbouring tokens overlap more than chance, so real unions are smaller).
    """
    return 1.0 - (1.0 - density) ** min(tokens, MAX_TOKENS)


def _check_args(in_features: int, out_features: int, tokens: int, dtype: torch.dtype,
                kernel: str = "sparse_gemv") -> None:
    for label, value in (("in_features", in_features), ("out_features", out_features),
                         ("tokens", tokens)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"cost model: {label} must be a positive int, got {value!r}")
    if dtype not in SUPPORTED_DTYPES:
        allowed = ", ".join(str(d) for d in SUPPORTED_DTYPES)
        raise TypeError(f"cost model: dtype {dtype} is not supported; allowed: {allowed}")
    if kernel not in KERNELS:
        raise ValueError(f"cost model: kernel must be one of {', '.join(map(repr, KERNELS))}, "
                         f"got {kernel!r}")
    if kernel == "topk_linear" and tokens > MAX_ROWS:
        raise ValueError(f"cost model: kernel 'topk_linear' takes at most {MAX_ROWS} rows per "
                         f"call (more always fall back), got tokens={tokens}")


def _key(in_features: int, out_features: int, tokens: int, dtype: torch.dtype,
         kernel: str = "sparse_gemv") -> str:
    return _key_for_threads(in_features, out_features, tokens, dtype, torch.get_num_threads(),
                            kernel)


@functools.cache
def _key_for_threads(
    in_features: int, out_features: int, tokens: int, dtype: torch.dtype, threads: int,
    kernel: str = "sparse_gemv",
) -> str:
    # the kernel's source is part of the key: retuning the kernel invalidates old timings
    if kernel == "topk_linear":
        source = render_topk_linear(topk_linear_op.default_spec(dtype, tokens))
        prefix = "topk_linear_"
    else:
        source = render(default_spec(dtype, min(tokens, MAX_TOKENS)))
        prefix = ""
    digest = hashlib.sha256(
        "\0".join([source, host_fingerprint(), torch.__version__]).encode()
    ).hexdigest()[:12]
    name = str(dtype).removeprefix("torch.")
    return f"{prefix}k{in_features}_n{out_features}_t{tokens}_{name}_th{threads}_{digest}"


@functools.lru_cache(maxsize=1)
def _last_level_cache_bytes() -> int:
    """Size of the largest CPU cache (from sysfs); 32 MiB where it cannot be read."""
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = entry.read_text().strip()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes, default=32 << 20)


class CacheFlusher:
    """Evicts the CPU caches by reading a buffer four times the size of the last-level cache.

    Reading costs half of rewriting and leaves no dirty lines whose write-back would be billed
    to the next timed call. Measured on an EPYC (32 MiB L3): after reading 2x the L3, a weight
    matrix read just before still partly hit in L3 (adaptive replacement protects reused
    lines); 4x evicts it as thoroughly as rewriting does.
    """

    def __init__(self, multiple: int = 4) -> None:
        self._buffer = torch.ones(multiple * _last_level_cache_bytes() // 4, dtype=torch.float32)

    def __call__(self) -> float:
        """Stream through the buffer; returns its sum so the read cannot be optimised away."""
        return float(self._buffer.sum())

    def time_ms(self, fn: Callable[[], object]) -> float:
        """Milliseconds one call of ``fn`` takes right after the caches were evicted."""
        self()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3


def _measure_topk_linear(
    in_features: int, out_features: int, tokens: int, dtype: torch.dtype,
    repeats: int, budget_s: float,
) -> Calibration:  # fmt: skip
    """Time ``qsparse::cpu_topk_linear`` fused (two densities) and through its fallback."""
    K, N = in_features, out_features
    weight_t = torch.full((K, N), 0.01, dtype=dtype)  # constant values: see _measure
    generator = torch.Generator().manual_seed(0)
    op = torch.ops.qsparse.cpu_topk_linear.default

    def activations() -> torch.Tensor:
        # identical rows (fresh values every call): the union of their top-K masks is exactly
        # k features, so the fraction of weight rows read is the density asked for
        row = torch.randn(K, generator=generator).to(dtype)
        return row.expand(tokens, K).contiguous()

    ks = [max(1, round(d * K)) for d in CALIBRATION_DENSITIES]
    flush = CacheFlusher()

    timed = flush.time_ms

    with torch.no_grad():
        op(activations(), ks[0], 0, 0, False, weight_t, None, MAX_ROWS)  # build, fault pages
        op(activations(), ks[0], 0, 0, False, weight_t, None, 0)
        fallback: list[float] = []
        sparse: list[list[float]] = [[] for _ in ks]
        deadline = time.perf_counter() + budget_s
        for i in range(repeats):
            x = activations()
            fallback.append(timed(lambda x=x: op(x, max(1, K // 2), 0, 0, False, weight_t,
                                                  None, 0)))
            for k, samples in zip(ks, sparse, strict=True):
                x = activations()
                samples.append(timed(lambda x=x, k=k: op(x, k, 0, 0, False, weight_t, None,
                                                          MAX_ROWS)))
            if i >= 2 and time.perf_counter() > deadline:
                break
    return Calibration(
        in_features=K, out_features=N, tokens=tokens, dtype=str(dtype).removeprefix("torch."),
        threads=torch.get_num_threads(), dense_ms=min(fallback),
        sparse_ms=tuple(min(s) for s in sparse),
        densities=tuple(k / K for k in ks), kernel="topk_linear",
    )


def _measure(
    in_features: int, out_features: int, tokens: int, dtype: torch.dtype,
    repeats: int, budget_s: float,
) -> Calibration:  # fmt: skip
    K, N = in_features, out_features
    # Values do not change the time of either path (no denormals, no zero tests on weights),
    # so constant fills stand in for real weights; writing them also commits the pages.
    weight = torch.full((N, K), 0.01, dtype=dtype)
    weight_t = weight.view(K, N)  # same bytes: with constant values W^T needs no copy
    chunk = min(tokens, MAX_TOKENS)
    generator = torch.Generator().manual_seed(0)

    def activations(density: float) -> torch.Tensor:
        # fresh rows every call: a repeated row set could be served from a half-flushed cache
        rows = torch.randperm(K, generator=generator)[: max(1, round(density * K))]
        x = torch.zeros(chunk, K, dtype=dtype)
        x[:, rows] = 0.5  # every token nonzero on the same rows: the union is exactly `rows`
        return x

    x_dense = torch.full((tokens, K), 0.5, dtype=dtype)
    chunks = math.ceil(tokens / MAX_TOKENS)
    flush = CacheFlusher()

    timed = flush.time_ms

    # timed through the dispatcher, as a model calls it: the op's Python layers cost ~30 us
    # warm and ~0.1-0.2 ms with cold caches, which decides small projections for dense
    op = torch.ops.qsparse.cpu_sparse_gemv
    # warm-up: builds the kernel and faults in every page once
    op(activations(1.0), weight_t, None)
    F.linear(x_dense, weight)
    dense: list[float] = []
    sparse: list[list[float]] = [[] for _ in CALIBRATION_DENSITIES]
    deadline = time.perf_counter() + budget_s
    for i in range(repeats):
        dense.append(timed(lambda: F.linear(x_dense, weight)))
        for density, samples in zip(CALIBRATION_DENSITIES, sparse, strict=True):
            x = activations(density)
            # tokens beyond one chunk are processed chunk after chunk: time one, scale
            samples.append(chunks * timed(lambda x=x: op(x, weight_t, None)))
        if i >= 2 and time.perf_counter() > deadline:
            break
    return Calibration(
        in_features=K,
        out_features=N,
        tokens=tokens,
        dtype=str(dtype).removeprefix("torch."),
        threads=torch.get_num_threads(),
        dense_ms=min(dense),
        sparse_ms=tuple(min(s) for s in sparse),
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
    kernel: str = "sparse_gemv",
) -> Calibration:
    """Measure (or fetch the cached measurement of) dense vs sparse for one projection shape.

    Args:
        in_features: K, the length of the activation row (rows of ``W^T``).
        out_features: N, the length of the output row.
        tokens: rows of the activation per call (1 for single-sequence decode).
        dtype: ``torch.float32`` or ``torch.bfloat16`` (the dense baseline runs in it too).
        repeats: interleaved repetitions; the fastest of each path is kept.
        budget_s: stop repeating (after at least 3) once this much time is spent.
        use_cache: look up and store the result in memory and on disk.
        kernel: ``"sparse_gemv"`` (sparse GEMV vs ``F.linear``) or ``"topk_linear"`` (the
            fused selection + GEMV vs its fallback; ``tokens`` at most 8).
    """
    _check_args(in_features, out_features, tokens, dtype, kernel)
    key = _key(in_features, out_features, tokens, dtype, kernel)
    if use_cache:
        found = _memory_cache.get(key) or _read_disk(key)
        if found is not None:
            _memory_cache[key] = found
            return found
    measure = _measure_topk_linear if kernel == "topk_linear" else _measure
    result = measure(in_features, out_features, tokens, dtype, max(1, repeats), budget_s)
    if use_cache:
        _memory_cache[key] = result
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
    kernel: str = "sparse_gemv",
) -> bool:
    """Whether the sparse GEMV beats dense ``F.linear`` for this projection on this machine.

    Args:
        in_features: K of the projection (``weight.shape[1]``).
        out_features: N of the projection (``weight.shape[0]``).
        tokens: rows of the activation per call (decode: the batch size).
        dtype: ``torch.float32`` or ``torch.bfloat16``.
        density: fraction of each token's features kept, ``1 - sparsity``, in ``[0, 1]``.
        min_speedup: predicted speed-up required to choose the sparse kernel; the default
            demands a 5% margin so measurement noise does not flip a tie to the sparse path.
        kernel: ``"sparse_gemv"`` or ``"topk_linear"`` (see :func:`calibrate`); the fused
            kernel is never chosen for more than 8 rows.

    Returns:
        ``True`` to run the sparse kernel (``qsparse::cpu_sparse_gemv``, or the fused path of
        ``qsparse::cpu_topk_linear``), ``False`` to stay dense (to take the fallback). The
        first call for a shape measures it (see :func:`calibrate`); later calls are a
        dictionary look-up.
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
    if kernel == "topk_linear" and tokens > MAX_ROWS:
        return False
    calibration = calibrate(in_features, out_features, tokens, dtype, kernel=kernel)
    return calibration.speedup(rows_read_fraction(float(density), tokens)) >= min_speedup


def clear_cache(disk: bool = False) -> None:
    """Forget calibrations held in memory (and, with ``disk=True``, those on disk)."""
    _memory_cache.clear()
    if disk:
        for path in (cache_dir() / "cost_model").glob("*.json"):
            path.unlink(missing_ok=True)
