"""Facts about the CPU the kernels are timed on: its last-level cache, evicting it, and how
busy other processes keep it.

The cost model and the thread policy time kernels with cold caches, because in a real decode
step the other layers' weights have evicted this one's; both read the cache size here. Both
also store what they measured on disk, for every later process on the machine: a measurement
taken while other processes kept the CPUs busy (a build, a test run beside it) would fix a
wrong decision there for good, so they ask :class:`LoadProbe` whether the machine was quiet.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["QUIET_BELOW_CPUS", "CacheFlusher", "LoadProbe", "last_level_cache_bytes"]

#: Other processes' average load (CPUs kept busy) below which a measurement counts as quiet.
QUIET_BELOW_CPUS = 0.5


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


def _ticks() -> tuple[int, int, int]:
    """(busy, total) clock ticks of all CPUs since boot, and this process's own ticks."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    stat = Path("/proc/self/stat").read_text()
    own = stat[stat.rindex(")") + 2:].split()
    return sum(fields) - idle, sum(fields), int(own[11]) + int(own[12])  # utime + stime


class LoadProbe:
    """How many CPUs other processes kept busy since the probe was made (Linux ``/proc``).

    ``others_busy_cpus()`` is the average over the time since construction: all CPUs' busy
    ticks minus this process's own, over the elapsed ticks, times the CPU count; 0.0 where
    ``/proc`` cannot be read (then nothing is known, and nothing is held against a result).
    """

    def __init__(self) -> None:
        try:
            self._start: tuple[int, int, int] | None = _ticks()
        except (OSError, ValueError, IndexError):
            self._start = None

    def others_busy_cpus(self) -> float:
        if self._start is None:
            return 0.0
        try:
            busy1, total1, own1 = _ticks()
        except (OSError, ValueError, IndexError):
            return 0.0
        busy0, total0, own0 = self._start
        cpus = os.cpu_count() or 1
        return cpus * max(0, (busy1 - busy0) - (own1 - own0)) / max(1, total1 - total0)

    def quiet(self) -> bool:
        """Whether other processes kept fewer than :data:`QUIET_BELOW_CPUS` CPUs busy."""
        return self.others_busy_cpus() < QUIET_BELOW_CPUS
