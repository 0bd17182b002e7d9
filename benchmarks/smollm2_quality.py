"""Quality beside speed: held-out Shakespeare perplexity of SmolLM2-135M for each weight format
and top-K sparsity the decode benchmark times, and llama.cpp's perplexity on the same windows.

``benchmarks/smollm2_decode.py`` measures how fast each configuration decodes; this script says
what each costs in quality. Every row is the pretrained SmolLM2-135M-Instruct (the float32
weights ``qsparse_compile.research.models.smollm2.load_smollm2`` dequantises from the package's
Q4_1 GGUF file), no training, compiled with

    torch.compile(model, backend="qsparse", dynamic=False,
                  options={"sparsity": s, "weights": fmt, "head_weights": hfmt, "inner": "eager"})

(the eager inner compiler computes the same numbers as Inductor at a fraction of the compile
time) and evaluated under ``torch.no_grad()``, with ``torch._dynamo.reset()`` between rows. The
dense fp32 row (no format, sparsity 0) is the model itself, uncompiled. Rows: weights fp32 /
int8 / int4 x top-K sparsity 0 / 0.4 / 0.5 with the output head dense in fp32, then the same
formats with the head in that format too (the head, tied to the embedding, is 21% of the weight
bytes per token, and its format costs quality as well) at sparsity 0 and 0.5.

Windows: exactly those of the SmolLM2 tables in ``docs/RESULTS.md`` (``examples/continue_train.py``
and ``examples/rotated_topk.py``, defaults ``eval_seqs=32``, ``eval_len=256``): the four
held-out plays of ``qsparse_compile.research.data.shakespeare.shakespeare_split()`` as one text,
tokenized by the model's Hugging Face tokenizer (no BOS token), cut into consecutive
non-overlapping windows of 256 tokens, of which 32 are picked evenly spread
(``torch.linspace(0, total - 1, 32)``); 32 x 255 = 8,160 predicted tokens. Perplexity is
``exp`` of the mean next-token negative log-likelihood over all of them (each window predicts
its tokens 1..255 from the ones before; no context across windows). The dense fp32 row
reproduces the docs' dense 41.22 (loss 3.719). ``--quick`` takes 4 windows of 64 tokens (a
smoke test; not comparable with the docs) and fewer rows.

llama.cpp (``llama-cpp-python``, the optional ``anchors`` extra) evaluates the same token ids
(the GGUF file embeds the same vocabulary; the script checks that llama.cpp's own tokenizer
gives the same ids on a sample line) on the same GGUF file: per window ``llm.reset();
llm.eval(ids)``, logits ``llm.scores[:T]``, the NLL of ids 1..T-1 from a float64 log-softmax.
Its weights are the very values our fp32 model holds (Q4_1 projections, Q8_0 embedding/head),
but its products quantise the activations (Q8), so it should sit near the dense fp32 row.
Left out, with a note, when ``llama_cpp`` cannot be imported.

Read the int4 rows with this in mind: our fp32 weights *are* Q4_1 values (a float16 scale and
minimum per 32 consecutive input features), and ``weights="int4"`` has exactly that grouping,
so re-quantising the projections to int4 reproduces them bit for bit: int4 projections cost no
quality on this checkpoint (the int4 rows measure top-K alone) where on weights trained in
floating point they would. int8 (one scale per output channel) does change them, a little. The
head comes from the Q8_0 embedding, which neither format reproduces. The script measures this:
the relative RMS change of the projection and head weights under each format is printed (and
written to the JSON) beside the table.

Weight bytes per token (what a memory-bound decode step reads; the same definition as
``smollm2_decode.py``): a projection of ``[N, D]`` reads ``k = topk_count(D, s)`` of its ``D``
input rows, ``4 N k`` bytes in fp32 or ``PackedLayout(fmt, D, N).read_bytes(k)`` in a packed
format (codes of the kept rows plus every scale, and every minimum for int4), per projection
(the decode kernels' fused q/k/v and gate/up groups pad slightly differently); the head
(576 x 49152, input dense) reads all its rows; the tied embedding is not counted again; norms
and one embedding row are. llama.cpp's bytes are the GGUF tensors' sizes.

    python benchmarks/smollm2_quality.py                    # all rows + llama.cpp
    python benchmarks/smollm2_quality.py --quick            # 4 windows of 64 tokens, 5 rows
    python benchmarks/smollm2_quality.py --json quality.json
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from _records import write_json

import qsparse_compile  # noqa: F401  (registers the qsparse ops and backend)

#: The docs' SmolLM2 evaluation (examples/continue_train.py Settings.eval_seqs / eval_len).
EVAL_SEQS, EVAL_LEN, EVAL_BATCH = 32, 256, 4
QUICK_SEQS, QUICK_LEN, QUICK_BATCH = 4, 64, 4
#: The docs' dense perplexity at EVAL_SEQS x EVAL_LEN (docs/RESULTS.md, section 2).
DOCS_DENSE_PPL = 41.22
SAMPLE_LINE = "ROMEO: But soft, what light through yonder window breaks? It is the east."


@dataclasses.dataclass(frozen=True)
class Row:
    """One configuration: the projections' weight format, the head's, top-K sparsity, the
    activation quantization of the projections' inputs (``quant``, DESIGN.md point 5) and
    whether the head's input takes it too (``quant_head``: the override ``{"lm_head": 0}``,
    as ``smollm2_decode.py --quant-head``)."""

    weights: str | None = None
    head_weights: str | None = None
    sparsity: float = 0.0
    quant: str | None = None
    quant_head: bool = False

    def __post_init__(self) -> None:
        if self.quant_head and self.quant is None:
            raise ValueError("Row(quant_head=True) needs a quant format; got quant=None")

    @property
    def dense(self) -> bool:
        return (self.weights is None and self.head_weights is None and self.sparsity == 0.0
                and self.quant is None)

    @property
    def options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"sparsity": self.sparsity, "weights": self.weights,
                                   "head_weights": self.head_weights}
        if self.quant is not None:
            options["quant"] = self.quant
        if self.quant_head:
            options["overrides"] = {"lm_head": 0.0}
        return options

    @property
    def label(self) -> str:
        quant = f" / quant {self.quant}{' +head' if self.quant_head else ''}" if self.quant else ""
        return (f"{self.weights or 'fp32'} / head {self.head_weights or 'fp32'} / "
                f"s={self.sparsity}{quant}")


def all_rows(quick: bool = False) -> list[Row]:
    """The table's rows; ``quick``: dense, int8 and int4 alone, int4 sparse, int4 + head."""
    if quick:
        return [Row(), Row("int8"), Row("int4"), Row("int4", sparsity=0.5),
                Row("int4", "int4", 0.5)]
    rows = [Row(fmt, None, s) for fmt in (None, "int8", "int4") for s in (0.0, 0.4, 0.5)]
    rows += [Row(fmt, fmt, s) for fmt in ("int8", "int4") for s in (0.0, 0.5)]
    # int8 activations, the integer kernels' precondition: projections alone, then the head too
    rows += [Row("int4", "int4", 0.5, "int8"), Row("int4", "int4", 0.5, "int8", True)]
    return rows


