"""Inputs and comparisons shared by the Triton kernel tests (small shapes: the interpreter is slow).

Tensors are built on :data:`DEVICE` (``QSPARSE_TEST_DEVICE``: ``cpu``, the default, with Triton's
interpreter, or ``cuda``): values are drawn on the CPU (seeded) and moved, so they are the same on
either device.

Shapes: widths D of 1, odd and non-power-of-two values (7, 24, 100) and small random ones; 1 to
5 rows, some of them all zero. Values: either drawn from a tiny set (so the tie-break decides
most masks) or mixed with spread-out finite values and, where a test allows, +-inf, NaN and
-0.0.
"""

from __future__ import annotations

import math

import torch
from devices import selected_device
from hypothesis import strategies as st

#: The device of every tensor the kernel tests build (validated; ``cuda`` only where available).
DEVICE = selected_device()

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

TIES = (-2.0, -1.0, 0.0, 1.0, 2.0)
SPECIALS = (math.nan, math.inf, -math.inf, -0.0)
WIDTHS = (1, 7, 24, 100)

_INT_OF_WIDTH = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def dtype_id(dtype: torch.dtype) -> str:
    return DTYPE_IDS[dtype]


def widths(multiple_of: int = 1, max_d: int = 100) -> st.SearchStrategy[int]:
    """D: the named awkward widths often, otherwise any small width (multiples of ``m``)."""
    if multiple_of == 1:
        return st.one_of(st.sampled_from(WIDTHS), st.integers(1, 40))
    return st.integers(1, max(1, max_d // multiple_of)).map(lambda g: g * multiple_of)


def _values(special: bool) -> st.SearchStrategy[float]:
    spread = st.tuples(
        st.floats(2.0**-10, 1024.0, allow_nan=False, allow_infinity=False, width=32),
        st.booleans(),
    ).map(lambda t: -t[0] if t[1] else t[0])
    options = [st.sampled_from(TIES), spread]
    if special:
        options.append(st.sampled_from(SPECIALS))
    return st.one_of(*options)


@st.composite
def rows_of(draw, dtype: torch.dtype, d: int, *, special: bool = True, max_rows: int = 5,
            palette: str | None = None) -> torch.Tensor:
    """A ``[rows, d]`` tensor of ``dtype`` on :data:`DEVICE`; values rounded once from float32."""
    rows = draw(st.integers(1, max_rows))
    palette = palette or draw(st.sampled_from(("ties", "mixed")))
    values = st.sampled_from(TIES) if palette == "ties" else _values(special)
    flat = draw(st.lists(values, min_size=rows * d, max_size=rows * d))
    x = torch.tensor(flat, dtype=torch.float32).reshape(rows, d)
    for r in draw(st.lists(st.integers(0, rows - 1), max_size=2)):
        x[r] = 0.0
    return x.to(dtype).to(DEVICE)


def randn(*shape: int, dtype: torch.dtype = torch.float32,
          generator: torch.Generator | None = None) -> torch.Tensor:
    """``torch.randn`` drawn on the CPU (seeded by ``generator``), rounded to ``dtype``, on
    :data:`DEVICE`: the same values whichever device the tests run on."""
    return torch.randn(*shape, generator=generator).to(dtype).to(DEVICE)


def on_device(t: torch.Tensor) -> torch.Tensor:
    """``t`` (built on the CPU) moved to :data:`DEVICE`."""
    return t.to(DEVICE)


def cpu_reference(fn, *args, **kwargs):
    """``fn`` applied to CPU copies of its tensor arguments; its tensor results on :data:`DEVICE`.

    The references run on the CPU whatever the test device, so a CUDA run compares its kernels
    with exactly the values the interpreter run compares with (the bounds here were derived
    against PyTorch's CPU kernels, e.g. its LayerNorm's cancellation and its summation order).
    """
    from torch.utils._pytree import tree_map

    def cpu(v):
        return v.cpu() if isinstance(v, torch.Tensor) else v

    def back(v):
        return v.to(DEVICE) if isinstance(v, torch.Tensor) else v

    return tree_map(back, fn(*tree_map(cpu, args), **tree_map(cpu, kwargs)))


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(_INT_OF_WIDTH[t.element_size()])


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Same dtype and shape; NaN exactly where expected; every other value bit for bit.

    Bit equality also tells ``-0.0`` from ``0.0`` (a kept ``-0.0`` stays ``-0.0``); NaN
    payloads are not compared (PyTorch's own CPU kernels produce different ones).
    """
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    nan_a, nan_e = torch.isnan(actual), torch.isnan(expected)
    assert torch.equal(nan_a, nan_e), f"NaN positions differ:\n{actual}\n{expected}"
    a = torch.where(nan_a, 0, bits(actual))
    e = torch.where(nan_e, 0, bits(expected))
    bad = (a != e).nonzero()
    assert len(bad) == 0, (
        f"{len(bad)} value(s) differ, first at {tuple(bad[0].tolist())}: "
        f"{actual[tuple(bad[0])]} vs {expected[tuple(bad[0])]}"
    )


def ulp(dtype: torch.dtype) -> float:
    """Relative size of one unit in the last place of ``dtype``."""
    return torch.finfo(dtype).eps


def assert_close_ulps(actual: torch.Tensor, expected: torch.Tensor, ulps: float = 1.0,
                      atol: torch.Tensor | float = 0.0) -> None:
    """``|a - e| <= ulps * eps(dtype) * |e| + atol``, NaN where expected, same dtype/shape.

    The kernels compute rescale factors and norms with sums in another order than PyTorch and
    round once to the dtype, so a result may sit one rounding away from the reference.
    """
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    nan_a, nan_e = torch.isnan(actual), torch.isnan(expected)
    assert torch.equal(nan_a, nan_e), "NaN positions differ"
    a = torch.where(nan_a, 0, actual).double()
    e = torch.where(nan_e, 0, expected).double()
    inf = torch.isinf(e)
    assert torch.equal(a[inf], e[inf]), "infinities differ"
    a, e = torch.where(inf, 0, a), torch.where(inf, 0, e)
    bound = ulps * ulp(actual.dtype) * e.abs() + atol + 1e-30
    err = (a - e).abs()
    worst = int(torch.argmax(err - bound))
    assert bool((err <= bound).all()), (
        f"error {err.flatten()[worst].item()} > bound {bound.flatten()[worst].item()} at "
        f"flat index {worst}: {a.flatten()[worst].item()} vs {e.flatten()[worst].item()}"
    )
