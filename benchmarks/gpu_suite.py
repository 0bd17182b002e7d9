"""The GPU suite: one command that checks and times everything that needs a CUDA device.

The device run (one command; ``set -o pipefail`` keeps the suite's exit status through ``tee``)::

    set -o pipefail; mkdir -p $OUT && PYTHONUNBUFFERED=1 python benchmarks/gpu_suite.py \\
        --out $OUT 2>&1 | tee $OUT/gpu_suite.log

Steps, in order (results are rewritten to ``gpu_suite.json`` and ``gpu_suite.md`` under
``--out`` (default ``$OUT``) after every step, so a run cut short keeps what it measured):

1. **environment**: device, capability, memory, driver (``nvidia-smi`` where present), CUDA,
   torch, Triton and Python versions.
2. **tests**: one pytest run in a subprocess of every kernel test (:data:`KERNEL_TESTS`: the
   sparsify, N:M, fused norm + top-K + rescale + int8, decode GEMV and packed int8 / int4 /
   ternary GEMV kernels, the backend's Triton / CUDA path with and without weight formats,
   2:4 prefill; forward and backward against the references) on CUDA
   tensors with compiled kernels: ``QSPARSE_TEST_DEVICE=cuda TRITON_INTERPRET=0`` (see
   ``tests/devices.py``). The tests that exist only for a device (:data:`DEVICE_TESTS`) are in
   that run; one of them skipping on the device is a failure. Where pytest-xdist is installed
   the run spreads over ``--test-workers`` processes (every new kernel specialisation is a
   Triton compile). Pass/fail/skip counts come from pytest's JUnit XML.
3. **decode GEMV**: ``benchmarks/kernels.py``'s ``bench_shape`` and ``GraphTimer`` (CUDA graph
   replays between CUDA events; weights rotate through copies four times the L2 cache, so
   every call reads DRAM) on Llama-7B / Llama-3-8B shapes (4096x4096, 11008x4096, 4096x11008,
   14336x4096, 4096x14336), sparsity 0 / 0.4 / 0.5 / 0.6, rows 1 / 2 / 4 / 8, bf16 and fp16,
   against ``F.linear``. Added here, as ``kernels.py`` lacks them: the sparsify kernel's output
   checked against its reference, the device's peak bandwidth (from its memory clock and bus
   width, where torch reports them) and a measured read bandwidth (``sum`` over 2 GiB), and each
   GEMV's fraction of both.
4. **end-to-end decode**: a Llama-7B-shaped ``LlamaForCausalLM`` from a config, random
   weights, ``--layers`` layers (8), bf16, a transformers ``StaticCache``, greedy, ``--new-tokens``
   (128): dense ``torch.compile(mode="reduce-overhead")`` against ``backend="qsparse"`` at 0.4
   and 0.5 with ``cudagraphs=True``. The prompt's prefill runs the uncompiled model (dense, the
   same for every path), so only the decode graph is compiled and timed. Reported: median
   tokens/s over ``--rounds``, the ratio to dense, the byte-count limit (weight bytes read per
   token, dense over sparse; the head and the embedding row count in both) and the decoded
   tokens' agreement with the eager reference model (``reference_model``) decoding the same
   prefill (random weights make near-ties common in bf16: reported, not a failure).

``--cpu-dry-run`` runs the same steps on the CPU with tiny shapes (``TRITON_INTERPRET=1`` set
before Triton is imported): the same pytest selection with ``QSPARSE_TEST_DEVICE=cpu
TRITON_INTERPRET=1``, every test collected but, to stay quick, only :data:`DRY_RUN_TESTS` run
(the device tests, which skip there, and the check that the switch reached the kernels;
``--all-kernel-tests`` runs them all in the interpreter), the GEMV at 64x64, 1 row, one
sparsity in the interpreter (timed with ``perf_counter``: a check that it runs, not a speed),
and a 2-layer hidden-64 Llama decoding 4 tokens with Inductor, without CUDA graphs (Inductor
captures none on the CPU, so the option is not passed). It is what CI runs.

Exit status: 0 when every test passed and every step ran, 1 otherwise (2: bad arguments).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

#: every kernel test, run on the test device: the Triton kernels (every file under
#: tests/codegen/triton, the packed GEMV's test_triton_packed_gemv.py included), the backend's
#: Triton / CUDA path (weight formats included), 2:4 prefill, CUDA graphs
KERNEL_TESTS = [
    "tests/codegen/triton",
    "tests/passes/test_cuda_decode.py",
    "tests/passes/test_triton_lowering.py",
    "tests/passes/test_block_prefill.py",
    "tests/codegen/test_semi_structured.py",
    "tests/test_backend_cudagraphs.py",
]
#: tests that exist only for a CUDA device (they skip elsewhere; on the device a skip fails)
DEVICE_TESTS = [
    "tests/passes/test_cuda_decode.py::test_auto_on_cuda_selects_triton",
    "tests/codegen/test_semi_structured.py::test_semi_structured_branch_on_gpu",
]
#: what ``--cpu-dry-run`` runs of the selection (by test name; the rest is collected only): the
#: device tests and the check that the device switch reached the kernels' registration
DRY_RUN_TESTS = [t.split("::")[1] for t in DEVICE_TESTS] + ["test_registration_mode"]

GEMV_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096), (4096, 14336)]
GEMV_SPARSITIES = [0.0, 0.4, 0.5, 0.6]
GEMV_ROWS = [1, 2, 4, 8]
GEMV_DTYPES = ["bf16", "fp16"]
DECODE_SPARSITIES = [0.4, 0.5]
#: Llama-7B's shapes; the number of layers is an argument
LLAMA_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-6)
TINY_LLAMA = dict(vocab_size=128, hidden_size=64, intermediate_size=128,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for gpu_suite.json / gpu_suite.md (default: $OUT)")
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="the same steps on the CPU with tiny shapes (CI)")
    parser.add_argument("--all-kernel-tests", action="store_true",
                        help="--cpu-dry-run: run every kernel test in the interpreter, not only "
                             "the few that check the wiring (on CUDA all of them always run)")
    parser.add_argument("--skip", default="",
                        help="comma list of steps to skip: tests, gemv, decode")
    parser.add_argument("--quick", action="store_true",
                        help="GEMV: bf16, 4096x4096 and 11008x4096, rows 1 and 8")
    parser.add_argument("--layers", type=int, default=8, help="decoder layers (step 4)")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens decoded (step 4)")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="timed decodes per path")
    parser.add_argument("--repeats", type=int, default=20, help="GEMV: timed graph replays")
    parser.add_argument("--inner", type=int, default=10, help="GEMV: calls per graph")
    parser.add_argument("--test-timeout", type=int, default=300,
                        help="seconds per pytest run (the device allows 10 minutes a command)")
    parser.add_argument("--test-workers", type=int, default=8,
                        help="CUDA: pytest-xdist workers for the kernel tests where xdist is "
                             "installed (each new kernel specialisation is a Triton compile; "
                             "workers compile in parallel); 0 or 1: one process")
    args = parser.parse_args(argv)
    args.out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    if args.out is None:
        parser.error("give --out DIR (or set $OUT)")
    args.skip = {s for s in args.skip.split(",") if s}
    if args.skip - {"tests", "gemv", "decode"}:
        parser.error(f"--skip takes tests, gemv, decode; got {sorted(args.skip)}")
    return args


# --- report --------------------------------------------------------------------------------

class Report:
    """The suite's results; written as JSON and Markdown after every step."""

    def __init__(self, out: Path, dry_run: bool):
        self.out = out
        self.data: dict = {"mode": "cpu-dry-run" if dry_run else "cuda", "steps": {},
                           "failures": []}

    def step(self, name: str, result: dict) -> None:
        self.data["steps"][name] = result
        if result.get("status") == "failed":
            self.data["failures"].append(name)
        self.write()

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "gpu_suite.json").write_text(json.dumps(self.data, indent=1, default=str))
        (self.out / "gpu_suite.md").write_text(self.markdown())

    def markdown(self) -> str:
        d, steps = self.data, self.data["steps"]
        lines = [f"# GPU suite ({d['mode']})", ""]
        env = steps.get("environment", {})
        lines += ["## Environment", "", "| | |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in env.items() if k != "status"]
        tests = steps.get("tests", {})
        lines += ["", "## Tests", ""]
        if tests.get("runs"):
            lines += ["| run | QSPARSE_TEST_DEVICE | TRITON_INTERPRET | tests | passed | failed "
                      "| errors | skipped | deselected | rc |", "|" + "---|" * 10]
            for r in tests["runs"]:
                lines.append(f"| {r['name']} | {r['device']} | {r['interpret']} | {r['tests']} "
                             f"| {r['passed']} | {r['failures']} | {r['errors']} "
                             f"| {r['skipped']} | {r['deselected']} | {r['rc']} |")
                if r["device"] == "cuda" and r.get("device_tests_skipped"):
                    lines += ["", "device tests skipped on the device: "
                              + ", ".join(r["device_tests_skipped"])]
            if tests.get("note"):
                lines += ["", tests["note"]]
        else:
            lines.append(tests.get("status", "not run"))
        gemv = steps.get("gemv", {})
        lines += ["", "## Decode GEMV", ""]
        if gemv.get("rows"):
            for key in ("peak_GBps", "measured_read_GBps", "timing"):
                if key in gemv:
                    lines.append(f"- {key}: {gemv[key]}")
            lines += ["", "| dtype | out x in | rows | s | dense us | gemv us | sparsify us | "
                      "gemv speed-up | step speed-up | read | gemv GB/s | of peak | of measured "
                      "| gemv err | sparsify ok |", "|" + "---|" * 15]
            for r in gemv["rows"]:
                lines.append(
                    f"| {r['dtype']} | {r['out_features']}x{r['in_features']} | {r['tokens']} | "
                    f"{r['sparsity']:.2f} | {r['dense_us']:.1f} | {r['gemv_us']:.1f} | "
                    f"{r['sparsify_us']:.1f} | {r['gemv_speedup']:.2f}x | "
                    f"{r['step_speedup']:.2f}x | {r['read_fraction']:.2f} | "
                    f"{r['gemv_GBps']:.0f} | {_pct(r.get('gemv_of_peak'))} | "
                    f"{_pct(r.get('gemv_of_measured'))} | {r['gemv_max_abs_err']:.1e} | "
                    f"{r['sparsify_equal_reference']} |")
        else:
            lines.append(gemv.get("status", "not run"))
        dec = steps.get("decode", {})
        lines += ["", "## End-to-end decode", ""]
        if dec.get("paths"):
            lines.append(f"- model: {dec['model']}")
            lines.append(f"- {dec['note']}")
            lines += ["", "| path | CUDA graphs | tokens/s | vs dense | byte-count limit | "
                      "of limit | tokens equal reference | compile s |", "|" + "---|" * 8]
            for p in dec["paths"]:
                lines.append(
                    f"| {p['path']} | {p['cudagraphs']} | {p['tokens_per_s']:.1f} | "
                    f"{p['vs_dense']:.2f}x | {p['byte_limit']:.2f}x | "
                    f"{_pct(p['vs_dense'] / p['byte_limit'])} | {p['tokens_equal_reference']} | "
                    f"{p['compile_s']:.1f} |")
        else:
            lines.append(dec.get("status", "not run"))
        for name, step in steps.items():
            if step.get("status") == "failed":
                lines += ["", f"## {name}: failed", "", "```", step.get("error", ""), "```"]
        lines += ["", f"failures: {', '.join(d['failures']) or 'none'}", ""]
        return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _guarded(report: Report, name: str, fn, *args) -> None:
    """Run one step; an exception is the step's failure (recorded, the suite goes on)."""
    print(f"\n=== {name} ===", flush=True)
    start = time.perf_counter()
    try:
        result = fn(*args)
    except Exception:  # noqa: BLE001 - every failure of a step is reported, not raised
        result = {"status": "failed", "error": traceback.format_exc()}
        print(result["error"], flush=True)
    result.setdefault("status", "ok")
    result["seconds"] = round(time.perf_counter() - start, 1)
    report.step(name, result)
    print(f"=== {name}: {result['status']} ({result['seconds']} s) ===", flush=True)


# --- 1. environment ------------------------------------------------------------------------

def environment() -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda (torch)": torch.version.cuda, "host": platform.node(),
           "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "")}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = "not installed"
    import qsparse_compile

    env["qsparse_compile"] = qsparse_compile.__version__
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["device"] = torch.cuda.get_device_name(0)
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
        env["memory_GiB"] = round(props.total_memory / 2**30, 1)
        env["driver (torch)"] = getattr(torch._C, "_cuda_getDriverVersion", lambda: None)()
    else:
        env["device"] = f"cpu ({os.cpu_count()} logical CPUs, no CUDA device)"
    if shutil.which("nvidia-smi"):
        proc = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,"
                               "clocks.max.memory", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=60, check=False)
        env["nvidia-smi"] = (proc.stdout or proc.stderr).strip()
    else:
        env["nvidia-smi"] = "not found"
    for k, v in env.items():
        print(f"{k}: {v}", flush=True)
    return env


