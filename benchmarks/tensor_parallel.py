"""Tensor parallelism on 2 gloo ranks (CPU): what each row-parallel mode costs and changes.

A Llama-shaped model with random weights (``--hidden``, ``--intermediate``, ``--layers``;
16 heads, 8 KV heads) is sharded Megatron-style over 2 ranks on 127.0.0.1 (q/k/v/gate/up by
columns, o/down by rows) and compiled with ``backend="qsparse"`` (Inductor, inference), in
one run, side by side:

* ``dense``: sparsity 0 (the backend leaves every projection as it is);
* ``exact``: top-K 50%, ``tensor_parallel="exact"`` (row-parallel inputs keep the row's global
  top-K: one all-gather of per-rank candidates per row);
* ``per_shard``: top-K 50%, ``tensor_parallel="per_shard"`` (no communication; another model).

For each: the median wall time of a forward over ``--tokens`` tokens (one thread per rank),
the elements every collective received per token on rank 0 (the profiler's record of each
``_c10d_functional`` call: measured, not computed) converted to bytes, and the largest logit
difference to one process running the same model unsharded with the same options. The
collectives' bytes are what tensor parallelism costs on any interconnect; the gloo wall times
are a 2-core loopback and say little about NVLink.

    python benchmarks/tensor_parallel.py --out benchmarks/results/tensor_parallel.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

MODES: dict[str, dict[str, Any]] = {
    "dense": {"sparsity": 0.0},
    "exact": {"sparsity": 0.5, "tensor_parallel": "exact"},
    "per_shard": {"sparsity": 0.5, "tensor_parallel": "per_shard"},
}
ROW_PARALLEL = ("self_attn.o_proj", "mlp.down_proj")
COLUMN_PARALLEL = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj",
                   "mlp.up_proj")


def build(args: argparse.Namespace) -> torch.nn.Module:
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=8,
        max_position_embeddings=max(64, args.tokens), tie_word_embeddings=False,
        attn_implementation="sdpa")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def token_ids(args: argparse.Namespace) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, args.vocab, (1, args.tokens), generator=gen)


def timed_forward(compiled: torch.nn.Module, ids: torch.Tensor, repeats: int,
                  sync: Any = None) -> tuple[torch.Tensor, list[float]]:
    times = []
    with torch.no_grad():
        logits = compiled(ids, use_cache=False).logits  # compiles
        for _ in range(repeats):
            if sync is not None:
                sync()  # both ranks start together
            start = time.perf_counter()
            compiled(ids, use_cache=False)
            times.append(time.perf_counter() - start)
    return logits, times


def received_per_token(compiled: torch.nn.Module, ids: torch.Tensor, world: int
                       ) -> dict[str, float]:
    """Elements each ``_c10d_functional`` collective received on this rank, per token."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as p:
        compiled(ids, use_cache=False)
    out: dict[str, float] = {}
    for event in p.events():
        name = event.name.split("::")[-1].rstrip("_")  # Inductor calls the in-place forms
        if event.name.startswith("_c10d_functional::") and name != "wait_tensor" \
                and event.input_shapes and event.input_shapes[0]:
            count = math.prod(event.input_shapes[0]) * (
                world if name == "all_gather_into_tensor" else 1)
            out[name] = out.get(name, 0) + count / ids.numel()
    return out


def rank_main(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    rows = {}
    ids = token_ids(args)
    for mode, options in MODES.items():
        torch._dynamo.reset()
        model = build(args)
        plan: dict[str, Any] = {}
        for i in range(args.layers):
            plan.update({f"model.layers.{i}.{p}": ColwiseParallel() for p in COLUMN_PARALLEL})
            plan.update({f"model.layers.{i}.{p}": RowwiseParallel() for p in ROW_PARALLEL})
        parallelize_module(model, init_device_mesh("cpu", (world,)), plan)
        compiled = torch.compile(model, backend="qsparse", options=options)
        logits, times = timed_forward(compiled, ids, args.repeats, dist.barrier)
        rows[mode] = {"ms": 1e3 * statistics.median(times), "logits": logits,
                      "received_per_token": received_per_token(compiled, ids, world)}
    dist.destroy_process_group()
    if rank == 0:
        torch.save(rows, out)


def single_process(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    torch.set_num_threads(1)
    ids = token_ids(args)
    out = {}
    for mode, options in MODES.items():
        torch._dynamo.reset()
        single = {k: v for k, v in options.items() if k != "tensor_parallel"}
        compiled = torch.compile(build(args), backend="qsparse", options=single)
        out[mode], _ = timed_forward(compiled, ids, 0)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=1, help="tokens per forward (1: a "
                        "decode step's shape, without a KV cache)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    world = 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rank0.pt")
        context = mp.get_context("spawn")
        procs = [context.Process(target=rank_main, args=(r, world, port, args, path))
                 for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode for p in procs):
            print(f"a rank failed: exit codes {[p.exitcode for p in procs]}", file=sys.stderr)
            return 1
        rows = torch.load(path, weights_only=False)
    single = single_process(args)
    act_bytes = 4  # fp32 activations; the exact mode's keys have the activation's width
    table = []
    print(f"tensor parallelism, 2 gloo ranks on 127.0.0.1, 1 thread each, fp32; Llama "
          f"hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, "
          f"{args.tokens} tokens per forward; torch {torch.__version__}")
    print(f"{'mode':10} {'ms/forward':>10} {'vs dense':>9} {'all-gather B/token':>19} "
          f"{'all-reduce B/token':>19} {'max |logit diff| to 1 process, same sparsity':>46}")
    for mode, row in rows.items():
        got = row["received_per_token"]
        diff = (row["logits"] - single[mode]).abs().max().item()
        exact_diff = (row["logits"] - single["exact"]).abs().max().item()
        entry = {"mode": mode, "options": MODES[mode], "ms_per_forward": round(row["ms"], 3),
                 "speed_vs_dense": round(rows["dense"]["ms"] / row["ms"], 3),
                 "all_gather_bytes_per_token": got.get("all_gather_into_tensor", 0) * act_bytes,
                 "all_reduce_bytes_per_token": got.get("all_reduce", 0) * act_bytes,
                 "max_logit_diff_same_options_one_process": diff,
                 "max_logit_diff_to_exact_one_process": exact_diff}
        table.append(entry)
        print(f"{mode:10} {row['ms']:10.2f} {entry['speed_vs_dense']:8.2f}x "
              f"{entry['all_gather_bytes_per_token']:19.0f} "
              f"{entry['all_reduce_bytes_per_token']:19.0f} {diff:46.2e}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)},
                                        "world": world, "rows": table}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
