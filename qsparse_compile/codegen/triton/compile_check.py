"""Compile rendered kernels for a CUDA target ahead of time, on a machine without a GPU.

The CPU interpreter runs a kernel's Python with numpy and accepts code the GPU compiler rejects
(type mismatches in ``tl.where``, loop-carried values that change type, pointer types). This
tool lowers representative specialisations (Llama-7B widths, every template branch, the
packed GEMV in every weight format) through Triton's full pipeline to a cubin with the
``ptxas`` bundled in the Triton wheel, and prints each kernel's register, stack and
local-memory use::

    python -m qsparse_compile.codegen.triton.compile_check [--arch 90] [--quick]

Exit status: 0 when everything compiled, 1 when a kernel failed to compile, 77 when this
installation cannot compile without a device (no NVIDIA backend, no bundled ``ptxas``, an
ahead-of-time API this tool does not know, or ``TRITON_INTERPRET`` set).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

UNSUPPORTED = 77

_TYPE = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}


#: One kernel to compile: module name, source renderer, entry point, signature, warps.
Case = tuple[str, Callable[[], str], str, dict[str, str], int]


def _row_cases(quick: bool) -> Iterator[Case]:
    from .row_kernel import row_config
    from .row_template import KERNEL_NAME, RowSpec, render

    def spec(dtype, d, k=0, n=0, m=0, norm="none", w=None, b=None, rescale=False, quant=False,
             vals=True, mask=False, out=None):
        cfg = row_config(d, n, m, k)
        s = RowSpec(dtype, out or dtype, d, k, n, m, norm, w, b, 1e-6, rescale, quant, vals,
                    mask, cfg.chunk, cfg.select, cfg.rows)
        sig = {"x_ptr": "*" + _TYPE[dtype]}
        if w:
            sig["w_ptr"] = "*" + _TYPE[w]
        if b:
            sig["b_ptr"] = "*" + _TYPE[b]
        if vals:
            sig["out_ptr"] = "*" + _TYPE[s.out_dtype]
        if mask:
            sig["mask_ptr"] = "*i1"
        sig["stride_x"] = "i64"
        sig["n_rows"] = "i32"
        return s.name, lambda: render(s), KERNEL_NAME, sig, cfg.num_warps

    yield spec("bf16", 4096, k=2048, mask=True)
    yield spec("bf16", 4096, n=2, m=4)
    yield spec("bf16", 4096, k=2048, norm="rms", w="bf16", rescale=True, quant=True, mask=True)
    yield spec("fp16", 96, k=40, norm="layer", w="fp16", b="fp16", rescale=True, quant=True)
    if quick:
        return
    yield spec("bf16", 4096, k=2048, vals=False, mask=True)
    yield spec("fp16", 11008, k=4403, rescale=True, quant=True)
    yield spec("fp32", 4096, k=1638, rescale=True)
    yield spec("bf16", 4096, k=2048, norm="rms", w="fp32", out="fp32")
    yield spec("fp16", 4096, k=2048, norm="layer", w="fp16", b="fp16", quant=True)
    yield spec("bf16", 32768, k=16384, rescale=True, quant=True, mask=True)
    yield spec("bf16", 4096, n=2, m=4, vals=False, mask=True)
    yield spec("fp16", 4096, n=16, m=32, rescale=True, quant=True)
    yield spec("bf16", 4096, n=4, m=4)
    yield spec("bf16", 65536, n=2, m=4, norm="rms", w="bf16", rescale=True)


def _gemv_cases(quick: bool) -> Iterator[Case]:
    import torch

    from .gemv import REDUCE_BLOCK, WARPS, gemv_config
    from .gemv_template import GEMV_KERNEL, REDUCE_KERNEL, GemvSpec, render
    from .template_common import DTYPES, next_pow2

    dtypes = (torch.bfloat16,) if quick else (torch.bfloat16, torch.float16, torch.float32)
    shapes = ((4096, 4096),) if quick else ((4096, 4096), (4096, 11008), (11008, 4096))
    for dtype in dtypes:
        name = DTYPES[dtype].name
        for k, n in shapes:
            for tokens in (1, 8):
                cfg = gemv_config(k, n, tokens, dtype)
                s = GemvSpec(name, k, n, next_pow2(tokens), cfg.block_k, cfg.block_n,
                             cfg.k_split, cfg.splits, True,
                             min(REDUCE_BLOCK, next_pow2(tokens * n)))
                out = name if s.splits == 1 else "fp32"
                sig = {"x_ptr": "*" + name, "wt_ptr": "*" + name, "b_ptr": "*" + name,
                       "y_ptr": "*" + out, "tokens": "i32", "stride_xt": "i64"}
                yield s.name, (lambda s=s: render(s)), GEMV_KERNEL, sig, WARPS
                if s.splits > 1:
                    sig = {"ws_ptr": "*fp32", "b_ptr": "*" + name, "y_ptr": "*" + name,
                           "tokens": "i32"}
                    yield s.name, (lambda s=s: render(s)), REDUCE_KERNEL, sig, WARPS


def _packed_gemv_cases(quick: bool) -> Iterator[Case]:
    import torch

    from . import packed_gemv_template as tpl
    from .gemv import REDUCE_BLOCK, WARPS
    from .packed_gemv import packed_gemv_config, packed_layout
    from .template_common import DTYPES, next_pow2

    dtypes = (torch.bfloat16,) if quick else (torch.bfloat16, torch.float16, torch.float32)
    shapes = ((4096, 4096),) if quick else ((4096, 4096), (4096, 11008), (11008, 4096))
    codes = {"int8": "*i8", "int4": "*u8", "ternary": "*u8"}
    for fmt in ("int8", "int4", "ternary"):
        for dtype in dtypes:
            name = DTYPES[dtype].name
            for k, n in shapes:
                for tokens in (1, 8):
                    cfg = packed_gemv_config(fmt, k, n, tokens)
                    s = tpl.PackedGemvSpec(
                        name, fmt, k, n, packed_layout(fmt, k, n).padded_out, next_pow2(tokens),
                        cfg.block_k, cfg.block_bytes, cfg.k_split, cfg.splits, True,
                        min(REDUCE_BLOCK, next_pow2(tokens * n)))
                    out = name if s.splits == 1 else "fp32"
                    sig = {"x_ptr": "*" + name, "codes_ptr": codes[fmt],
                           "scale_ptr": "*fp16" if fmt == "int4" else "*fp32"}
                    if fmt == "int4":
                        sig["min_ptr"] = "*fp16"
                    sig.update({"b_ptr": "*" + name, "y_ptr": "*" + out, "tokens": "i32",
                                "stride_xt": "i64"})
                    yield s.name, (lambda s=s: tpl.render(s)), tpl.GEMV_KERNEL, sig, WARPS
                    if s.splits > 1 and fmt == "int4" and tokens == 1:  # one of each suffices
                        sig = {"ws_ptr": "*fp32", "b_ptr": "*" + name, "y_ptr": "*" + name,
                               "tokens": "i32"}
                        yield s.name, (lambda s=s: tpl.render(s)), tpl.REDUCE_KERNEL, sig, WARPS


def _resource_usage(cubin: bytes) -> str:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")
    if not os.path.exists(tool):
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=False).stdout
    found = re.search(r"REG:(\d+).*?STACK:(\d+).*?SHARED:(\d+).*?LOCAL:(\d+)", out)
    if not found:
        return ""
    regs, stack, shared, local = found.groups()
    return f"registers {regs}, stack {stack} B, shared {shared} B, local {local} B"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 90")
    parser.add_argument("--quick", action="store_true", help="a few representative kernels")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("compile_check: unset TRITON_INTERPRET (kernels would be interpreted)")
        return UNSUPPORTED
    try:
        import triton
        import triton.backends.nvidia  # noqa: F401
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as exc:
        print(f"compile_check: this Triton cannot compile for CUDA here: {exc}")
        return UNSUPPORTED
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas) and not os.environ.get("TRITON_PTXAS_PATH"):
        print("compile_check: no ptxas bundled with Triton and TRITON_PTXAS_PATH unset")
        return UNSUPPORTED

    from .launch import kernel_module

    target = GPUTarget("cuda", args.arch, 32)
    failures = 0
    cases = [*_row_cases(args.quick), *_gemv_cases(args.quick),
             *_packed_gemv_cases(args.quick)]
    for module_name, render, entry, signature, warps in cases:
        kernel = getattr(kernel_module(module_name, render), entry)
        name = f"{module_name}.{entry}"
        start = time.perf_counter()
        try:
            source = ASTSource(kernel, signature)
        except (TypeError, AttributeError) as exc:
            print(f"compile_check: unknown ahead-of-time API in Triton {triton.__version__}: {exc}")
            return UNSUPPORTED
        try:
            compiled = triton.compile(source, target=target, options={"num_warps": warps})
        except Exception as exc:  # noqa: BLE001 - report every kernel, then fail
            failures += 1
            print(f"FAIL {name}: {type(exc).__name__}: {exc}")
            continue
        usage = _resource_usage(compiled.asm["cubin"]) if "cubin" in compiled.asm else ""
        print(f"ok   {name} (sm_{args.arch}, {warps} warps, "
              f"{time.perf_counter() - start:.1f} s) {usage}")
    print(f"compile_check: {len(cases) - failures}/{len(cases)} kernels compiled "
          f"with Triton {triton.__version__}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