# --- 2. tests ------------------------------------------------------------------------------

def _skipped_device_tests(root: ET.Element) -> list[str]:
    """The :data:`DEVICE_TESTS` (``path::name``, any parametrisation) the JUnit XML reports as
    skipped."""
    wanted = {(path[:-3].replace("/", "."), name)
              for path, name in (t.split("::") for t in DEVICE_TESTS)}
    skipped = []
    for case in root.iter("testcase"):
        key = (case.get("classname", ""), case.get("name", "").split("[")[0])
        if key in wanted and case.find("skipped") is not None:
            skipped.append(f"{key[0]}::{case.get('name')}")
    return skipped


def _pytest(name: str, targets: list[str], device: str, out: Path, timeout: int,
            extra: tuple[str, ...] = ()) -> dict:
    """One pytest run of ``targets`` with ``QSPARSE_TEST_DEVICE=device`` (and the interpreter on
    exactly for ``cpu``); its counts from the JUnit XML, its output under ``out``."""
    xml = out / f"pytest-{name}.xml"
    interpret = "1" if device == "cpu" else "0"
    env = {**os.environ, "QSPARSE_TEST_DEVICE": device, "TRITON_INTERPRET": interpret,
           "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
           f"--junitxml={xml}", *extra, *targets]
    print(f"$ QSPARSE_TEST_DEVICE={device} TRITON_INTERPRET={interpret} "
          f"{shlex.join(['python', *cmd[1:]])}", flush=True)
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=timeout, check=False,
                              capture_output=True, text=True)
        rc, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, output = "timeout", f"{e.stdout or ''}{e.stderr or ''}\ntimed out after {timeout} s"
    if isinstance(output, bytes):
        output = output.decode(errors="replace")
    print(output[-6000:], flush=True)
    (out / f"pytest-{name}.log").write_text(output)
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    skipped_device = []
    if xml.exists():
        root = ET.parse(xml).getroot()
        for suite in ([root] if root.tag == "testsuite" else root.iter("testsuite")):
            for key in counts:
                counts[key] += int(suite.get(key, 0))
        skipped_device = _skipped_device_tests(root)
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    deselected = re.search(r"(\d+) deselected", output)
    return {"name": name, "device": device, "interpret": interpret, "targets": targets,
            "extra": list(extra), "rc": rc, "passed": passed,
            "deselected": int(deselected.group(1)) if deselected else 0,
            "device_tests_skipped": skipped_device, **counts}