# --- data ---------------------------------------------------------------------------------


def validation_ids(tokenizer) -> torch.Tensor:
    """The held-out plays as one text, tokenized (no BOS), as ``TokenData.validation`` does."""
    from qsparse_compile.research.data.shakespeare import shakespeare_split

    tokenizer.model_max_length = 1 << 30  # whole plays: no "sequence too long" warning
    text = shakespeare_split().validation
    return torch.tensor(tokenizer(text, return_attention_mask=False)["input_ids"])


def eval_windows(ids: torch.Tensor, count: int, length: int) -> torch.Tensor:
    """``count`` non-overlapping windows of ``length`` tokens evenly spread over ``ids``
    (``examples/continue_train.py``'s ``TokenData.eval_windows``)."""
    total = len(ids) // length
    if count > total:
        raise ValueError(f"only {total} windows of {length} tokens in {len(ids)} tokens")
    picks = torch.linspace(0, total - 1, count).long()
    return ids[: total * length].view(total, length)[picks]


# --- evaluation ---------------------------------------------------------------------------


def nll_sum(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Summed next-token negative log-likelihood of ``ids[:, 1:]`` (fp32, as the docs)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                           ids[:, 1:].reshape(-1), reduction="sum").item()


def summary(total: float, count: int) -> dict[str, float]:
    loss = total / count
    return {"nll": loss, "ppl": math.exp(loss), "tokens": count}


def evaluate(model: torch.nn.Module, windows: torch.Tensor, batch: int) -> dict[str, float]:
    """Mean NLL (nats/token) and perplexity of ``model`` over ``windows``."""
    total, count = 0.0, 0
    with torch.no_grad():
        for chunk in windows.split(batch):
            total += nll_sum(model(input_ids=chunk, use_cache=False).logits, chunk)
            count += chunk.shape[0] * (chunk.shape[1] - 1)
    return summary(total, count)


def compile_row(model: torch.nn.Module, row: Row, inner: str = "eager") -> torch.nn.Module:
    """``model`` itself for the dense fp32 row, else compiled through ``backend="qsparse"``."""
    torch._dynamo.reset()  # a fresh compile per configuration
    if row.dense:
        return model
    return torch.compile(model, backend="qsparse", dynamic=False,
                         options={**row.options, "inner": inner})


