"""Does splitting a memory-bound sparse GEMV over several threads pay on this machine? Measured.

A decode-time projection streams its weight rows from DRAM once. Whether a second thread makes
that faster depends on the machine, not on the kernel: a server core cannot keep enough cache
misses in flight to saturate its memory channels, so more cores read faster; a small VM's
single core may already get all the bandwidth it is given (measured on a 2-vCPU EPYC VM:
19 GB/s with one thread, 17 GB/s with two). Where the split does not pay it only costs: a
parallel region wakes the pool's other thread, and on a shared machine whose other core is busy
every region waits for that thread to be scheduled (a scheduler slice, milliseconds, in the
worst case), a stall a single thread never has.

:func:`kernel_threads` has the fused ``cpu_topk_linear`` kernel timed, single-threaded and with
``torch.get_num_threads()`` threads, on a weight twice the size of the last-level cache (so it
streams from DRAM, as at decode), fastest of a few interleaved repeats each, and returns the
thread count to use: all of them if they are at least ``MIN_GAIN`` times faster, else one. The
answer is cached in memory and on disk (``<cache>/cpu/cost_model/threads_*.json``, keyed by host
CPU, thread count and torch version), so the measurement (~0.1 s) runs once per machine; on disk
only when other processes left the machine quiet meanwhile (:class:`.machine.LoadProbe`).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable

import torch

from .compiler import cache_dir, host_fingerprint
from .machine import LoadProbe

__all__ = ["MIN_GAIN", "kernel_threads"]

#: Speed-up that several threads must show over one for the kernel to use them: below it, the
#: risk of waiting for a descheduled thread on a shared machine outweighs the gain.
MIN_GAIN = 1.25

_THREADS_ENV = "QSPARSE_CPU_THREADS"


def _disk_path(threads: int):
    digest = hashlib.sha256("\0".join([host_fingerprint(), torch.__version__]).encode())
    return cache_dir() / "cost_model" / f"threads_th{threads}_{digest.hexdigest()[:12]}.json"


_DECIDED: dict[int, int] = {}


def _threads_for(threads: int, measure_gain: Callable[[int], float]) -> int:
    if threads <= 1:
        return 1
    if threads in _DECIDED:
        return _DECIDED[threads]
    _DECIDED[threads] = chosen = _decide(threads, measure_gain)
    return chosen


def _decide(threads: int, measure_gain: Callable[[int], float]) -> int:
    path = _disk_path(threads)
    try:
        return int(json.loads(path.read_text())["kernel_threads"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    probe = LoadProbe()
    gain = measure_gain(threads)
    chosen = threads if gain >= MIN_GAIN else 1
    if not probe.quiet():
        return chosen  # a busy machine's answer holds for this process only
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"threads": threads, "gain": gain, "kernel_threads": chosen}, f)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs a re-measurement next time
    return chosen


def kernel_threads(measure_gain: Callable[[int], float]) -> int:
    """Threads the fused kernel should use at the current ``torch.get_num_threads()``.

    ``measure_gain(threads)`` times the kernel (one thread's time over ``threads`` threads'),
    called once per machine and thread count; the kernel module passes its own timing, so this
    policy imports no kernel. ``$QSPARSE_CPU_THREADS`` (a positive integer) overrides it.
    """
    forced = os.environ.get(_THREADS_ENV)
    if forced:
        if not forced.isdigit() or int(forced) < 1:
            raise ValueError(f"${_THREADS_ENV} must be a positive integer, got {forced!r}")
        return int(forced)
    return _threads_for(torch.get_num_threads(), measure_gain)
