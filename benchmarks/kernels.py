"""Triton kernels on a CUDA GPU: sparse decode GEMV and fused sparsify against dense ``F.linear``.

For each dtype (bf16, fp16), Llama-7B projection shape (out x in: 4096x4096 q/k/v/o,
11008x4096 gate/up, 4096x11008 down), token count (1, 8) and sparsity (0.4, 0.5, 0.6, 0.8),
all on the same device in one run:

* ``dense``: ``F.linear(x, W)`` (cuBLAS), the baseline;
* ``gemv``: ``qsparse_triton`` sparse GEMV on ``W^T`` (prepared once) with a top-K-sparsified
  ``x`` (``k = topk_count(in, s)`` per token);
* ``sparsify``: the kernel producing that input: fused RMSNorm + top-K (inputs of q/k/v and
  gate/up, ``in == 4096``) or top-K alone (input of down, ``in == 11008``);
* ``rmsnorm``: PyTorch's eager RMSNorm (as HF Llama computes it), the dense path's counterpart
  of the fused kernel.

Timing: every measured call is captured ``--inner`` times into one CUDA graph (so launch
overhead on the host is not measured, as in a decode loop under CUDA graphs), the graph is
warmed up, then replayed ``--repeats`` times between CUDA events; the median per call is
reported. Weights rotate through enough copies to exceed four times the L2 cache, so every call
reads its weights from DRAM, as a decode step does. Reported per row: times, ``dense / gemv``
(above 1: ours is faster), the decode-step ratio ``(rmsnorm + dense) / (sparsify + gemv)``, the
fraction of weight rows the GEMV reads (the union of the tokens' masks: independent random
tokens at 8 tokens leave little to skip), and achieved bandwidth = weight bytes actually read /
time, next to the dense one and the device name.

    python benchmarks/kernels.py                  # the full grid
    python benchmarks/kernels.py --quick          # bf16, one shape, 1 token
    python benchmarks/kernels.py --json out.json  # also write every measurement

Needs a CUDA device (and Triton); without one it exits with a message saying so.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from _records import write_json

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (out_features, in_features)
SPARSITIES = [0.4, 0.5, 0.6, 0.8]
TOKENS = [1, 8]
RMS_EPS = 1e-6
DEFAULT_L2_BYTES = 50 * 2**20  # H100; used when the device does not report its L2 size


def _require_cuda() -> None:
    """Exit with a clear message unless a CUDA device and a compiling Triton are available."""
    if not torch.cuda.is_available():
        sys.exit(
            "benchmarks/kernels.py: no CUDA device is available (torch.cuda.is_available() is "
            "False); these benchmarks time Triton GPU kernels and need an NVIDIA GPU. For the "
            "CPU decode path run benchmarks/cpu_decode.py instead."
        )
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("benchmarks/kernels.py: unset TRITON_INTERPRET: it would time the CPU "
                 "interpreter, not the GPU kernels")
    try:
        import triton  # noqa: F401
    except ImportError:
        sys.exit("benchmarks/kernels.py: Triton is not installed; it is needed for the kernels")


class GraphTimer:
    """Median time per call of a function, replayed from a CUDA graph between CUDA events."""

    def __init__(self, warmup: int, repeats: int, inner: int) -> None:
        self.warmup, self.repeats, self.inner = warmup, repeats, inner

    def __call__(self, fn) -> float:
        """Seconds per call of ``fn`` (a callable taking the call's index, returning nothing)."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for i in range(3):  # compile, render and autotune outside the capture
                fn(i)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(self.inner):
                fn(i)
        for _ in range(self.warmup):
            graph.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(self.repeats):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / self.inner)
        del graph
        return statistics.median(times)


def _l2_bytes(device: torch.device) -> int:
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 0) or DEFAULT_L2_BYTES)


