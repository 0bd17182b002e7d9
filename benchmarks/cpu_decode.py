"""Decode-step projections on the CPU, as the ``qsparse`` backend compiles them, against dense.

What is timed is what the backend runs. For each projection shape (out x in: the Llama-7B
shapes), token count, weight format and sparsity, a ``torch.nn.Linear(in, out, bias=False)``
(fp32, seeded random weights) is compiled with ``dynamic=False`` by

* ``torch.compile(linear)``: dense Inductor, the baseline;
* ``torch.compile(linear, backend="qsparse", options={"sparsity": s, "weights": fmt,
  "dense_roles": ()})``: ours. With fp32 weights the backend lowers the projection to
  ``qsparse::cpu_topk_linear`` (top-K selection fused into the GEMV, reading ``k/D`` of the
  weight rows); with ``int8`` / ``int4`` weights, and with ``quant="bitnet"`` (the *ternary*
  rows: ternary weights packed 2 bits, int8 activations), to ``qsparse::cpu_packed_linear`` on
  the packed weights. Sparsity 0 with a format is a dense input on packed weights; sparsity 0
  in fp32 is left unchanged by the backend (the row then measures the noise floor: the same
  Inductor graph twice). ``dense_roles=()`` because the backend's default leaves the
  projection producing a graph's output dense as an output head, and a lone Linear's output
  is the graph's output.

and the second baseline is PyTorch's dense int8 weight-only matmul,
``torch.ops.aten._weight_int8pack_mm(x, w_int8, scales)`` (what torchao's int8 weight-only
quantization calls on the CPU), called eagerly. In this torch (2.13) it takes ``x`` 2-D
``[tokens, in]`` (fp32, bf16 or fp16), ``w_int8`` int8 ``[out, in]`` and ``scales`` 1-D
``[out]`` of ``x``'s dtype (any other dtype, or ``[out, 1]``, is refused), and returns
``x @ (w_int8 * scales[:, None]).T`` in ``x``'s dtype; here fp32 and symmetric per-row absmax
scales.

Every row's compiled graph is checked: the backend's records
(:func:`qsparse_compile.compile_records.records_of`) must show the fused op in the graph it ran
(``GraphResult.after``), else the script stops (the cost model may decline a shape; then there
is nothing of ours to time). Its output on the warm-up input must match the eager reference
(:func:`qsparse_compile.reference.reference_model`, same options).

Timing: all calls under ``torch.no_grad()``, a fresh random input ``[tokens, in]`` every repeat,
the three calls back to back in an order that rotates between repeats (each goes first
as often as the others); before every timed
call the CPU caches are evicted (:class:`~qsparse_compile.codegen.cpu.machine.CacheFlusher`
reads 4x the last-level cache), because in a real decode step the other layers' weights pass
through the cache in between (``--no-flush``: warm caches). Before each repeat the script waits
for other processes to go idle (``--wait-idle``); repeats it gave up on are counted as
contended. Reported: medians over the repeats, ours' speed-up over each baseline, and the
*byte-count limit*: a memory-bound GEMV reads every weight once, so the best speed-up over
dense fp32 is the ratio of weight bytes read, dense ``4 N D`` over ours (fp32: the kept rows,
``4 N k``; a format: ``PackedLayout(fmt, D, N).read_bytes(k)``, scales included; ``k =
topk_count(D, s)`` per token, and for several tokens the union of their top-K rows, measured);
"of limit" is the measured speed-up over dense Inductor divided by that limit. ``GB/s`` is
ours' bytes over its time, to compare with the machine's read bandwidth in the header
(``torch.sum`` over 1 GiB of fp32 on the same threads, fastest of 5).

    python benchmarks/cpu_decode.py                 # full run: 3 shapes, 1 and 8 tokens
    python benchmarks/cpu_decode.py --quick         # 4096x4096, 1 token, fp32 + int4, s 0, 0.5
    python benchmarks/cpu_decode.py --json out.json # also write every measurement
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _machine import cpu_model, others_busy_cpus, read_bandwidth
from _records import write_json

from qsparse_compile.codegen.cpu.machine import CacheFlusher
from qsparse_compile.codegen.cpu.packed_weights import PackedLayout
from qsparse_compile.compile_records import records_of
from qsparse_compile.config import topk_count
from qsparse_compile.reference import reference_model

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (out_features, in_features)
SPARSITIES = [0.0, 0.4, 0.5, 0.6]
#: Weight formats: fp32 (``cpu_topk_linear``), packed int8 / int4 (``weights=``) and ternary
#: (``quant="bitnet"``), the last three on ``cpu_packed_linear``.
FORMATS = ["fp32", "int8", "int4", "ternary"]
#: The goal: the fp32 path reaches this fraction of the byte-count limit, one token, on every
#: shape at each of these sparsities.
GOAL_FRACTION = 0.9
GOAL_SPARSITIES = (0.4, 0.5)
#: Most the output of ours may differ from the eager reference: ``|y - ref| / |ref|`` (norms).
REFERENCE_TOLERANCE = 1e-3
DTYPE = torch.float32
CALLS = ("dense", "int8mm", "ours")
#: ``--quick`` waits at most this long per repeat for other processes to go idle.
QUICK_WAIT_S = 5.0


def wait_until_quiet(max_wait_s: float, threshold: float = 0.3) -> bool:
    """Wait (up to ``max_wait_s``) until other processes use under ``threshold`` CPUs.

    On a shared machine another process on one of two cores stalls every barrier of a
    two-thread kernel; timing then measures the neighbour, not the kernel. Returns whether it
    is quiet now (False: gave up waiting, the sample is marked contended).
    """
    deadline = time.perf_counter() + max_wait_s
    while True:
        if others_busy_cpus() < threshold:
            return True
        if time.perf_counter() > deadline:
            return False


def _parse_list(text: str, cast: Callable[[str], Any]) -> list:
    return [cast(item) for item in text.split(",") if item]


def _parse_shape(text: str) -> tuple[int, int]:
    out_features, in_features = text.lower().split("x")
    return int(out_features), int(in_features)


def backend_options(fmt: str, sparsity: float) -> dict[str, Any]:
    """The ``qsparse`` options of one row (``dense_roles=()``: see the module doc)."""
    options: dict[str, Any] = {"sparsity": sparsity, "dense_roles": ()}
    if fmt == "ternary":
        options["quant"] = "bitnet"
    elif fmt != "fp32":
        options["weights"] = fmt
    return options


def expected_op(fmt: str, sparsity: float) -> str | None:
    """The fused op the backend must put in the graph; None: it leaves the graph dense."""
    if fmt == "fp32":
        return None if sparsity == 0.0 else "cpu_topk_linear"
    return "cpu_packed_linear"


def weight_bytes(fmt: str, in_features: int, out_features: int, kept_rows: float) -> float:
    """Weight bytes one call of ours reads when it keeps ``kept_rows`` of the ``in_features``
    rows (fp32: ``4 N`` per row; a format: its packed rows and all of its scales)."""
    if fmt == "fp32":
        return 4.0 * out_features * kept_rows
    layout = PackedLayout(fmt, in_features, out_features)
    whole = int(kept_rows)  # read_bytes is linear in the rows: interpolate a mean
    return layout.read_bytes(whole) + (kept_rows - whole) * layout.used_row_bytes


def int8pack_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w_int8 [out, in], scales [out])`` for ``aten._weight_int8pack_mm``: symmetric
    per-row absmax, in ``weight``'s dtype."""
    scales = weight.abs().amax(dim=1).clamp_min(1e-8) / 127.0
    codes = torch.clamp(torch.round(weight / scales[:, None]), -127, 127).to(torch.int8)
    return codes.contiguous(), scales.to(weight.dtype).contiguous()


