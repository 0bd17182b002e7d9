"""Models, batches and per-rank training steps of the distributed tests (importable by name:
each rank is a spawned process that runs one of the ``*_rank`` functions).

Every rank trains on its shard of one global batch; a loss that is a mean over a rank's tokens
averages, over ranks, to the mean over the global batch, so averaged gradients (DDP, FSDP) equal
single-process gradients on the global batch.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

#: Options every distributed test compiles with: top-K 50% (straight-through in training), the
#: eager inner compiler (the rewrite is what is tested, and Inductor costs minutes on 2 cores).
OPTIONS = {"sparsity": 0.5, "inner": "eager"}

WIDTH = 512  # one 512x512 fp32 weight is 1 MiB: DDP's 1 MiB buckets split the graph


class MLP(nn.Module):
    """Three projections; with ``bucket_cap_mb=1`` DDP splits its graph into several pieces."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, WIDTH)
        self.b = nn.Linear(WIDTH, WIDTH)
        self.c = nn.Linear(WIDTH, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def build_mlp() -> MLP:
    torch.manual_seed(0)
    return MLP()


def mlp_batch(rows: int = 8) -> torch.Tensor:
    return torch.randn(rows, 64, generator=torch.Generator().manual_seed(1))


def mlp_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).pow(2).mean()


def shard(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    return t.chunk(world)[rank]


def gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()
            if p.grad is not None}


def _no_qsparse_warnings() -> None:
    # a projection left dense warns ("belong to no module ...", "stay dense"): a rank that
    # warns has not rewritten what the test compares, so it must fail loudly
    warnings.filterwarnings("error", message="qsparse:")


def ddp_rank(rank: int, world: int, order: str) -> dict[str, Any]:
    """One DDP step; ``order``: ``"compile(ddp)"`` or ``"ddp(compile)"``. Rank 0's gradients
    and the paths the backend recorded."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from qsparse_compile import report
    from qsparse_compile.compile_records import records_of

    _no_qsparse_warnings()
    model = build_mlp()
    if order == "compile(ddp)":
        run = torch.compile(DDP(model, bucket_cap_mb=1), backend="qsparse", options=OPTIONS)
    elif order == "ddp(compile)":
        run = DDP(torch.compile(model, backend="qsparse", options=OPTIONS), bucket_cap_mb=1)
    else:
        raise ValueError(f"ddp_rank: order {order!r}; allowed: 'compile(ddp)', 'ddp(compile)'")
    mlp_loss(run, shard(mlp_batch(), rank, world)).backward()
    compiled = run if order == "compile(ddp)" else run.module
    return {"grads": gradients(model),
            "sparse_paths": sorted(r["path"] for r in report(run) if r["method"] != "dense"),
            "graphs": len(records_of(compiled).graphs)}


# --- FSDP2: a tiny Llama, each decoder layer compiled, then sharded (torchtitan's order) -----

def build_llama() -> nn.Module:
    from hf_models import HF_MODELS

    return HF_MODELS["llama"].build(layers=2).train()


def llama_batch(rows: int = 4, seq: int = 9) -> torch.Tensor:
    from hf_models import token_ids

    return token_ids(batch=rows, seq=seq, seed=3)


def compile_layers(model: nn.Module, backend: Any) -> None:
    """Compile each decoder layer on its own (what FSDP2 recipes do before sharding);
    ``backend``: a :class:`~qsparse_compile.Backend`."""
    for layer in model.model.layers:
        layer.compile(backend=backend)


def train_steps(model: nn.Module, ids: torch.Tensor, steps: int) -> list[float]:
    """``steps`` SGD steps on the same batch; the loss before each."""
    from training import next_token_loss

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(steps):
        loss = next_token_loss(model(ids, use_cache=False).logits, ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def fsdp_rank(rank: int, world: int, mixed: bool, steps: int) -> dict[str, Any]:
    """``steps`` steps of the Llama, layers compiled then ``fully_shard``; ``mixed``: bf16
    parameters in compute, fp32 gradient reduction. Losses are averaged over ranks; graphs
    counts the backend's compilations after the first step and after the last."""
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from qsparse_compile import Backend

    _no_qsparse_warnings()
    model = build_llama()
    backend = Backend(OPTIONS)
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if mixed else MixedPrecisionPolicy())
    compile_layers(model, backend)
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    ids = shard(llama_batch(), rank, world)
    losses = train_steps(model, ids, 1)
    after_first = len(backend.results)
    losses += train_steps(model, ids, steps - 1)
    mean = torch.tensor(losses)
    dist.all_reduce(mean)
    mean /= world
    sparse = {r.path for g in backend.results for r in g.records}
    return {"losses": mean.tolist(), "graphs": (after_first, len(backend.results)),
            "sparse_paths": sorted(sparse)}