def weight_bytes(model: torch.nn.Module, row: Row) -> dict[str, float]:
    """Weight bytes read per decoded token in ``row``'s configuration: the decode benchmark's
    count (``smollm2_decode.weight_bytes``, see the module doc)."""
    from smollm2_decode import weight_bytes as decode_bytes

    options = row.options
    b = decode_bytes(model, options.get("sparsity") or 0.0, options.get("weights"),
                     options.get("head_weights"))
    return {"projections": b["projections_sparse"], "head": b["head_sparse"],
            "other": b["other"], "total": b["sparse"]}


def format_error(model: torch.nn.Module, fmt: str) -> dict[str, float]:
    """Relative RMS change ``||Q(W) - W|| / ||W||`` of the projections (all together) and of
    the head under weight format ``fmt`` (the fake quantizers the compiled products use)."""
    from qsparse_compile.ops.quant import int4_weight_fake_quant, int8_weight_fake_quant

    quantize = {"int8": int8_weight_fake_quant, "int4": int4_weight_fake_quant}[fmt]
    head = model.get_output_embeddings()
    sums = {"projections": [0.0, 0.0], "head": [0.0, 0.0]}
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                w = module.weight.float()
                part = sums["head" if module is head else "projections"]
                part[0] += float((quantize(w, -1) - w).square().sum())
                part[1] += float(w.square().sum())
    return {name: math.sqrt(err / max(ref, 1e-30)) for name, (err, ref) in sums.items()}


def run_row(model: torch.nn.Module, row: Row, windows: torch.Tensor, batch: int,
            inner: str = "eager") -> dict[str, Any]:
    """Evaluate one row: its options, perplexity, mean NLL, bytes per token, wall time."""
    start = time.perf_counter()
    result = evaluate(compile_row(model, row, inner), windows, batch)
    torch._dynamo.reset()
    return {"name": row.label, **dataclasses.asdict(row), **result,
            "bytes_per_token": weight_bytes(model, row),
            "wall_s": time.perf_counter() - start}


# --- llama.cpp ----------------------------------------------------------------------------