def bench_shape(out_f: int, in_f: int, dtype: torch.dtype, tokens: int, sparsities: list[float],
                timer: GraphTimer, device: torch.device) -> list[dict]:
    """All measurements of one (shape, dtype, tokens): dense once, then each sparsity."""
    from qsparse_compile.codegen import triton as qt
    from qsparse_compile.config import topk_count
    from qsparse_compile.reference import rms_norm

    elem = torch.empty((), dtype=dtype).element_size()
    weight_bytes = out_f * in_f * elem
    copies = max(2, math.ceil(4 * _l2_bytes(device) / weight_bytes))
    gen = torch.Generator(device=device).manual_seed(0)
    weights = [torch.randn(out_f, in_f, device=device, dtype=dtype, generator=gen) * in_f**-0.5
               for _ in range(copies)]
    weights_t = [qt.prepare_weight(w) for w in weights]
    x = torch.randn(tokens, in_f, device=device, dtype=dtype, generator=gen)
    norm_w = torch.rand(in_f, device=device, dtype=dtype, generator=gen) + 0.5
    fused_norm = in_f == 4096  # q/k/v, gate/up inputs follow RMSNorm; down's input does not

    dense_s = timer(lambda i: F.linear(x, weights[i % copies]))
    rms_s = timer(lambda i: rms_norm(x, norm_w, RMS_EPS))
    rows = []
    for s in sparsities:
        k = topk_count(in_f, s)
        if fused_norm:
            sparsify = lambda i, k=k: qt.norm_sparsify(x, "rms", norm_w, None, RMS_EPS, k)  # noqa: E731
        else:
            sparsify = lambda i, k=k: qt.topk_sparsify(x, k)  # noqa: E731
        xs = sparsify(0)
        # correctness first: the GEMV against its reference on this very input
        y = qt.sparse_gemv(xs, weights_t[0])
        ref = qt.sparse_gemv_reference(xs, weights_t[0])
        max_err = (y.float() - ref.float()).abs().max().item()
        read_fraction = (xs != 0).any(0).float().mean().item()
        gemv_s = timer(lambda i, xs=xs: qt.sparse_gemv(xs, weights_t[i % copies]))
        sparsify_s = timer(sparsify)
        read_bytes = read_fraction * weight_bytes
        rows.append({
            "out_features": out_f, "in_features": in_f, "dtype": str(dtype).replace("torch.", ""),
            "tokens": tokens, "sparsity": s, "k": k,
            "sparsify_kernel": "rmsnorm+topk" if fused_norm else "topk",
            "dense_us": dense_s * 1e6, "gemv_us": gemv_s * 1e6,
            "sparsify_us": sparsify_s * 1e6, "rmsnorm_us": rms_s * 1e6,
            "gemv_speedup": dense_s / gemv_s,
            "step_speedup": (rms_s + dense_s) / (sparsify_s + gemv_s),
            "read_fraction": read_fraction,
            "dense_GBps": weight_bytes / dense_s / 1e9,
            "gemv_GBps": read_bytes / gemv_s / 1e9,
            "gemv_max_abs_err": max_err,
        })
    return rows


def _print_row(r: dict) -> None:
    print(f"{r['dtype']:>8} {r['out_features']:>5}x{r['in_features']:<5} {r['tokens']:>3} "
          f"{r['sparsity']:>4.2f} | {r['dense_us']:8.1f} {r['gemv_us']:8.1f} "
          f"{r['sparsify_us']:8.1f} {r['rmsnorm_us']:8.1f} | {r['gemv_speedup']:6.2f}x "
          f"{r['step_speedup']:6.2f}x | {r['read_fraction']:5.2f} {r['dense_GBps']:7.0f} "
          f"{r['gemv_GBps']:7.0f} | {r['gemv_max_abs_err']:.1e}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="bf16, 4096x4096, 1 token")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="comma list of bf16, fp16")
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="comma list, 1-8")
    parser.add_argument("--sparsities", default=",".join(map(str, SPARSITIES)))
    parser.add_argument("--warmup", type=int, default=5, help="graph replays before timing")
    parser.add_argument("--repeats", type=int, default=30, help="timed graph replays")
    parser.add_argument("--inner", type=int, default=20, help="calls captured per graph")
    parser.add_argument("--json", type=Path, default=None, help="write all results here")
    args = parser.parse_args(argv)
    _require_cuda()

    import triton

    import qsparse_compile

    device = torch.device("cuda")
    dtypes = ["bf16"] if args.quick else args.dtypes.split(",")
    shapes = SHAPES[:1] if args.quick else SHAPES
    tokens = [1] if args.quick else [int(t) for t in args.tokens.split(",")]
    sparsities = [float(s) for s in args.sparsities.split(",")]
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown or not all(1 <= t <= 8 for t in tokens):
        parser.error(f"dtypes must be among {list(DTYPES)} and tokens in 1..8, got "
                     f"{dtypes} and {tokens}")
    timer = GraphTimer(args.warmup, args.repeats, args.inner)
    name = torch.cuda.get_device_name(device)
    meta = {
        "device": name, "torch": torch.__version__, "triton": triton.__version__,
        "qsparse_compile": qsparse_compile.__version__, "python": platform.python_version(),
        "l2_bytes": _l2_bytes(device), "warmup": args.warmup, "repeats": args.repeats,
        "inner": args.inner,
    }
    print(f"device: {name}; torch {torch.__version__}, triton {triton.__version__}; "
          f"median of {args.repeats} graph replays x {args.inner} calls")
    print(f"{'dtype':>8} {'out x in':^11} {'tok':>3} {'s':>4} | {'dense':>8} {'gemv':>8} "
          f"{'sparsify':>8} {'rmsnorm':>8} | {'gemv':>7} {'step':>7} | {'read':>5} "
          f"{'dGB/s':>7} {'sGB/s':>7} | err")
    print(f"{'':>8} {'':^11} {'':>3} {'':>4} | {'(us)':>8} {'(us)':>8} {'(us)':>8} "
          f"{'(us)':>8} | {'speedup':>7} {'speedup':>7} |")
    results = []
    with torch.inference_mode():
        for dname in dtypes:
            for out_f, in_f in shapes:
                for t in tokens:
                    for row in bench_shape(out_f, in_f, DTYPES[dname], t, sparsities, timer,
                                           device):
                        _print_row(row)
                        results.append(row)
    if args.json is not None:
        write_json(args.json, {"meta": meta, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
