"""Where the compiled SmolLM2 decode parts from the eager reference, and whether it is a tie.

Greedy decoding amplifies any difference: once one top-K cut falls the other way, the hidden
state, the cache and at some later step the argmax differ. This script finds the first such
cut. It decodes the prompt greedily with the eager reference model (``reference_model``, the
same options), then feeds the reference's tokens (teacher forcing) to the model compiled
through ``backend="qsparse"`` and to the reference, step by step, with every layer's hidden
state. At the first step where some layer's output differs by more than ``--threshold`` (of
the largest magnitude in that hidden state) it applies that layer's input norm to both
paths' hidden states entering the layer and compares the top-K masks of the q/k/v input: the
features that change sides and their values in each path; beside it, the relative gap at the
cut of every selection of that layer in the reference (a tiny one marks where a cut can fall
the other way). A difference of a few ulps at
values that nearly tie at the cut is float order (the fused kernels sum in another order than
``torch.mm``); a mask that differs far from the cut, or a jump without a mask difference in
the q/k/v input (o, gate/up and down inputs are not reached here), needs another explanation.

    python benchmarks/decode_divergence.py                       # fp32 weights, top-K 50%
    python benchmarks/decode_divergence.py --weights int8 --head-weights int8 --json out.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from _records import write_json
from smollm2_decode import prompt_ids

from qsparse_compile import reference
from qsparse_compile.config import topk_count
from qsparse_compile.reference import reference_model
from qsparse_compile.research.models.smollm2 import load_smollm2


def hidden_states(forward, model, prompt: torch.Tensor, feed: torch.Tensor, steps: int,
                  cache_len: int) -> list[torch.Tensor]:
    """Per decode step (tokens ``feed``), the ``[layers + 1, hidden]`` hidden states of the
    new token: the embedding, then each layer's output."""
    from transformers import StaticCache

    length = prompt.shape[1]
    cache = StaticCache(config=model.config, max_cache_len=cache_len)
    out = []
    with torch.no_grad():
        forward(input_ids=prompt, past_key_values=cache, cache_position=torch.arange(length),
                use_cache=True, output_hidden_states=True)
        for i in range(steps):
            step = forward(input_ids=feed[i].view(1, 1), past_key_values=cache,
                           cache_position=torch.tensor([length + i]), use_cache=True,
                           output_hidden_states=True)
            out.append(torch.stack([h[0, -1] for h in step.hidden_states]))
    return out


