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


# --- tensor parallelism: refused with a clear error until it has its own semantics ----------

COLUMN_PARALLEL = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj",
                   "mlp.up_proj")
ROW_PARALLEL = ("self_attn.o_proj", "mlp.down_proj")


def tensor_parallel_rank(rank: int, world: int) -> str:
    """Compile a Llama sharded Megatron-style (q/k/v/gate/up by columns, o/down by rows);
    the error the compile raises, as text ("" if none)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    model = build_llama().eval()
    plan: dict[str, Any] = {}
    for i in range(len(model.model.layers)):
        plan.update({f"model.layers.{i}.{p}": ColwiseParallel() for p in COLUMN_PARALLEL})
        plan.update({f"model.layers.{i}.{p}": RowwiseParallel() for p in ROW_PARALLEL})
    parallelize_module(model, init_device_mesh("cpu", (world,)), plan)
    compiled = torch.compile(model, backend="qsparse", options=OPTIONS)
    try:
        with torch.no_grad():
            compiled(llama_batch(), use_cache=False)
    except Exception as error:  # the backend's error arrives wrapped by Dynamo
        return f"{type(error).__name__}: {error}"
    return ""
