"""Facts about the CPU the kernels are timed on: its last-level cache, and evicting it.

The cost model and the thread policy time kernels with cold caches, because in a real decode
step the other layers' weights have evicted this one's; both read the cache size here.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["CacheFlusher", "last_level_cache_bytes"]


@functools.lru_cache(maxsize=1)
def last_level_cache_bytes() -> int:
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
        self._buffer = torch.ones(multiple * last_level_cache_bytes() // 4, dtype=torch.float32)

    def __call__(self) -> float:
        """Stream through the buffer; returns its sum so the read cannot be optimised away."""
        return float(self._buffer.sum())

    def time_ms(self, fn: Callable[[], object]) -> float:
        """Milliseconds one call of ``fn`` takes right after the caches were evicted."""
        self()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
