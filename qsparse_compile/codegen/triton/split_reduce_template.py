"""Template of the split-K reduction the decode GEMVs share: ``y = sum_s ws[s] (+ b)``.

A GEMV whose ``K`` rows are cut into ``SPLIT`` ranges (:func:`.gemv.k_splits`) writes each
range's fp32 partial sums to a workspace ``ws [SPLIT, tokens, N]``; this second, tiny kernel
adds them **in split order** (deterministic: the same bits on every run, whatever the
scheduling), adds the bias and rounds once to the output dtype. The dense GEMV
(:mod:`.gemv_template`) and the packed one (:mod:`.packed_gemv_template`) render it into their
modules, so both reduce alike.
"""

from __future__ import annotations

from .template_common import Code

__all__ = ["render_split_reduce", "render_tile_store"]


def render_tile_store(c: Code, dtype: str, n: int, splits: int, has_bias: bool) -> None:
    """Append the end of a GEMV tile: with one split, add the bias and store ``y`` rounded to
    ``dtype``; with several, store ``y``'s fp32 partial sums to the workspace for
    :func:`render_split_reduce`. Expects ``y``, ``t``, ``cols``, ``col_ok``, ``ok`` and
    ``pid_k`` in scope, as both GEMVs have them."""
    if splits == 1:
        if has_bias:
            c(f"y += f32_of_{dtype}(load_bits_{dtype}(b_ptr, cols, col_ok))[None, :]")
        c(f"store_bits_{dtype}(y_ptr, t[:, None] * {n} + cols[None, :], {dtype}_of_f32(y), ok)")
    else:
        c(f"offs = (pid_k * tokens + t[:, None]).to(tl.int64) * {n} + cols[None, :]",
          "tl.store(y_ptr + offs, y, mask=ok)")


def render_split_reduce(c: Code, name: str, dtype: str, n: int, splits: int, has_bias: bool,
                        reduce_block: int) -> None:
    """Append the reduction kernel ``name`` to ``c``.

    Args:
        c: the module being rendered (it must already hold ``dtype``'s helpers).
        name: the kernel's function name.
        dtype: the output (and bias) element type name (``fp32``, ``fp16``, ``bf16``).
        n: output columns ``N`` (the workspace's last dimension).
        splits: number of K ranges, the workspace's first dimension.
        has_bias: add a bias vector of ``N`` entries.
        reduce_block: outputs per program (a power of two).

    The kernel's arguments: ``ws_ptr``, ``b_ptr`` (with a bias), ``y_ptr``, ``tokens``; its
    grid: ``ceil(tokens * N / reduce_block)`` programs.
    """
    params = ["ws_ptr"] + (["b_ptr"] if has_bias else []) + ["y_ptr", "tokens"]
    c(f"@triton.jit\ndef {name}({', '.join(params)}):")
    with c.block():
        c(f'''
            """y[i] = sum over the {splits} splits of ws[s, i] (in split order) + bias."""
            start = tl.program_id(0).to(tl.int64) * {reduce_block}
            offs = start + tl.arange(0, {reduce_block})
            total = tokens * {n}
            ok = offs < total
            y = tl.zeros([{reduce_block}], dtype=tl.float32)
            for split in tl.static_range({splits}):
                y += tl.load(ws_ptr + split * total + offs, mask=ok, other=0.0)
        ''')
        if has_bias:
            c(f"y += f32_of_{dtype}(load_bits_{dtype}(b_ptr, offs % {n}, ok))")
        c(f"store_bits_{dtype}(y_ptr, offs, {dtype}_of_f32(y), ok)")
    c("", "")