def cut_gaps(model, sparsity: float, quant: str | None = None
             ) -> tuple[dict[str, list[float]], dict[str, list[float]], list]:
    """Forward pre-hooks on every decoder projection that record, per call, the relative gap
    between the k-th and (k+1)-th largest |x| of the last row of its input (the reference
    selects on exactly that input) and, with ``quant="int8"``, the smallest distance of a kept
    value's ``127 x / g`` to a rounding boundary (a half-integer), in units of one int8 code:
    where it is tiny, a float-order difference in ``x`` moves a code by one. Returns the cut
    gaps, the rounding gaps and the hooks' handles."""
    gaps: dict[str, list[float]] = {}
    rounding: dict[str, list[float]] = {}

    def hook(name):
        def record(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])[-1].double()
            k = topk_count(x.numel(), sparsity)
            top = x.abs().sort(descending=True).values
            gaps.setdefault(name, []).append(float((top[k - 1] - top[k]) / top[k - 1]))
            if quant:
                kept = x[x.abs() >= top[k - 1]]
                q = 127.0 * kept / top[0]
                rounding.setdefault(name, []).append(
                    float((q - q.floor() - 0.5).abs().min()))
        return record

    handles = []
    for i, layer in enumerate(model.model.layers):
        for role, module in (("q/k/v", layer.self_attn.q_proj), ("o", layer.self_attn.o_proj),
                             ("gate/up", layer.mlp.gate_proj), ("down", layer.mlp.down_proj)):
            handles.append(module.register_forward_pre_hook(hook(f"{i}.{role}")))
    return gaps, rounding, handles


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--weights", choices=["int8", "int4"])
    parser.add_argument("--head-weights", choices=["int8", "int4"])
    parser.add_argument("--quant", choices=["int8"],
                        help="per-row int8 activations (DESIGN.md point 5), as smollm2_decode.py")
    parser.add_argument("--quant-head", action="store_true",
                        help="the head's input takes --quant too (the override {'lm_head': 0}),"
                             " as smollm2_decode.py --quant-head")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=12, help="decode steps compared")
    parser.add_argument("--new-tokens", type=int, default=64,
                        help="the cache holds the prompt and this many tokens, as in "
                             "smollm2_decode.py (its length is part of every graph's shapes, "
                             "so it changes the float order of attention)")
    parser.add_argument("--threshold", type=float, default=1e-4,
                        help="a layer output 'differs' beyond this fraction of its max |h|")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    model, tokenizer = load_smollm2(torch.float32)
    prompt = prompt_ids(tokenizer, args.prompt_tokens)
    options = {"sparsity": args.sparsity, "weights": args.weights,
               "head_weights": args.head_weights, "quant": args.quant}
    options = {k: v for k, v in options.items() if v is not None}
    if args.quant_head:
        if not args.quant:
            parser.error("--quant-head needs --quant")
        options["overrides"] = {"lm_head": 0.0}

    # the reference's own greedy tokens, fed to both paths
    from transformers import StaticCache

    length = prompt.shape[1]
    cache_len = length + max(args.new_tokens, args.steps + 1)
    feed = []
    with reference_model(model, **options), torch.no_grad():
        cache = StaticCache(config=model.config, max_cache_len=cache_len)
        logits = model(input_ids=prompt, past_key_values=cache,
                       cache_position=torch.arange(length), use_cache=True).logits
        for i in range(args.steps):
            feed.append(int(logits[0, -1].argmax()))
            logits = model(input_ids=torch.tensor([[feed[-1]]]), past_key_values=cache,
                           cache_position=torch.tensor([length + i]), use_cache=True).logits
        gaps, rounding, handles = cut_gaps(model, args.sparsity, args.quant)
        ref = hidden_states(model.forward, model, prompt, torch.tensor(feed), args.steps,
                            cache_len)
        for handle in handles:
            handle.remove()
    compiled = torch.compile(model.forward, backend="qsparse", dynamic=False, options=options)
    got = hidden_states(compiled, model, prompt, torch.tensor(feed), args.steps, cache_len)

    print(f"SmolLM2-135M, options {options}, {args.steps} teacher-forced decode steps, "
          f"static cache of {cache_len} positions")
    record: dict = {"options": options, "steps": args.steps, "cache_len": cache_len,
                    "threshold": args.threshold,
                    "max_error_per_step": [], "first": None}
    for step, (r, g) in enumerate(zip(ref, got, strict=True)):
        err = ((g - r).abs().amax(1) / r.abs().amax(1)).tolist()
        record["max_error_per_step"].append(err)
        print(f"step {step}: largest error over layers {max(err):.1e} (of max |h|)")
        bad = [i for i, e in enumerate(err) if e > args.threshold]
        if record["first"] is not None or not bad:
            continue
        layer = bad[0] - 1  # hidden_states[i] is layer i-1's output (the last after the norm)
        if layer < 0:  # the embedding itself: nothing is selected before it
            print("  first jump: the embedding output (no selection before it)")
            record["first"] = {"step": step, "layer": None}
            continue
        norm = model.model.layers[layer].input_layernorm
        D = r.shape[1]
        k = topk_count(D, args.sparsity)
        with torch.no_grad():
            a, b = norm(r[layer].view(1, -1)), norm(g[layer].view(1, -1))
        mask_a = reference.topk_sparsify(a, k) != 0
        mask_b = reference.topk_sparsify(b, k) != 0
        flipped = (mask_a != mask_b).nonzero()[:, 1].tolist()
        cut = a.abs().sort(descending=True).values[0]
        gap = float((cut[k - 1] - cut[k]) / cut[k - 1])
        entry = {
            "step": step, "layer": layer, "error_before": err[layer],
            "error_after": err[layer + 1], "qkv_flipped_features": flipped,
            "reference_values": [float(a[0, i]) for i in flipped],
            "compiled_values": [float(b[0, i]) for i in flipped],
            "reference_cut_gap_relative": gap,
            "max_abs_h": float(r[layer].abs().max()),
            "median_abs_h": float(r[layer].abs().median()),
        }
        # the reference's cut gaps in that layer at that step (call 0 is the prefill)
        entry["reference_cut_gaps_in_layer"] = {
            role: gaps[f"{layer}.{role}"][step + 1] for role in ("q/k/v", "o", "gate/up", "down")}
        if args.quant:
            entry["reference_rounding_gaps_in_layer"] = {
                role: rounding[f"{layer}.{role}"][step + 1]
                for role in ("q/k/v", "o", "gate/up", "down")}
        record["first"] = entry
        print(f"  first jump: layer {layer} output {err[layer + 1]:.1e}, its input "
              f"{err[layer]:.1e} (max |h| {entry['max_abs_h']:.2f}, median "
              f"{entry['median_abs_h']:.3f})")
        print(f"  its q/k/v input: relative gap between the k-th and (k+1)-th |x| in the "
              f"reference {gap:.1e}; features on the other side of the cut: {flipped}")
        print("  the reference's relative cut gaps in that layer at that step: " + ", ".join(
            f"{role} {g:.1e}" for role, g in entry["reference_cut_gaps_in_layer"].items()))
        if args.quant:
            print("  the reference's smallest distance of a kept 127 x / g to a rounding "
                  "boundary, in codes: " + ", ".join(
                      f"{role} {g:.1e}"
                      for role, g in entry["reference_rounding_gaps_in_layer"].items()))
        for i, va, vb in zip(flipped, entry["reference_values"], entry["compiled_values"],
                             strict=True):
            print(f"    feature {i}: reference {va:.8f}, compiled {vb:.8f} "
                  f"({'kept' if mask_a[0, i] else 'dropped'} by the reference)")
    if record["first"] is None:
        print(f"no layer output differs by more than {args.threshold:.0e} in {args.steps} steps")
    if args.json:
        write_json(args.json, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