def _selection() -> list[str]:
    """:data:`KERNEL_TESTS`, and any device test outside them (none today)."""
    def covered(test: str) -> bool:
        path = test.split("::")[0]
        return any(path == k or path.startswith(k.rstrip("/") + "/") for k in KERNEL_TESTS)

    return KERNEL_TESTS + [t for t in DEVICE_TESTS if not covered(t)]


def tests(args: argparse.Namespace, cuda: bool) -> dict:
    if cuda:
        workers = args.test_workers if importlib.util.find_spec("xdist") else 0
        extra = ("-n", str(workers)) if workers > 1 else ()
        run = _pytest("kernels", _selection(), "cuda", args.out, args.test_timeout, extra)
        note = ("Every kernel test ran on CUDA tensors with compiled kernels "
                "(QSPARSE_TEST_DEVICE=cuda TRITON_INTERPRET=0), the device-only tests among "
                "them" + (f"; {workers} pytest-xdist workers." if extra else "."))
    else:
        extra = () if args.all_kernel_tests else ("-k", " or ".join(DRY_RUN_TESTS))
        run = _pytest("kernels", _selection(), "cpu", args.out, args.test_timeout, extra)
        note = ("CPU dry run (QSPARSE_TEST_DEVICE=cpu TRITON_INTERPRET=1): the same selection, "
                + ("every test run in the interpreter; " if args.all_kernel_tests else
                   f"every test collected, {', '.join(DRY_RUN_TESTS)} run; ")
                + "the device tests skip without a CUDA device.")
    errors = []
    if run["rc"] != 0 or run["failures"] or run["errors"] or run["tests"] == 0:
        errors.append(f"pytest run failed (rc {run['rc']}; log: pytest-{run['name']}.log)")
    if cuda and run["device_tests_skipped"]:  # a device test that skips checked nothing
        errors.append(f"device tests skipped on the device: {run['device_tests_skipped']}")
    return {"status": "failed" if errors else "ok", "runs": [run], "note": note,
            **({"error": "; ".join(errors)} if errors else {})}


