"""Template of the decode sparse GEMV: ``y = x_s @ Wt (+ b)`` for 1-8 tokens, skipping zeros.

``Wt = W^T`` is stored K-major (``[in_features, out_features]`` contiguous), so the weights that
multiply one activation feature are one contiguous run of a row of ``Wt``. A program owns
``BN`` output columns and walks its share of the ``K`` rows in tiles of ``BK``; for each tile it
loads the ``[tokens, BK]`` activations, marks the features that are non-zero for *any* token
(the union of the rows' masks, as CATS / Deja Vu do for small batches) and loads only those
rows of ``Wt`` (a masked load: a masked-off lane issues no memory request, so each zeroed
feature skips ``BN`` contiguous weights). Products accumulate in fp32 in a ``[T, BK, BN]``
register tile with plain FMAs and are reduced over ``BK`` once, after the loop: no reduction
(no shuffle, no barrier) inside the loop, so the loop is nothing but loads and FMAs, which is
what a memory-bound GEMV wants. (``tl.dot`` would need the token dimension padded to 16 and
fp32 inputs would drop to TF32 or to FMAs anyway.)

Parallelism and reduction (the choice the issue asks to justify): decode has 64-172 column
blocks for Llama-7B shapes, fewer than two programs per SM on an H100, so ``K`` is split into
``SPLIT`` ranges. Each split writes its fp32 partial sums to a workspace ``[SPLIT, T, N]`` and
a second, tiny kernel (:mod:`.split_reduce_template`) adds them **in a fixed order**, adds the
bias and rounds once to the output dtype. Compared with fp32 atomics into a zeroed buffer this
needs no memset launch, never uses fp16/bf16 atomics, and is deterministic (bitwise the same
result on every run, whatever the scheduling), at the cost of ``SPLIT * T * N * 4`` workspace
bytes (under 1 % of the weight bytes for Llama shapes). With ``SPLIT == 1`` the GEMV writes
``y`` itself (one launch).
"""

from __future__ import annotations

import dataclasses

from .split_reduce_template import render_split_reduce, render_tile_store
from .template_common import DTYPE_NAMES, Code, dtype_helpers, module_header

__all__ = ["GemvSpec", "render", "GEMV_KERNEL", "REDUCE_KERNEL"]

GEMV_KERNEL = "gemv_kernel"
REDUCE_KERNEL = "reduce_kernel"


@dataclasses.dataclass(frozen=True)
class GemvSpec:
    """One specialisation of the GEMV; every field is baked into the rendered source.

    Attributes:
        dtype: element type of ``x``, ``Wt``, ``b`` and ``y`` (``fp32``, ``fp16``, ``bf16``).
        k: in_features (rows of ``Wt``).
        n: out_features (columns of ``Wt``).
        tokens_block: power of two ``>=`` the tokens of one launch (at most 8).
        block_k: rows of ``Wt`` per tile.
        block_n: output columns per program.
        k_split: rows of ``Wt`` per split (a multiple of ``block_k``).
        splits: number of K ranges (grid dimension 1).
        has_bias: add a bias vector.
        reduce_block: outputs per program of the split reduction.
    """

    dtype: str
    k: int
    n: int
    tokens_block: int
    block_k: int
    block_n: int
    k_split: int
    splits: int
    has_bias: bool
    reduce_block: int

    def __post_init__(self) -> None:
        assert self.dtype in DTYPE_NAMES
        for b in (self.tokens_block, self.block_k, self.block_n, self.reduce_block):
            assert b >= 1 and b & (b - 1) == 0, b
        assert self.k_split % self.block_k == 0 and self.splits * self.k_split >= self.k

    @property
    def name(self) -> str:
        bias = "_bias" if self.has_bias else ""
        return (f"qs_gemv_{self.dtype}_k{self.k}_n{self.n}_t{self.tokens_block}_"
                f"bk{self.block_k}_bn{self.block_n}_s{self.splits}{bias}")


def render(spec: GemvSpec) -> str:
    """The Python source of the GEMV module for ``spec`` (and its split reduction)."""
    s = spec
    dt = DTYPE_NAMES[s.dtype]
    c = Code()
    c(module_header(f"Rendered sparse GEMV {s.name} (see qsparse_compile.codegen.triton."
                    f"gemv_template)."), "", "")
    c(dtype_helpers(s.dtype), "", "")
    params = ["x_ptr", "wt_ptr"] + (["b_ptr"] if s.has_bias else []) + ["y_ptr", "tokens",
                                                                       "stride_xt"]
    c(f"@triton.jit\ndef {GEMV_KERNEL}({', '.join(params)}):")
    with c.block():
        target = ("y [tokens, N]" if s.splits == 1
                  else "fp32 partial sums ws [SPLIT, tokens, N] (y_ptr)")
        c(f'''
            """x [tokens, {s.k}] (token stride ``stride_xt``) @ Wt [{s.k}, {s.n}] -> {target}."""
            pid_n = tl.program_id(0)
            pid_k = tl.program_id(1)
            cols = pid_n * {s.block_n} + tl.arange(0, {s.block_n})
            col_ok = cols < {s.n}
            t = tl.arange(0, {s.tokens_block})
            t_ok = t < tokens
            acc = tl.zeros([{s.tokens_block}, {s.block_k}, {s.block_n}], dtype=tl.float32)
            k_lo = pid_k * {s.k_split}
            for k0 in range(0, {s.k_split}, {s.block_k}):
                feats = k_lo + k0 + tl.arange(0, {s.block_k})
                feat_ok = feats < {s.k}
                xb = load_bits_{s.dtype}(x_ptr, t[:, None] * stride_xt + feats[None, :],
                                      t_ok[:, None] & feat_ok[None, :])
                # a feature is read when any token needs it; -0.0 counts as zero (bits)
                live = tl.max((xb & {hex(dt.abs_mask)}).to(tl.int32), 0) != 0
                rows = feats.to(tl.int64)[:, None] * {s.n}
                wb = load_bits_{s.dtype}(wt_ptr, rows + cols[None, :],
                                      live[:, None] & col_ok[None, :])
                acc += f32_of_{s.dtype}(xb)[:, :, None] * f32_of_{s.dtype}(wb)[None, :, :]
            y = tl.sum(acc, 1)
            ok = t_ok[:, None] & col_ok[None, :]
        ''')
        render_tile_store(c, s.dtype, s.n, s.splits, s.has_bias)
    c("", "")

    if s.splits > 1:
        render_split_reduce(c, REDUCE_KERNEL, s.dtype, s.n, s.splits, s.has_bias,
                            s.reduce_block)
    return c.text()
