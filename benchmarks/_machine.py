"""What the benchmark scripts say about the machine they ran on, and how busy it was.

Shared by the scripts in this folder (a leading underscore keeps it out of ``qsparse bench``).
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch

from qsparse_compile.codegen.cpu.machine import LoadProbe


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


def others_busy_cpus(window_s: float = 0.1) -> float:
    """How many CPUs other processes kept busy during a short window (0 when unknown)."""
    probe = LoadProbe()
    time.sleep(window_s)
    return probe.others_busy_cpus()


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
