"""What the benchmark scripts say about the machine they ran on, and how busy it was.

Shared by the scripts in this folder (a leading underscore keeps it out of ``qsparse bench``).
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch


def cpu_model() -> str:
    """The CPU's name, its widest vector extension and the logical CPU count."""
    name, flags = platform.machine(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name == platform.machine():
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line
    except OSError:
        pass
    vector = "AVX-512" if " avx512f" in flags else "AVX2" if " avx2" in flags else "no AVX2"
    return f"{name} ({vector}, {os.cpu_count()} logical CPUs)"


def _sample() -> tuple[int, int, int]:
    """(busy, total) clock ticks of all CPUs since boot, and this process's own ticks."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    stat = Path("/proc/self/stat").read_text()
    own = stat[stat.rindex(")") + 2:].split()
    return sum(fields) - idle, sum(fields), int(own[11]) + int(own[12])  # utime + stime


def others_busy_cpus(window_s: float = 0.1) -> float:
    """How many CPUs other processes kept busy during a short window (0 when unknown)."""
    try:
        busy0, total0, own0 = _sample()
        time.sleep(window_s)
        busy1, total1, own1 = _sample()
    except (OSError, ValueError, IndexError):
        return 0.0
    cpus = os.cpu_count() or 1
    return cpus * max(0, (busy1 - busy0) - (own1 - own0)) / max(1, total1 - total0)


def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """The machine's read bandwidth, bytes/s: ``torch.sum`` over ``gib`` GiB of fp32 ones on
    the current threads, the fastest of ``repeats`` (the roofline of a memory-bound step)."""
    x = torch.ones(int(gib * 2**30) // 4)
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            x.sum()
            best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best