def kept_rows(x: torch.Tensor, k: int) -> int:
    """Rows of the weight a call on ``x`` reads: the union of each token's top-K features."""
    D = x.shape[-1]
    if k >= D:
        return D
    mask = torch.zeros(D, dtype=torch.bool)
    mask[x.abs().topk(k, dim=-1).indices.flatten()] = True
    return int(mask.sum())


def check_graph(compiled: torch.nn.Module, expected: str | None, label: str) -> dict[str, int]:
    """The qsparse / matmul ops of the graph ``compiled`` ran; SystemExit unless it holds
    ``expected`` (None: the backend must have left the graph as it was)."""
    records = records_of(compiled)
    graphs = records.graphs if records is not None else []
    if len(graphs) != 1:
        raise SystemExit(f"{label}: expected one graph compiled by the qsparse backend, got "
                         f"{len(graphs)}")
    result = graphs[0]
    ops = {name: n for name, n in result.after.items()
           if name.startswith("cpu_") or name in ("mm", "addmm", "sparse_linear",
                                                  "topk_sparsify")}
    if expected is None:
        if result.count("rewrite"):
            raise SystemExit(f"{label}: the backend rewrote the projection ({result.passes}); "
                             f"expected it left dense")
    elif not result.after.get(expected):
        raise SystemExit(
            f"{label}: the compiled graph does not run qsparse::{expected} (passes "
            f"{result.passes}, ops after {dict(result.after)}): the decode lowering declined "
            f"it (the cost model, qsparse_compile.codegen.cpu.cost_model, may have measured "
            f"the fused kernel slower here); nothing of ours to time")
    return ops


