"""Start a function on several ranks of a real ``gloo`` process group on 127.0.0.1.

Each rank is a fresh process (``spawn``): nothing compiled or cached in the test process leaks
into it. A rank's return value comes back through a file (tensors included, ``torch.save``); an
exception on a rank comes back with its traceback. A run that exceeds its time is killed and
reported, so a hung collective fails the test instead of hanging the suite.
"""

from __future__ import annotations

import os
import socket
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

#: Seconds a whole multi-rank run may take (process start, imports, compiles included).
TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(fn: Callable[..., Any], rank: int, world: int, port: int, out: str,
               args: tuple) -> None:
    import torch.distributed as dist

    # one thread per rank: two ranks share the two cores of a CI machine
    torch.set_num_threads(1)
    os.environ.setdefault("QSPARSE_CACHE_DIR", str(Path(out).parent / "kernels"))
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world)
        try:
            result = fn(rank, world, *args)
        finally:
            dist.destroy_process_group()
        torch.save({"result": result}, out)
    except BaseException:  # reported to the test process, which fails with it
        torch.save({"error": traceback.format_exc()}, out)
        raise


def run_ranks(fn: Callable[..., Any], *args: Any, world: int = 2,
              timeout: float = TIMEOUT_S) -> list[Any]:
    """``[fn(rank, world, *args) for rank in range(world)]``, each on its own process in one
    process group. ``fn`` must be importable by name (a module-level function)."""
    context = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="qsparse-ranks-") as tmp:
        outs = [os.path.join(tmp, f"rank{r}.pt") for r in range(world)]
        procs = [context.Process(target=_rank_main, args=(fn, r, world, port, outs[r], args))
                 for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        results = []
        for r, path in enumerate(outs):
            if not os.path.exists(path):
                why = "timed out" if r in hung else f"exit code {procs[r].exitcode}"
                raise AssertionError(f"rank {r} of {world} returned nothing ({why}, after "
                                     f"{timeout:.0f} s at most)")
            got = torch.load(path, weights_only=False)
            if "error" in got:
                raise AssertionError(f"rank {r} of {world} failed:\n{got['error']}")
            results.append(got["result"])
        return results