def llama_cpp_row(path: Path, windows: torch.Tensor, tokenizer, threads: int
                  ) -> dict[str, Any] | None:
    """llama.cpp's perplexity on the same token ids, or None (with a note) without it."""
    try:
        import llama_cpp
    except ImportError as error:
        print(f"llama.cpp row left out ({error}; pip install -e .[anchors])")
        return None
    start = time.perf_counter()
    llm = llama_cpp.Llama(str(path), n_ctx=windows.shape[1] + 8, logits_all=True,
                          n_threads=threads, n_threads_batch=threads, verbose=False)
    ours = tokenizer(SAMPLE_LINE, add_special_tokens=False)["input_ids"]
    theirs = llm.tokenize(SAMPLE_LINE.encode(), add_bos=False)
    total, count = 0.0, 0
    for window in windows.tolist():
        llm.reset()
        llm.eval(window)
        logits = np.asarray(llm.scores[: len(window)], dtype=np.float64)[:-1]
        logits -= logits.max(axis=1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        total -= float(log_probs[np.arange(len(window) - 1), window[1:]].sum())
        count += len(window) - 1
    try:
        from smollm2_decode import gguf_bytes

        gguf = {"total": gguf_bytes(path)}
    except ImportError:  # the gguf package is missing: no byte count
        gguf = {}
    return {"name": "llama.cpp (GGUF Q4_1)", "weights": "gguf", "head_weights": "gguf",
            "sparsity": 0.0, **summary(total, count), "bytes_per_token": gguf,
            "tokenizer_ids_equal": ours == list(theirs), "sample_line": SAMPLE_LINE,
            "wall_s": time.perf_counter() - start}


# --- report -------------------------------------------------------------------------------


def table(rows: Sequence[dict[str, Any]], dense_nll: float) -> str:
    """The results as a text table (Δ NLL against ``dense_nll``, nats/token)."""
    header = (f"{'weights':<11}{'head':<7}{'sparsity':>9}{'perplexity':>12}{'mean NLL':>10}"
              f"{'quant':>8}{'Δ NLL':>9}{'MiB/token':>11}{'x dense B':>10}{'wall s':>8}")
    dense_bytes = next((r["bytes_per_token"]["total"] for r in rows
                        if r["weights"] is None and r["head_weights"] is None
                        and r["sparsity"] == 0.0), None)
    lines = [header, "-" * len(header)]
    for r in rows:
        gguf = r["weights"] == "gguf"
        name = r["name"].split(" ")[0] if gguf else (r["weights"] or "fp32")
        head = "gguf" if gguf else (r["head_weights"] or "fp32")
        b = r["bytes_per_token"].get("total")
        mib = f"{b / 2**20:.1f}" if b else "-"
        frac = f"{b / dense_bytes:.3f}" if b and dense_bytes else "-"
        quant = (r.get("quant") or "-") + ("+h" if r.get("quant_head") else "")
        lines.append(f"{name:<11}{head:<7}{r['sparsity']:>9.2f}{r['ppl']:>12.2f}"
                     f"{r['nll']:>10.4f}{quant:>8}{r['nll'] - dense_nll:>+9.4f}{mib:>11}"
                     f"{frac:>10}"
                     f"{r['wall_s']:>8.0f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_SEQS} windows of {QUICK_LEN} tokens, 5 rows (smoke test)")
    parser.add_argument("--windows", type=int, help=f"window count (default {EVAL_SEQS})")
    parser.add_argument("--length", type=int, help=f"window length (default {EVAL_LEN})")
    parser.add_argument("--batch", type=int, help=f"windows per forward (default {EVAL_BATCH})")
    parser.add_argument("--threads", type=int, default=2, help="torch and llama.cpp threads")
    parser.add_argument("--inner", default="eager", help="qsparse inner compiler (eager)")
    parser.add_argument("--no-llama-cpp", action="store_true", help="leave llama.cpp out")
    parser.add_argument("--only", metavar="TEXT",
                        help="besides the dense row, run only the rows whose label contains "
                             "TEXT (e.g. 'quant')")
    parser.add_argument("--json", type=Path, help="write every row to this file")
    args = parser.parse_args(argv)
    count = args.windows or (QUICK_SEQS if args.quick else EVAL_SEQS)
    length = args.length or (QUICK_LEN if args.quick else EVAL_LEN)
    batch = args.batch or (QUICK_BATCH if args.quick else EVAL_BATCH)

    from qsparse_compile.research.models.smollm2 import gguf_path, load_smollm2

    torch.set_num_threads(args.threads)
    model, tokenizer = load_smollm2(torch.float32)
    windows = eval_windows(validation_ids(tokenizer), count, length)
    tokens = windows.shape[0] * (windows.shape[1] - 1)
    docs = count == EVAL_SEQS and length == EVAL_LEN
    print(f"torch {torch.__version__}; threads {torch.get_num_threads()}; SmolLM2-135M fp32, "
          f"{len(model.model.layers)} layers")
    print(f"windows: {count} x {length} tokens, evenly spread over the held-out plays "
          f"({tokens} predicted tokens){'; the docs windows' if docs else ''}; batch {batch}; "
          f"qsparse inner compiler {args.inner!r}")
    sys.stdout.flush()

    rows: list[dict[str, Any]] = []
    selected = [row for row in all_rows(args.quick)
                if row.dense or args.only is None or args.only in row.label]
    if args.only is not None and len(selected) == 1:
        parser.error(f"--only {args.only!r} matches no row; labels: "
                     + ", ".join(row.label for row in all_rows(args.quick)))
    for row in selected:
        rows.append(run_row(model, row, windows, batch, args.inner))
        r = rows[-1]
        print(f"  {r['name']}: ppl {r['ppl']:.2f} (NLL {r['nll']:.4f}), {r['wall_s']:.0f} s",
              flush=True)
    if not args.no_llama_cpp:
        anchor = llama_cpp_row(gguf_path(), windows, tokenizer, args.threads)
        if anchor is not None:
            rows.append(anchor)
            print(f"  {anchor['name']}: ppl {anchor['ppl']:.2f} (NLL {anchor['nll']:.4f}), "
                  f"{anchor['wall_s']:.0f} s; tokenizer ids equal on a sample line: "
                  f"{anchor['tokenizer_ids_equal']}", flush=True)

    dense = rows[0]
    print()
    print(table(rows, dense["nll"]))
    print()
    print("Δ NLL: mean NLL minus the dense fp32 row's (nats/token); MiB/token: weight bytes "
          "read per decoded token; x dense B: over the dense fp32 row's bytes")
    errors = {fmt: format_error(model, fmt) for fmt in ("int8", "int4")}
    print("weight change under each format (relative RMS, ||Q(W) - W|| / ||W||): " + "; ".join(
        f"{fmt} projections {e['projections']:.2%}, head {e['head']:.2%}"
        for fmt, e in errors.items()))
    if docs:
        print(f"dense fp32 perplexity {dense['ppl']:.2f}, docs/RESULTS.md {DOCS_DENSE_PPL}: "
              f"{'reproduced' if round(dense['ppl'], 2) == DOCS_DENSE_PPL else 'DIFFERENT'}")

    if args.json:
        record = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                  "model": "SmolLM2-135M-Instruct (fp32, dequantised from the Q4_1 GGUF)",
                  "windows": count, "window_length": length, "batch": batch,
                  "tokens": tokens, "inner": args.inner, "docs_windows": docs,
                  "docs_dense_ppl": DOCS_DENSE_PPL if docs else None,
                  "format_weight_error": errors, "rows": rows}
        write_json(args.json, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