def check_reference(module: torch.nn.Module, options: dict[str, Any], x: torch.Tensor,
                    y: torch.Tensor, label: str) -> float:
    """``|y - ref| / |ref|`` of ours against the eager reference; SystemExit when too large."""
    with reference_model(module, **options):
        ref = module(x)
    error = float((y - ref).norm() / ref.norm().clamp_min(1e-30))
    if not error <= REFERENCE_TOLERANCE:
        raise SystemExit(f"{label}: output differs from the eager reference by {error:.2e} "
                         f"(relative norm; tolerance {REFERENCE_TOLERANCE:.0e})")
    return error


def bench_row(
    weight: torch.Tensor,
    int8mm: tuple[torch.Tensor, torch.Tensor],
    fmt: str,
    sparsity: float,
    tokens: int,
    repeats: int,
    flush: CacheFlusher | None,
    generator: torch.Generator,
    wait_s: float = 0.0,
) -> dict[str, Any]:
    """Compile and time one row (dense Inductor, int8pack_mm, ours); medians in ms."""
    out_features, in_features = weight.shape
    k = topk_count(in_features, sparsity)
    label = f"{out_features}x{in_features} {tokens} tok {fmt} s={sparsity}"
    options = backend_options(fmt, sparsity)
    torch._dynamo.reset()  # one Dynamo cache entry per backend: stay under the recompile limit
    dense_mod = torch.nn.Linear(in_features, out_features, bias=False)
    ours_mod = torch.nn.Linear(in_features, out_features, bias=False)
    dense_mod.weight = torch.nn.Parameter(weight, requires_grad=False)  # same storage
    ours_mod.weight = torch.nn.Parameter(weight, requires_grad=False)
    dense = torch.compile(dense_mod, dynamic=False)
    ours = torch.compile(ours_mod, backend="qsparse", dynamic=False, options=options)
    w_int8, scales = int8mm
    calls: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "dense": dense,
        "int8mm": lambda x: torch.ops.aten._weight_int8pack_mm(x, w_int8, scales),
        "ours": ours,
    }

    x = torch.randn(tokens, in_features, generator=generator, dtype=DTYPE)
    start = time.perf_counter()
    y = ours(x)
    compile_s = time.perf_counter() - start
    ops = check_graph(ours, expected_op(fmt, sparsity), label)
    error = check_reference(ours_mod, options, x, y, label)
    for fn in calls.values():  # warm-up (dense compiles here), then once more each
        fn(x)
        fn(x)

    def timed(fn: Callable[[], object]) -> float:
        if flush is not None:
            return flush.time_ms(fn)
        begin = time.perf_counter()
        fn()
        return (time.perf_counter() - begin) * 1e3

    samples: dict[str, list[float]] = {name: [] for name in CALLS}
    rows, contended = [], 0
    for i in range(repeats):
        x = torch.randn(tokens, in_features, generator=generator, dtype=DTYPE)
        rows.append(kept_rows(x, k))
        if wait_s > 0 and not wait_until_quiet(wait_s):
            contended += 1
        order = CALLS[i % len(CALLS):] + CALLS[:i % len(CALLS)]  # rotate who runs first
        for name in order:
            samples[name].append(timed(lambda fn=calls[name], x=x: fn(x)))
    med = {name: statistics.median(v) for name, v in samples.items()}
    mean_rows = statistics.mean(rows)
    dense_bytes = 4.0 * out_features * in_features
    ours_bytes = dense_bytes if expected_op(fmt, sparsity) is None else \
        weight_bytes(fmt, in_features, out_features, mean_rows)
    limit = dense_bytes / ours_bytes
    speedup = med["dense"] / med["ours"]
    del dense, ours, calls, dense_mod, ours_mod
    torch._dynamo.reset()
    gc.collect()
    return {
        "out_features": out_features,
        "in_features": in_features,
        "tokens": tokens,
        "format": fmt,
        "sparsity": sparsity,
        "options": {**options, "dense_roles": list(options["dense_roles"])},
        "k": k,
        "rows_read": mean_rows,
        "ops": ops,
        "reference_error": error,
        "compile_s": compile_s,
        "dense_ms": med["dense"],
        "int8mm_ms": med["int8mm"],
        "ours_ms": med["ours"],
        "speedup_vs_dense": speedup,
        "speedup_vs_int8mm": med["int8mm"] / med["ours"],
        "dense_bytes": dense_bytes,
        "int8mm_bytes": float(out_features * in_features + 4 * out_features),
        "ours_bytes": ours_bytes,
        "limit": limit,
        "fraction_of_limit": speedup / limit,
        "ours_gb_per_s": ours_bytes / (med["ours"] * 1e-3) / 1e9,
        "contended_repeats": contended,
        "samples_ms": samples,
    }


