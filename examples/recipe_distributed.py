"""The recipes under ``torchrun``: process group, each rank's rows of the global batch, global
means, FSDP2 / DDP wrapping and ``torch.distributed.checkpoint`` (DCP) checkpoints.

One process (no ``--fsdp`` / ``--ddp``) goes through the same functions with a world of one and
no process group, so a recipe has one code path; a DCP checkpoint written on N ranks is read on
any other number of ranks, one process without ``torchrun`` included.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from recipe_common import read_json, write_json

#: What ``--fsdp`` / ``--ddp`` select.
MODES = ("fsdp", "ddp")

#: What torchrun (``env://``) sets for every rank; a missing one means no launcher started us.
_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclasses.dataclass(frozen=True)
class Parallel:
    """Where this process stands: ``mode`` (``"fsdp"``, ``"ddp"`` or None for one process),
    its rank among ``world`` and the device it computes on."""

    mode: str | None = None
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # the process group's ("gloo", "nccl"); None without one

    @property
    def main(self) -> bool:
        """Whether this rank writes logs and prints (rank 0)."""
        return self.rank == 0

    @property
    def launcher(self) -> list[str]:
        """How the run was started, for the command recorded in its log."""
        if self.mode is None:
            return ["python"]
        return ["torchrun", "--nproc-per-node", str(self.world)]

    def describe(self) -> dict[str, Any]:
        """The parallel setup as logged with the run."""
        return {"mode": self.mode, "world": self.world, "backend": self.backend,
                "device": str(self.device)}

    def rows(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of ``batch`` (its first dimension)."""
        if self.world == 1:
            return batch
        if batch.shape[0] % self.world:
            raise ValueError(f"a batch of {batch.shape[0]} sequences does not split over "
                             f"{self.world} ranks; use a batch that is a multiple of "
                             f"{self.world}")
        return batch.chunk(self.world)[self.rank]

    def sum(self, values: Sequence[float]) -> list[float]:
        """``values`` summed over ranks (float64, so counts and sums of NLLs stay exact)."""
        if self.world == 1:
            return [float(v) for v in values]
        t = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def mean(self, value: float) -> float:
        """``value`` averaged over ranks: the global mean of per-rank means over equal shards."""
        return self.sum([value])[0] / self.world

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def start(mode: str | None) -> Parallel:
    """Join the process group torchrun describes in the environment (``env://``).

    ``mode=None`` is one process: refused when torchrun started several, because every rank
    would then train the whole batch and write the same files. gloo on the CPU, NCCL (one GPU
    per local rank) where CUDA is available.
    """
    world_env = int(os.environ.get("WORLD_SIZE", "1"))
    if mode is None:
        if world_env > 1:
            raise ValueError(f"started on {world_env} ranks (WORLD_SIZE={world_env}) without "
                             f"--fsdp or --ddp; add one of them, or start one process")
        return Parallel()
    if mode not in MODES:
        raise ValueError(f"parallel mode {mode!r}; allowed: {', '.join(MODES)} or None")
    missing = [name for name in _TORCHRUN_ENV if name not in os.environ]
    if missing:
        raise ValueError(
            f"--{mode} needs a process group, and {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not set: start the recipe with torchrun, "
            f"e.g. `torchrun --nproc-per-node 2 examples/continue_train.py --{mode} ...`")
    device = torch.device("cpu")
    backend = "gloo"
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise ValueError(f"local rank {local} has no GPU: {torch.cuda.device_count()} "
                             f"visible; start at most that many processes per node")
        device, backend = torch.device("cuda", local), "nccl"
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method="env://",
                            device_id=device if device.type == "cuda" else None)
    return Parallel(mode, dist.get_rank(), dist.get_world_size(), device, backend)


def stop(par: Parallel) -> None:
    """Leave the process group :func:`start` joined (nothing for one process)."""
    if par.mode is not None and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, options: dict[str, Any], par: Parallel
         ) -> tuple[torch.nn.Module, Any]:
    """The module to train under the qsparse backend with ``options``, and what its
    compilation is reported from (:func:`qsparse_compile.report` takes either).

    * one process: ``torch.compile(model, backend="qsparse", options=options)``;
    * DDP: ``DDP(torch.compile(model, ...))`` (Dynamo then splits each graph at DDP's
      gradient buckets and the backend compiles every piece);
    * FSDP2: torchtitan's order: every decoder layer compiled on its own by one
      :class:`qsparse_compile.Backend`, then ``fully_shard`` per layer, then the root. A
      layer's graph runs on its all-gathered parameters, plain tensors the backend names as in
      one process. The embeddings, final norm and head run eager, which is what the backend
      leaves of them anyway (the head stays dense); FSDP reports from the backend.

    Shapes are static (``dynamic=False``) in every mode, as in one process.
    """
    torch._dynamo.reset()  # a fresh compile per configuration
    if par.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        from qsparse_compile import Backend

        backend = Backend(options)
        for layer in model.model.layers:
            layer.compile(backend=backend, dynamic=False)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model, backend
    compiled = torch.compile(model, backend="qsparse", dynamic=False, options=options)
    if par.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [par.device.index] if par.device.type == "cuda" else None
        return DDP(compiled, device_ids=ids), compiled
    return compiled, compiled