# --- 3. decode GEMV ------------------------------------------------------------------------

def _peak_bandwidth(device) -> float | None:
    """Bytes/s from the memory clock and bus width (double data rate), where torch has them."""
    import torch

    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", 0)
    bus_bits = getattr(props, "memory_bus_width", 0)
    return 2 * clock_khz * 1e3 * bus_bits / 8 if clock_khz and bus_bits else None


def _measured_read_bandwidth(device, gib: float = 2.0) -> float:
    """Bytes/s of ``torch.sum`` over ``gib`` GiB of bf16, best of ten (CUDA events)."""
    import torch

    x = torch.ones(int(gib * 2**30) // 2, device=device, dtype=torch.bfloat16)
    x.sum()
    best = math.inf
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        x.sum()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    del x
    torch.cuda.empty_cache()
    return gib * 2**30 / best


def _sparsify_matches(in_f: int, dtype, tokens: int, sparsities, device) -> dict[float, bool]:
    """The sparsify kernel ``kernels.bench_shape`` times, against its reference, same input."""
    import torch

    from qsparse_compile.codegen import triton as qt
    from qsparse_compile.codegen.triton.fused_norm import norm_sparsify_reference
    from qsparse_compile.config import topk_count

    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(tokens, in_f, device=device, dtype=dtype, generator=gen)
    w = torch.rand(in_f, device=device, dtype=dtype, generator=gen) + 0.5
    out = {}
    for s in sparsities:
        k = topk_count(in_f, s)
        if in_f == 4096:
            got = qt.norm_sparsify(x, "rms", w, None, 1e-6, k)
            want = norm_sparsify_reference(x, "rms", w, None, 1e-6, k)
        else:
            got, want = qt.topk_sparsify(x, k), qt.topk_sparsify_reference(x, k)
        out[s] = bool(torch.equal(got, want))
    return out


def gemv_cuda(args: argparse.Namespace) -> dict:
    import torch

    sys.path.insert(0, str(HERE))
    import kernels  # benchmarks/kernels.py

    device = torch.device("cuda")
    dtypes = ["bf16"] if args.quick else GEMV_DTYPES
    shapes = GEMV_SHAPES[:2] if args.quick else GEMV_SHAPES
    rows_list = [1, 8] if args.quick else GEMV_ROWS
    peak = _peak_bandwidth(device)
    measured = _measured_read_bandwidth(device)
    print(f"peak {peak and peak / 1e9:.0f} GB/s, measured read {measured / 1e9:.0f} GB/s",
          flush=True)
    timer = kernels.GraphTimer(warmup=5, repeats=args.repeats, inner=args.inner)
    rows = []
    failed = []
    with torch.inference_mode():
        for dname in dtypes:
            dtype = kernels.DTYPES[dname]
            for out_f, in_f in shapes:
                for tokens in rows_list:
                    try:
                        ok = _sparsify_matches(in_f, dtype, tokens, GEMV_SPARSITIES, device)
                        measured_rows = kernels.bench_shape(out_f, in_f, dtype, tokens,
                                                            GEMV_SPARSITIES, timer, device)
                    except Exception:  # noqa: BLE001 - one shape's failure, the rest go on
                        failed.append(f"{dname} {out_f}x{in_f} rows {tokens}: "
                                      f"{traceback.format_exc()}")
                        print(failed[-1], flush=True)
                        continue
                    for r in measured_rows:
                        r["sparsify_equal_reference"] = ok[r["sparsity"]]
                        r["gemv_of_peak"] = r["gemv_GBps"] * 1e9 / peak if peak else None
                        r["dense_of_peak"] = r["dense_GBps"] * 1e9 / peak if peak else None
                        r["gemv_of_measured"] = r["gemv_GBps"] * 1e9 / measured
                        # fp32 accumulation in another order: a few units of the last place
                        scale = 2 ** -7 if dname == "bf16" else 2 ** -10
                        if not r["sparsify_equal_reference"] or r["gemv_max_abs_err"] > 8 * scale:
                            failed.append(f"{dname} {out_f}x{in_f} rows {tokens} s {r['sparsity']}")
                        kernels._print_row(r)
                        rows.append(r)
    result = {"peak_GBps": peak and round(peak / 1e9), "measured_read_GBps": round(measured / 1e9),
              "timing": f"kernels.GraphTimer: median of {args.repeats} CUDA-graph replays x "
                        f"{args.inner} calls, weights rotated through copies > 4x L2",
              "rows": rows}
    if failed:
        result.update(status="failed", error="kernel failed or differs from its reference: "
                      + "; ".join(failed))
    return result


def gemv_cpu(args: argparse.Namespace) -> dict:
    """The same kernels in Triton's interpreter, 64x64, 1 row, one sparsity: that they run
    and match their references (the times are the interpreter's, not a speed)."""
    import torch
    import torch.nn.functional as F

    from qsparse_compile.codegen import triton as qt
    from qsparse_compile.config import topk_count

    out_f, in_f, tokens, s = 64, 64, 1, 0.5
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(out_f, in_f, generator=gen) * in_f ** -0.5
    x = torch.randn(tokens, in_f, generator=gen)
    k = topk_count(in_f, s)
    w_t = qt.prepare_weight(w)

    def timed(fn, repeats=3):
        fn()
        start = time.perf_counter()
        for _ in range(repeats):
            value = fn()
        return value, (time.perf_counter() - start) / repeats

    xs, sparsify_s = timed(lambda: qt.topk_sparsify(x, k))
    y, gemv_s = timed(lambda: qt.sparse_gemv(xs, w_t))
    _, dense_s = timed(lambda: F.linear(x, w))
    ok = bool(torch.equal(xs, qt.topk_sparsify_reference(x, k)))
    err = (y - qt.sparse_gemv_reference(xs, w_t)).abs().max().item()
    read = (xs != 0).any(0).float().mean().item()
    weight_bytes = out_f * in_f * 4
    row = {"out_features": out_f, "in_features": in_f, "dtype": "float32", "tokens": tokens,
           "sparsity": s, "k": k, "sparsify_kernel": "topk", "dense_us": dense_s * 1e6,
           "gemv_us": gemv_s * 1e6, "sparsify_us": sparsify_s * 1e6, "rmsnorm_us": 0.0,
           "gemv_speedup": dense_s / gemv_s, "step_speedup": dense_s / (sparsify_s + gemv_s),
           "read_fraction": read, "dense_GBps": weight_bytes / dense_s / 1e9,
           "gemv_GBps": read * weight_bytes / gemv_s / 1e9, "gemv_max_abs_err": err,
           "sparsify_equal_reference": ok, "gemv_of_peak": None, "gemv_of_measured": None}
    print(f"interpreter: sparsify {sparsify_s * 1e3:.1f} ms, gemv {gemv_s * 1e3:.1f} ms, "
          f"max err {err:.1e}, sparsify equal reference: {ok}", flush=True)
    result = {"timing": "CPU dry run: Triton's interpreter, perf_counter (not a speed)",
              "rows": [row]}
    if not ok or err > 1e-5:
        result.update(status="failed", error=f"sparsify equal reference {ok}, gemv err {err}")
    return result


# --- 4. end-to-end decode ------------------------------------------------------------------

def weight_bytes_per_token(model, sparsity: float | None) -> float:
    """Weight bytes one decode step reads: projections ``k/D`` of their rows at ``sparsity``
    (the head dense), norms whole, one embedding row."""
    import torch

    from qsparse_compile.config import QSparseConfig, topk_count

    config = QSparseConfig(sparsity=sparsity)
    head = model.get_output_embeddings()
    total, seen = 0.0, set()
    for path, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            seen.add(id(module.weight))
            size = module.weight.numel() * module.weight.element_size()
            plan = config.plan_for(path, "head" if module is head else None)
            D = module.in_features
            k = D if plan.method is None or sparsity is None else topk_count(D, plan.sparsity)
            total += size * k / D
    for name, param in model.named_parameters():
        if id(param) not in seen:
            seen.add(id(param))
            rows = param.shape[1] if param.dim() == 2 and "embed" in name else param.numel()
            total += rows * param.element_size()
    return total


class Decoder:
    """Greedy decoding with a static cache: prefill by the uncompiled model, then ``steps``
    one-token calls of ``forward`` (compiled or not), on the model's device."""

    def __init__(self, model, prompt, new_tokens: int, cuda: bool):
        self.model, self.prompt, self.new_tokens, self.cuda = model, prompt, new_tokens, cuda

    def run(self, forward, steps: int | None = None, context=contextlib.nullcontext):
        """(generated ids, seconds of the decode loop); ``context()`` is entered after the
        prefill, around the decode steps only."""
        import torch
        from transformers import StaticCache

        device, length = self.prompt.device, self.prompt.shape[1]
        steps = self.new_tokens - 1 if steps is None else steps
        with torch.no_grad():
            cache = StaticCache(config=self.model.config, max_cache_len=length + self.new_tokens)
            out = self.model(input_ids=self.prompt, past_key_values=cache,
                             cache_position=torch.arange(length, device=device), use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens = [token]
            positions = torch.arange(length, length + steps, device=device)
            self._sync()
            start = time.perf_counter()
            with context():
                tokens += self._steps(forward, token, cache, positions, steps)
            self._sync()
            return torch.cat(tokens, dim=1)[0].cpu(), time.perf_counter() - start

    def _steps(self, forward, token, cache, positions, steps):
        import torch

        tokens = []
        for i in range(steps):
                if self.cuda:
                    torch.compiler.cudagraph_mark_step_begin()
                out = forward(input_ids=token, past_key_values=cache,
                              cache_position=positions[i:i + 1], use_cache=True)
                token = out.logits[:, -1].argmax(-1, keepdim=True)
                tokens.append(token)
        return tokens

    def _sync(self):
        import torch

        if self.cuda:
            torch.cuda.synchronize()


def decode(args: argparse.Namespace, cuda: bool) -> dict:
    import warnings

    import torch
    import transformers

    from qsparse_compile.reference import reference_model

    transformers.utils.logging.set_verbosity_error()
    # ``past_key_values=`` is the spelling every transformers the project admits takes
    warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated",
                            category=FutureWarning)
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    shape = LLAMA_7B if cuda else TINY_LLAMA
    layers = args.layers if cuda else 2
    new_tokens = args.new_tokens if cuda else 4
    prompt_len = args.prompt_tokens if cuda else 4
    rounds = args.rounds if cuda else 1
    sparsities = DECODE_SPARSITIES
    config = transformers.LlamaConfig(**shape, num_hidden_layers=layers,
                                      max_position_embeddings=prompt_len + new_tokens + 8,
                                      tie_word_embeddings=False, attn_implementation="sdpa",
                                      bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = transformers.LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)
    prompt = torch.randint(2, shape["vocab_size"], (1, prompt_len),
                           generator=torch.Generator().manual_seed(0)).to(device)
    decoder = Decoder(model, prompt, new_tokens, cuda)
    dense_bytes = weight_bytes_per_token(model, None)

    paths = [("dense inductor", None, {"mode": "reduce-overhead"} if cuda else {})]
    for s in sparsities:
        options = {"sparsity": s, **({"cudagraphs": True} if cuda else {})}
        paths.append((f"qsparse {s}", s, {"backend": "qsparse", "options": options}))
    results = []
    for label, s, kwargs in paths:
        torch._dynamo.reset()
        print(f"{label}: compiling ({kwargs})", flush=True)
        forward = torch.compile(model.forward, dynamic=False, fullgraph=True, **kwargs)
        start = time.perf_counter()
        decoder.run(forward, steps=3)  # compile, warm up, record the CUDA graphs
        compile_s = time.perf_counter() - start
        times, tokens = [], None
        for _ in range(rounds):
            tokens, seconds = decoder.run(forward)
            times.append(seconds)
        if s is None:
            reference = decoder.run(model.forward)[0]
        else:
            reference = decoder.run(model.forward, context=lambda s=s: reference_model(
                model, sparsity=s))[0]
        equal = int((tokens == reference).sum())
        first_diff = next((i for i, (a, b) in enumerate(zip(tokens.tolist(), reference.tolist(),
                                                            strict=True)) if a != b), None)
        tps = (new_tokens - 1) / statistics.median(times)
        limit = dense_bytes / weight_bytes_per_token(model, s)
        results.append({"path": label, "sparsity": s, "cudagraphs": cuda,
                        "tokens_per_s": tps, "times_s": times, "compile_s": compile_s,
                        "byte_limit": limit, "weight_bytes_per_token": dense_bytes / limit,
                        "tokens_equal_reference": f"{equal}/{len(tokens)}",
                        "first_difference": first_diff})
        print(f"{label}: {tps:.1f} tokens/s (limit {limit:.2f}x), tokens equal to the eager "
              f"reference {equal}/{len(tokens)}, compile+warm-up {compile_s:.1f} s", flush=True)
    for r in results:
        r["vs_dense"] = r["tokens_per_s"] / results[0]["tokens_per_s"]
    name = "Llama-7B-shaped" if cuda else "tiny Llama (hidden 64)"
    note = (f"prompt {prompt_len} tokens (prefill: the uncompiled model), {new_tokens} new "
            f"tokens, {rounds} round(s), median; ")
    note += ("CUDA graphs: mode='reduce-overhead' (dense), cudagraphs=True (qsparse)" if cuda
             else "CPU dry run: no CUDA graphs (Inductor captures none on the CPU; the option "
                  "is not passed)")
    return {"model": f"{name} LlamaForCausalLM, {layers} layers, {str(dtype)[6:]}, random "
                     f"weights, StaticCache, greedy", "note": note, "paths": results}


# --- main ----------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    # before anything imports Triton: its language module reads the variable at import
    if args.cpu_dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        os.environ["TRITON_INTERPRET"] = "0"
    os.environ.setdefault("QSPARSE_CACHE_DIR", str(args.out / "kernel-cache"))
    import torch

    cuda = torch.cuda.is_available() and not args.cpu_dry_run
    report = Report(args.out, args.cpu_dry_run)
    if not cuda and not args.cpu_dry_run:
        report.step("environment", {**environment(), "status": "failed",
                                    "error": "no CUDA device; use --cpu-dry-run on the CPU"})
        print("no CUDA device is available: run with --cpu-dry-run on a CPU machine",
              flush=True)
        return 1
    sys.path.insert(0, str(ROOT))
    _guarded(report, "environment", environment)
    if "tests" not in args.skip:
        _guarded(report, "tests", tests, args, cuda)
    if "gemv" not in args.skip:
        _guarded(report, "gemv", gemv_cuda if cuda else gemv_cpu, args)
    if "decode" not in args.skip:
        _guarded(report, "decode", decode, args, cuda)
    failures = report.data["failures"]
    print(f"\nwrote {args.out / 'gpu_suite.json'} and {args.out / 'gpu_suite.md'}; "
          f"failures: {', '.join(failures) or 'none'}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