def format_table(results: list[dict[str, Any]]) -> str:
    """One row per case; ``x dense`` / ``x i8mm``: baseline time over ours (above 1: ours is
    faster); ``limit``: dense fp32 bytes over ours; ``of lim``: ``x dense`` over ``limit``."""
    head = (
        f"{'out x in':>11}{'tok':>4}{'format':>8}{'spars':>6}{'dense ms':>9}{'i8mm ms':>8}"
        f"{'ours ms':>8}{'x dense':>8}{'x i8mm':>7}{'MiB':>7}{'limit':>6}{'of lim':>7}"
        f"{'GB/s':>6}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(
            f"{r['out_features']:>5}x{r['in_features']:<5}{r['tokens']:>4}{r['format']:>8}"
            f"{r['sparsity']:>6.1f}{r['dense_ms']:>9.3f}{r['int8mm_ms']:>8.3f}"
            f"{r['ours_ms']:>8.3f}{r['speedup_vs_dense']:>8.2f}{r['speedup_vs_int8mm']:>7.2f}"
            f"{r['ours_bytes'] / 2**20:>7.1f}{r['limit']:>6.2f}{r['fraction_of_limit']:>7.0%}"
            f"{r['ours_gb_per_s']:>6.1f}"
            + (f"  ({r['contended_repeats']} contended)" if r.get("contended_repeats") else "")
        )
    return "\n".join(lines)