@contextlib.contextmanager
def no_grad_sync(run: torch.nn.Module) -> Iterator[None]:
    """Forward passes that no backward follows (evaluation in grad mode): DDP must not wait
    for their gradients. FSDP2 needs nothing: it gathers per forward and reduces per backward."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    with run.no_sync() if isinstance(run, DDP) else contextlib.nullcontext():
        yield


def clip_grad_norm(params: Sequence[torch.Tensor], max_norm: float) -> None:
    """``clip_grad_norm_`` that also takes FSDP2's sharded (DTensor) gradients: the norm of
    sharded gradients is a partial DTensor, made whole (one all-reduce) before it scales."""
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads)
    if hasattr(total, "full_tensor"):  # a DTensor: sharded gradients
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)


# --- checkpoints ---------------------------------------------------------------------------
#
# <root>/latest.json names the newest complete checkpoint, <root>/step-NNNNNN/ (DCP's files and
# run.json: the step and the run's log). The pointer is written last, atomically: a run killed
# while saving resumes from the previous checkpoint.


@contextlib.contextmanager
def _one_process_is_meant() -> Iterator[None]:
    # DCP warns that it "assumes" one process whenever there is no process group, even when
    # told so (no_dist=True); here it is what was asked for, not a guess
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable")
        yield


def _state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optimizer": optim_sd}


def save_run(root: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
             log: dict[str, Any], par: Parallel) -> None:
    """Checkpoint a run with DCP (every rank writes its shards; rank 0 the log and pointer).

    ``model`` is the unwrapped model (not its compiled or DDP wrapper), so its parameter
    names are the plain ones whatever wrapped it, and any world size can load them.
    """
    import torch.distributed.checkpoint as dcp

    target = root / f"step-{step:06d}"
    if par.main and target.exists():
        shutil.rmtree(target)  # a save of this step that was interrupted
    par.barrier()
    with _one_process_is_meant():
        dcp.save(_state(model, optimizer), checkpoint_id=target, no_dist=par.mode is None)
    if par.main:
        write_json(target / "run.json", {"step": step, "log": log, "world": par.world})
        write_json(root / "latest.json", {"step": step, "dir": target.name})
        for old in root.glob("step-*"):
            if old.name != target.name:
                shutil.rmtree(old)
    par.barrier()


def restore_run(root: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                command: str, par: Parallel) -> tuple[dict[str, Any], int] | None:
    """Load the newest :func:`save_run` checkpoint under ``root`` into ``model`` and
    ``optimizer``, whatever world size wrote it. Returns the run's log (this resumption
    recorded in it) and the step to continue from; None where there is no checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    pointer = root / "latest.json"
    if not pointer.is_file():
        return None
    target = root / read_json(pointer)["dir"]
    saved = read_json(target / "run.json")
    state = _state(model, optimizer)  # the layout to load into: this run's sharding
    with _one_process_is_meant():
        dcp.load(state, checkpoint_id=target, no_dist=par.mode is None)
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])
    log, step = saved["log"], saved["step"]
    log.setdefault("resumed", []).append(
        {"at_step": step, "command": command, "saved_on_ranks": saved["world"],
         "ranks": par.world})
    return log, step


def remove_checkpoint(root: Path, par: Parallel) -> None:
    """Delete a run's checkpoints once it is complete (rank 0; the others wait)."""
    if par.main:
        shutil.rmtree(root, ignore_errors=True)
    par.barrier()


def full_state_dict(model: torch.nn.Module, par: Parallel) -> dict[str, torch.Tensor] | None:
    """The whole model's weights as plain CPU tensors on rank 0 (None on the other ranks);
    every rank must call it (FSDP2 all-gathers the shards)."""
    if par.mode != "fsdp":
        return {k: v.detach().cpu() for k, v in model.state_dict().items()} if par.main else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))
    return full if par.main else None