def compiled_after_fully_shard_rank(rank: int, world: int) -> dict[str, Any]:
    """The whole Llama sharded with ``fully_shard``, then compiled: its logits (inference)
    and the paths the backend sparsified."""
    from torch.distributed.fsdp import fully_shard

    from qsparse_compile import Backend

    _no_qsparse_warnings()
    model = build_llama()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    backend = Backend(OPTIONS)
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        logits = compiled(llama_batch(), use_cache=False).logits
    return {"logits": logits, "graphs": len(backend.results),
            "sparse_paths": sorted({r.path for g in backend.results for r in g.records
                                    if not r.plan.dense})}


# --- tensor parallelism: inference, column-parallel q/k/v/gate/up, row-parallel o/down ------

COLUMN_PARALLEL = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj",
                   "mlp.up_proj")
ROW_PARALLEL = ("self_attn.o_proj", "mlp.down_proj")


def sharded_topk_rank(rank: int, world: int, cases: list) -> list[torch.Tensor]:
    """``qsparse::sharded_topk_sparsify`` on this rank's shard of each case's rows;
    ``cases``: ``(x, k, rescale)`` with ``x`` the whole rows."""
    from torch.distributed.device_mesh import init_device_mesh

    import qsparse_compile  # noqa: F401  (registers the qsparse ops in this fresh process)

    group = init_device_mesh("cpu", (world,)).get_group().group_name
    return [torch.ops.qsparse.sharded_topk_sparsify(x.chunk(world, -1)[rank].contiguous(), k,
                                                    rank, world, group, rescale)
            for x, k, rescale in cases]


def parallelize_llama(model: nn.Module, world: int) -> nn.Module:
    """Megatron-style tensor parallelism over all ranks: q/k/v/gate/up by columns, o/down by
    rows (the input of o and down arrives sharded by features)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    plan: dict[str, Any] = {}
    for i in range(len(model.model.layers)):
        plan.update({f"model.layers.{i}.{p}": ColwiseParallel() for p in COLUMN_PARALLEL})
        plan.update({f"model.layers.{i}.{p}": RowwiseParallel() for p in ROW_PARALLEL})
    return parallelize_module(model, init_device_mesh("cpu", (world,)), plan)


def tensor_parallel_rank(rank: int, world: int, options: dict[str, Any],
                         train: bool = False) -> dict[str, Any]:
    """Logits of the tensor-parallel Llama compiled with ``options`` (inference), the report's
    rows, and the elements each kind of collective received on this rank during one forward
    (measured: the profiler's record of each ``_c10d_functional`` call and its input shape,
    times the world size for an all-gather); ``train=True``: the error a training forward
    raises, as text."""
    import math

    from torch.profiler import ProfilerActivity, profile

    from qsparse_compile import report

    _no_qsparse_warnings()
    model = parallelize_llama(build_llama().eval(), world)
    compiled = torch.compile(model, backend="qsparse", options=options)
    ids = llama_batch()
    if train:
        try:
            compiled(ids, use_cache=False)
        except Exception as error:  # the backend's error arrives wrapped by Dynamo
            return {"error": f"{type(error).__name__}: {error}"}
        return {"error": ""}
    with torch.no_grad():
        compiled(ids, use_cache=False)  # compiles
        # (a profiler, not a dispatch mode: Dynamo runs frames eagerly under a dispatch mode)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            logits = compiled(ids, use_cache=False).logits
    received: dict[str, int] = {}
    for event in prof.events():
        name = event.name.split("::")[-1].rstrip("_")  # Inductor calls the in-place forms
        if event.name.startswith("_c10d_functional::") and name != "wait_tensor":
            count = math.prod(event.input_shapes[0])
            received[name] = received.get(name, 0) + count * (
                world if name == "all_gather_into_tensor" else 1)
    return {"logits": logits, "rows": list(report(compiled)), "received": received,
            "tokens": ids.numel()}


def per_shard_reference_logits(world: int, options: dict[str, Any]) -> torch.Tensor:
    """One process: the per-shard semantics written out. Row-parallel inputs keep
    ``max(1, round(k * D_s / D))`` of each of the ``world`` shards, which is block
    ``kept:D_s`` sparsity over the whole row; every other projection as ``options`` say."""
    from qsparse_compile import topk_count

    model = build_llama().eval()
    sparsity = options["sparsity"]

    def hook(module: nn.Module, args: tuple) -> tuple:
        (x,) = args
        width = x.shape[-1]
        shard = width // world
        kept = max(1, round(topk_count(width, sparsity) * shard / width))
        return (torch.ops.qsparse.block_sparsify(x, kept, shard, False, True),)

    for layer in model.model.layers:
        layer.self_attn.o_proj.register_forward_pre_hook(hook)
        layer.mlp.down_proj.register_forward_pre_hook(hook)
    excluded = {**options, "exclude": [f"*.{p}" for p in ROW_PARALLEL]}
    compiled = torch.compile(model, backend="qsparse", options=excluded)
    with torch.no_grad():
        return compiled(llama_batch(), use_cache=False).logits


def single_process_logits(options: dict[str, Any]) -> torch.Tensor:
    """The same Llama on one process, compiled with ``options``."""
    model = build_llama().eval()
    compiled = torch.compile(model, backend="qsparse", options=options)
    with torch.no_grad():
        return compiled(llama_batch(), use_cache=False).logits
