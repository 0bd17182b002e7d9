"""Decode speed of the training-free rows (rotations folded into the weights, loss-driven
allocation) beside plain top-K and dense Inductor, alternating in one run.

Each row of ``examples/rotated_topk.py`` given with ``--rows`` is built as that script builds
it (:func:`rotated_topk.row_model`: the folded model compiled by ``backend="qsparse"``, here
with Inductor), from the rotations and allocations its run cached under
``runs/training_free_rotations/`` (computed now if absent). Plain top-K at each row's sparsity
and dense Inductor run in the same process, the paths taking turns every round, over the
decode loop of :mod:`smollm2_decode` (SmolLM2-135M, static KV cache, greedy, prefill excluded).

    python benchmarks/rotated_decode.py --rows fold-scaled40 fold-scaled50 --json out.json

The table gives each path's median tokens/s, its ratio to plain top-K at the same sparsity
(median of per-round ratios; the issue's condition is >= 0.95) and to dense, and the runtime
multiply-adds the rotations add per token (the row's ``added_macs``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from _machine import cpu_model, others_busy_cpus
from _records import write_json
from smollm2_decode import GreedyDecoder, prompt_ids

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))

import continue_train as ct  # noqa: E402
import rotated_topk as rt  # noqa: E402

#: Rows timed by default: the folded variants with and without the loss-driven allocation.
DEFAULT_ROWS = ("fold-scaled40", "fold-scaled50", "fold-loss-alloc40", "fold-loss-alloc50")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="+", choices=list(rt.FOLDED_ROWS),
                        default=list(DEFAULT_ROWS),
                        help="training-free rows of examples/rotated_topk.py (default: "
                             f"{' '.join(DEFAULT_ROWS)})")
    parser.add_argument("--quick", action="store_true", help="16 new tokens, 2 rounds")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cal-dir", type=Path, default=REPO / "runs/training_free_rotations",
                        help="where examples/rotated_topk.py cached its rotations")
    parser.add_argument("--json", type=Path, help="write all measurements to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.new_tokens, args.rounds = min(args.new_tokens, 16), min(args.rounds, 2)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    # every path compiles the same forward (of other model objects): Dynamo keeps one cache
    # entry per path and graph (prefill, decode) on that code, more than its default limit of
    # 8, past which it would run the remaining paths uncompiled
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 1024
    model, tokenizer = ct.load_model()
    model.eval()
    data = ct.TokenData(tokenizer, REPO / "runs/continue_train")
    state = rt.FoldedState(model, data.train, rt.Settings(), args.cal_dir, progress=False)
    prompt = prompt_ids(tokenizer, args.prompt_tokens)
    print(f"CPU: {cpu_model()}; torch {torch.__version__}; threads {torch.get_num_threads()}")
    print(f"SmolLM2-135M fp32, prompt {prompt.shape[1]} tokens, {args.new_tokens} new tokens, "
          f"{args.rounds} rounds, paths alternating")

    sparsities = sorted({rt.FOLDED_ROWS[name][0] for name in args.rows})
    forwards: dict[str, torch.nn.Module | object] = {
        "dense": torch.compile(model.forward, dynamic=False)}
    plain = {s: f"topk{round(s * 100)}" for s in sparsities}
    for s, name in plain.items():
        forwards[name] = ct.compile_model(model, {"sparsity": s}, "inductor")
    added: dict[str, float] = {}
    for name in args.rows:
        forwards[name], _ = rt.row_model(name, state, "inductor")
        fold = rt.FOLDED_ROWS[name][1]
        added[name] = float(state.rotations(fold).added_macs(model))
    paths = {name: GreedyDecoder(model, fwd, prompt, args.new_tokens)
             for name, fwd in forwards.items()}

    compile_s, tokens = {}, {}
    for name, decoder in paths.items():  # warm-up: compiles prefill and decode graphs
        start = time.perf_counter()
        tokens[name], _ = decoder.run()
        compile_s[name] = time.perf_counter() - start
    print("compile + first run: " + ", ".join(f"{n} {t:.0f} s" for n, t in compile_s.items()))

    names = list(paths)
    samples: dict[str, list[float]] = {name: [] for name in names}
    busy: list[float] = []
    unstable: dict[str, list[int]] = {}  # path -> rounds whose tokens differed from the first
    for i in range(args.rounds):
        order = names[i % len(names):] + names[:i % len(names)]
        busy.append(others_busy_cpus(0.2))
        for name in order:
            out, seconds = paths[name].run()
            if not torch.equal(out, tokens[name]):
                unstable.setdefault(name, []).append(i + 1)
            samples[name].append((args.new_tokens - 1) / seconds)
        print(f"  round {i + 1}: " + ", ".join(f"{n} {samples[n][-1]:.2f}" for n in names)
              + f" tok/s (others busy on {busy[-1]:.1f} CPUs)", flush=True)

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(samples[a], samples[b], strict=True))

    med = {name: statistics.median(v) for name, v in samples.items()}
    vs_plain = {name: ratio(name, plain[rt.FOLDED_ROWS[name][0]]) for name in args.rows}
    print()
    print(f"{'path':<22}{'tokens/s':>10}{'x dense':>9}{'x plain top-K':>15}"
          f"{'added MACs/token':>18}")
    for name in names:
        rel = f"{vs_plain[name]:.3f}" if name in vs_plain else "-"
        print(f"{name:<22}{med[name]:>10.2f}{ratio(name, 'dense'):>9.3f}{rel:>15}"
              f"{added.get(name, 0.0):>18,.0f}")
    print(f"tokens identical in every round: {not unstable}"
          + "".join(f"; {n} differed in rounds {r}" for n, r in unstable.items())
          + "; other processes kept "
          f"{statistics.median(busy):.1f} CPUs busy (median)")
    if args.json:
        record = {
            "status": "done", "command": "python benchmarks/rotated_decode.py "
            + " ".join(sys.argv[1:] if argv is None else argv),
            "cpu": cpu_model(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "prompt_tokens": int(prompt.shape[1]), "new_tokens": args.new_tokens,
            "rounds": args.rounds, "tokens_per_s": samples, "median_tokens_per_s": med,
            "vs_plain_topk": vs_plain, "vs_dense": {n: ratio(n, "dense") for n in names},
            "added_macs": added, "compile_s": compile_s, "others_busy_cpus": busy,
            "tokens_stable": not unstable, "rounds_with_other_tokens": unstable,
            "tokens": {n: t.tolist() for n, t in tokens.items()},
        }
        write_json(args.json, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
