"""Pieces every rendered Triton module shares: dtypes, bit-exact conversions, version guards.

Every kernel handles its floating-point data as **bit patterns in int32 registers** (the 16 bits
of an fp16/bf16 value zero-extended; the 32 bits of an fp32 value reinterpreted) and converts to
float32 only where it does arithmetic. Three reasons:

* the top-K key *is* the bit pattern (``|x|`` read as an integer orders like ``|x|``), and a
  kept value is stored bit for bit, so ``-0.0``, infinities and NaN payloads survive untouched;
* bf16 is rounded to nearest-even by integer arithmetic written out here, so the result does not
  depend on how a given Triton version (or its CPU interpreter, which truncates) converts;
* the same source runs under ``TRITON_INTERPRET=1`` on the CPU, where the tests check it.

Version guards: the precise ``sqrt_rn``/``div_rn`` (IEEE round-to-nearest; Triton's ``/`` on fp32
is an approximate division on NVIDIA GPUs) are used when the installed Triton has them; the
rendered text records which spelling was used, so the cache key follows the installed version.
"""

from __future__ import annotations

import dataclasses
import textwrap

import torch
import triton.language as tl

__all__ = [
    "DTYPE_NAMES",
    "DTYPES",
    "KernelDtype",
    "dtype_info",
    "next_pow2",
    "module_header",
    "dtype_helpers",
    "SQRT_RN",
    "DIV_RN",
    "Code",
]


@dataclasses.dataclass(frozen=True)
class KernelDtype:
    """What a template needs to know about one element type.

    Attributes:
        name: short name used in kernel and helper names (``fp32``, ``fp16``, ``bf16``).
        torch: the torch dtype.
        tl: the ``triton.language`` dtype spelled as source text.
        bits: storage width.
        abs_mask: the bit pattern with every bit but the sign set (largest key, used for NaN).
        inf_bits: the bit pattern of ``+inf``; a magnitude key above it is a NaN.
    """

    name: str
    torch: torch.dtype
    tl: str
    bits: int
    abs_mask: int
    inf_bits: int

    @property
    def key_bits(self) -> int:
        """Bits of the magnitude key: the bisection over the key takes this many steps."""
        return self.bits - 1


DTYPES: dict[torch.dtype, KernelDtype] = {
    torch.float32: KernelDtype("fp32", torch.float32, "tl.float32", 32, 0x7FFFFFFF, 0x7F800000),
    torch.float16: KernelDtype("fp16", torch.float16, "tl.float16", 16, 0x7FFF, 0x7C00),
    torch.bfloat16: KernelDtype("bf16", torch.bfloat16, "tl.bfloat16", 16, 0x7FFF, 0x7F80),
}
DTYPE_NAMES = {d.name: d for d in DTYPES.values()}


def dtype_info(dtype: torch.dtype, op: str) -> KernelDtype:
    """The kernel description of ``dtype``; ``TypeError`` naming ``op`` if it is unsupported."""
    info = DTYPES.get(dtype)
    if info is None:
        allowed = ", ".join(str(d).replace("torch.", "") for d in DTYPES)
        raise TypeError(
            f"qsparse_triton.{op}: dtype {str(dtype).replace('torch.', '')} has no Triton "
            f"kernel; allowed: {allowed}"
        )
    return info