def goal_report(results: list[dict[str, Any]], shapes: list[tuple[int, int]]) -> list[str]:
    """Per shape: whether the fp32 path reached the goal fraction of the limit (one token) at
    each goal sparsity; with a goal sparsity not measured it is open unless already missed."""
    lines = []
    for out_features, in_features in shapes:
        parts, met, missing = [], True, []
        for s in GOAL_SPARSITIES:
            found = [r for r in results if r["format"] == "fp32" and r["tokens"] == 1
                     and r["sparsity"] == s and r["out_features"] == out_features
                     and r["in_features"] == in_features]
            if not found:
                missing.append(s)
                continue
            fraction = found[0]["fraction_of_limit"]
            met &= fraction >= GOAL_FRACTION
            parts.append(f"s={s:.1f}: {fraction:.0%}")
        if not parts:
            verdict = "not measured"
        elif not met:
            verdict = "NOT met"
        elif missing:
            verdict = "open (met where measured)"
        else:
            verdict = "met"
        if missing and parts:
            verdict += "; s=" + ", ".join(f"{s:.1f}" for s in missing) + " not measured"
        lines.append(f"goal fp32, 1 token, {GOAL_FRACTION:.0%} of the limit at s=0.4 and 0.5, "
                     f"{out_features}x{in_features}: {'; '.join(parts) or '-'} -> {verdict}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shapes",
        default=",".join(f"{o}x{i}" for o, i in SHAPES),
        help="comma list of OUTxIN projection shapes",
    )
    parser.add_argument("--sparsities", default=",".join(map(str, SPARSITIES)))
    parser.add_argument("--formats", default=",".join(FORMATS),
                        help="comma list of " + ", ".join(FORMATS))
    parser.add_argument("--tokens", default="1,8", help="comma list of tokens per call (1..8)")
    parser.add_argument("--repeats", type=int, default=15, help="timed repeats per case")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--quick", action="store_true",
                        help="4096x4096, 1 token, fp32 and int4, sparsity 0 and 0.5, 5 repeats, "
                             f"--wait-idle at most {QUICK_WAIT_S:g} s")
    parser.add_argument("--no-flush", action="store_true", help="keep caches warm between calls")
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=20.0,
        metavar="SECONDS",
        help="before each repeat wait up to this long for other processes to go idle (0: off)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write all results here")
    args = parser.parse_args(argv)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    shapes = [_parse_shape(s) for s in _parse_list(args.shapes, str)]
    sparsities = _parse_list(args.sparsities, float)
    formats = _parse_list(args.formats, str)
    tokens_list = _parse_list(args.tokens, int)
    repeats = args.repeats
    if args.quick:
        shapes, tokens_list, repeats = shapes[:1], tokens_list[:1], min(repeats, 5)
        sparsities = [s for s in sparsities if s in (0.0, 0.5)] or [0.0, 0.5]
        formats = [f for f in formats if f in ("fp32", "int4")] or ["fp32", "int4"]
        args.wait_idle = min(args.wait_idle, QUICK_WAIT_S)
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        parser.error(f"--formats: unknown {', '.join(unknown)}; allowed: {', '.join(FORMATS)}")
    if any(not 1 <= t <= 8 for t in tokens_list):
        parser.error("--tokens: each value must be 1..8 (decode rows per call)")

    flush = None if args.no_flush else CacheFlusher()
    generator = torch.Generator().manual_seed(args.seed)
    bandwidth = read_bandwidth()
    meta = {
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "dtype": str(DTYPE).removeprefix("torch."),
        "read_bandwidth_bytes_per_s": bandwidth,
        "repeats": repeats,
        "cache_flush": flush is not None,
        "wait_idle_s": args.wait_idle,
        "int8mm": "aten._weight_int8pack_mm(x [tokens, in] fp32, int8 [out, in], fp32 [out])",
    }
    print(f"CPU: {meta['cpu']}; torch {meta['torch']}; threads {meta['threads']}; "
          f"dtype {meta['dtype']}")
    print(f"read bandwidth (torch.sum over 1 GiB fp32, {meta['threads']} threads, fastest of "
          f"5): {bandwidth / 1e9:.1f} GB/s")
    print(f"median of {repeats} repeats; caches {'flushed' if flush else 'warm'} before each "
          f"call; dense = Inductor, i8mm = aten._weight_int8pack_mm, ours = backend='qsparse'")
    results: list[dict[str, Any]] = []
    with torch.no_grad():
        for out_features, in_features in shapes:
            weight = 0.02 * torch.randn(out_features, in_features, generator=generator,
                                        dtype=DTYPE)
            int8mm = int8pack_weight(weight)
            for tokens in tokens_list:
                for fmt in formats:
                    for sparsity in sparsities:
                        r = bench_row(weight, int8mm, fmt, sparsity, tokens, repeats, flush,
                                      generator, args.wait_idle)
                        results.append(r)
                        print(format_table([r]).splitlines()[-1], flush=True)
            del weight, int8mm
    print()
    print(format_table(results))
    print()
    for line in goal_report(results, shapes):
        print(line)
    if args.json is not None:
        write_json(args.json, {"meta": meta, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
