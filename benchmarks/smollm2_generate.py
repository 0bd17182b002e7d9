"""SmolLM2-135M through Hugging Face ``generate()``: speed and exactness, as users call it.

Two copies of the model, compiled in place so that ``generate()`` runs them compiled:

* dense: ``model.compile()`` (Inductor), the baseline a user would run;
* sparse: ``qsparse_compile.compile_model(model, sparsity=S)`` (top-K, Inductor).

Both decode greedily with a static KV cache as long as the sequence
(``past_key_values=StaticCache(...)``; ``disable_compile=True`` so ``generate`` adds no
compilation of its own) from ``--prompts``
Shakespeare validation windows of ``--prompt-tokens`` tokens, ``--new-tokens`` each. Rounds
alternate the two paths; each call is timed whole (prefill included) and tokens/s is
new tokens over that time (median over rounds and prompts).

Exactness: each prompt's sparse tokens are compared with the eager reference sparse model's
(``reference_model``, same ``generate`` call), and the dense compiled tokens with eager
dense; the first position where they part is reported. Masks are exact given equal inputs,
but Inductor and eager sum in different orders, so a top-K near-tie can flip and the
sequences part from there (greedy decoding then follows another path).

Prints a table and writes JSON (``--json``).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from _machine import cpu_model, others_busy_cpus
from transformers import StaticCache

import qsparse_compile
from qsparse_compile.reference import reference_model
from qsparse_compile.research.data.shakespeare import shakespeare_split
from qsparse_compile.research.models.smollm2 import load_smollm2


def prompts(tokenizer, count: int, tokens: int) -> list[torch.Tensor]:
    """``count`` windows of ``tokens`` tokens, spread over the validation text."""
    ids = tokenizer(shakespeare_split().validation, return_tensors="pt").input_ids[0]
    step = max(tokens, (len(ids) - tokens) // max(1, count))
    return [ids[i * step: i * step + tokens][None] for i in range(count)]


def first_difference(a: torch.Tensor, b: torch.Tensor) -> int | None:
    """The first new-token position where ``a`` and ``b`` differ, None if equal."""
    diff = (a != b).nonzero()
    return None if len(diff) == 0 else int(diff[0, -1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds over all prompts")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    model, tokenizer = load_smollm2(torch.float32)
    windows = prompts(tokenizer, args.prompts, args.prompt_tokens)
    settings = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                    do_sample=False, disable_compile=True, pad_token_id=tokenizer.eos_token_id)
    cache_len = args.prompt_tokens + args.new_tokens

    def generate(m: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
        # a static cache as long as the sequence (``cache_implementation="static"`` sizes it
        # from the model's maximum context, 8192 positions, which every step attends over)
        cache = StaticCache(config=m.config, max_cache_len=cache_len)
        with torch.no_grad():
            return m.generate(ids, past_key_values=cache, **settings)[0, ids.shape[1]:]

    print(f"CPU: {cpu_model()}; torch {torch.__version__}; threads {torch.get_num_threads()}")
    print(f"SmolLM2-135M fp32, sparsity {args.sparsity}, {args.prompts} prompts x "
          f"{args.prompt_tokens} tokens, {args.new_tokens} new tokens, {args.rounds} rounds")
    eager_dense = [generate(model, w) for w in windows]
    with reference_model(model, sparsity=args.sparsity):
        reference = [generate(model, w) for w in windows]

    dense, sparse = copy.deepcopy(model), copy.deepcopy(model)
    dense.compile()
    backend = qsparse_compile.compile_model(sparse, sparsity=args.sparsity)
    start = time.perf_counter()
    dense_tokens = [generate(dense, w) for w in windows]
    dense_compile = time.perf_counter() - start
    start = time.perf_counter()
    sparse_tokens = [generate(sparse, w) for w in windows]
    sparse_compile = time.perf_counter() - start
    print(f"first pass over the prompts (compiles included): dense {dense_compile:.0f} s, "
          f"qsparse {sparse_compile:.0f} s; qsparse graphs compiled: {len(backend.results)}")

    speeds: dict[str, list[float]] = {"dense": [], "qsparse": []}
    busy = []
    for _ in range(args.rounds):
        for w in windows:
            busy.append(others_busy_cpus())
            for name, m in (("dense", dense), ("qsparse", sparse)):
                t = time.perf_counter()
                generate(m, w)
                speeds[name].append(args.new_tokens / (time.perf_counter() - t))
    ratios = [s / d for s, d in zip(speeds["qsparse"], speeds["dense"], strict=True)]

    sparse_parts = [first_difference(a, b) for a, b in zip(sparse_tokens, reference,
                                                            strict=True)]
    dense_parts = [first_difference(a, b) for a, b in zip(dense_tokens, eager_dense,
                                                           strict=True)]
    print(f"\n{'path':<34}{'tokens/s (median)':>18}{'min':>8}{'max':>8}")
    for name, values in speeds.items():
        print(f"{name:<34}{statistics.median(values):>18.2f}{min(values):>8.2f}"
              f"{max(values):>8.2f}")
    print(f"speed-up qsparse / dense Inductor (median of per-call ratios): "
          f"{statistics.median(ratios):.3f}x")
    print(f"prompts whose qsparse tokens equal the eager sparse reference's: "
          f"{sum(p is None for p in sparse_parts)}/{len(windows)}; first parting positions: "
          f"{[p for p in sparse_parts if p is not None]}")
    print(f"prompts whose dense Inductor tokens equal eager dense: "
          f"{sum(p is None for p in dense_parts)}/{len(windows)}; first parting positions: "
          f"{[p for p in dense_parts if p is not None]}")
    print(f"other processes kept {statistics.median(busy):.1f} CPUs busy (median)")
    if args.json:
        args.json.write_text(json.dumps({
            "cpu": cpu_model(), "torch": torch.__version__, "threads": args.threads,
            "sparsity": args.sparsity, "prompts": args.prompts,
            "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
            "tokens_per_s": speeds, "ratios": ratios,
            "median_ratio": statistics.median(ratios),
            "sparse_first_parting": sparse_parts, "dense_first_parting": dense_parts,
            "others_busy_cpus": busy,
        }, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