def next_pow2(n: int) -> int:
    """The smallest power of two ``>= n`` (1 for ``n <= 1``): Triton block shapes need one."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


#: Correctly rounded square root and division where this Triton has them (see module docstring).
SQRT_RN = "tl.sqrt_rn" if hasattr(tl, "sqrt_rn") else "tl.sqrt"
DIV_RN = "tl.math.div_rn" if hasattr(tl.math, "div_rn") else None


def div_rn(a: str, b: str) -> str:
    """Source text of ``a / b`` rounded to nearest (or plain ``/`` on a Triton without it)."""
    return f"{DIV_RN}({a}, {b})" if DIV_RN else f"(({a}) / ({b}))"


def module_header(doc: str) -> str:
    """The first lines of a rendered module: its docstring and imports."""
    return f'"""{doc}"""\n\nimport triton\nimport triton.language as tl\n'


_HELPERS = {
    "fp32": '''
        @triton.jit
        def load_bits_fp32(ptr, offs, valid):
            """fp32 values at ``ptr + offs`` as int32 bit patterns (0 where not valid)."""
            return tl.load(ptr + offs, mask=valid, other=0.0).to(tl.int32, bitcast=True)


        @triton.jit
        def store_bits_fp32(ptr, offs, bits, valid):
            tl.store(ptr + offs, bits.to(tl.float32, bitcast=True), mask=valid)


        @triton.jit
        def f32_of_fp32(bits):
            return bits.to(tl.float32, bitcast=True)


        @triton.jit
        def fp32_of_f32(v):
            return v.to(tl.int32, bitcast=True)
        ''',
    "fp16": '''
        @triton.jit
        def load_bits_fp16(ptr, offs, valid):
            """fp16 values as zero-extended 16-bit patterns in int32 (0 where not valid)."""
            raw = tl.load(ptr + offs, mask=valid, other=0.0).to(tl.int16, bitcast=True)
            return raw.to(tl.int32) & 0xFFFF


        @triton.jit
        def store_bits_fp16(ptr, offs, bits, valid):
            tl.store(ptr + offs, bits.to(tl.int16).to(tl.float16, bitcast=True), mask=valid)


        @triton.jit
        def f32_of_fp16(bits):
            return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


        @triton.jit
        def fp16_of_f32(v):
            # fp32 -> fp16 rounds to nearest even both on GPUs and in the interpreter (numpy)
            return v.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        ''',
    "bf16": '''
        @triton.jit
        def load_bits_bf16(ptr, offs, valid):
            """bf16 values as zero-extended 16-bit patterns in int32 (0 where not valid)."""
            raw = tl.load(ptr + offs, mask=valid, other=0.0).to(tl.int16, bitcast=True)
            return raw.to(tl.int32) & 0xFFFF


        @triton.jit
        def store_bits_bf16(ptr, offs, bits, valid):
            tl.store(ptr + offs, bits.to(tl.int16).to(tl.bfloat16, bitcast=True), mask=valid)


        @triton.jit
        def f32_of_bf16(bits):
            # a bf16 is the top half of the fp32 with the same value: exact
            return (bits << 16).to(tl.float32, bitcast=True)


        @triton.jit
        def bf16_of_f32(v):
            """fp32 -> bf16 bits, round to nearest even, NaN -> quiet NaN (as torch rounds)."""
            u = v.to(tl.int32, bitcast=True)
            mag = u & 0x7FFFFFFF
            # clamp NaN payloads first so the rounding add cannot overflow int32
            safe = tl.minimum(mag, 0x7F800000)
            rounded = (safe + (0x7FFF + ((safe >> 16) & 1))) >> 16
            bits = rounded | ((u >> 16) & 0x8000)
            return tl.where(mag > 0x7F800000, 0x7FC0, bits)
        ''',
}


def dtype_helpers(*names: str) -> str:
    """Source of the load/store/convert helpers of the dtypes ``names`` (each once)."""
    seen: list[str] = []
    for name in names:
        if name not in seen:
            seen.append(name)
    return "".join(textwrap.dedent(_HELPERS[name]) for name in seen)


class Code:
    """A tiny indented-source builder: templates read top to bottom like the code they emit."""

    def __init__(self) -> None:
        self._lines: list[str] = []
        self._depth = 0

    def __call__(self, *lines: str) -> Code:
        for text in lines:
            if not text.strip():
                self._lines.append("")
                continue
            for line in textwrap.dedent(text).strip("\n").splitlines():
                self._lines.append(("    " * self._depth + line) if line.strip() else "")
        return self

    def indent(self) -> None:
        """Indent the following lines one level (until :meth:`dedent`)."""
        self._depth += 1

    def dedent(self) -> None:
        self._depth -= 1

    def block(self) -> _Indent:
        """Context manager indenting the lines emitted inside it by one level."""
        return _Indent(self)

    def text(self) -> str:
        return "\n".join(self._lines) + "\n"


class _Indent:
    def __init__(self, code: Code) -> None:
        self.code = code

    def __enter__(self) -> Code:
        self.code._depth += 1
        return self.code

    def __exit__(self, *exc: object) -> None:
        self.code._depth -= 1
