"""Train a small byte-level Llama-style model from scratch on Shakespeare: dense vs Q-Sparse.

Every run is the same model (same initial weights, same batches, same token budget), compiled
with ``torch.compile(model, backend="qsparse", options=...)``; only the options differ:

    dense           sparsity 0                     the baseline
    topk40          top-K 40%, straight-through    Q-Sparse (claim 1: matches dense)
    topk40-noste    top-K 40%, masked gradient     the ablation (claim 2: clearly worse)
    relu            relu(x) on every input         ReLU sparsity (claim 3: it drifts down)
    block16-32      block 16:32 (50%)              Block Q-Sparse
    bitnet-dense    ternary weights, int8 inputs   BitNet b1.58
    bitnet-topk61   ... and top-K 61.25%           BitNet + Q-Sparse at its optimal sparsity

All runs use ``relu2_glu=True``: the compiler turns the model's SwiGLU feed-forward into the
squared-ReLU GLU Q-Sparse trains with. The measured input sparsity of every projection is logged
during training (:func:`qsparse_compile.research.measure.measure_sparsity` on a fixed held-out
batch), as is the held-out loss (whole plays never seen in training).

    python examples/train_from_scratch.py --all              # every run, as in docs/RESULTS.md
    python examples/train_from_scratch.py --run topk40 --steps 200
    python examples/train_from_scratch.py --run relu --tiny  # seconds: a smoke test

A run writes ``<out>/<run>.json`` (settings, the exact command, per-step train loss, periodic
validation loss and measured sparsity, wall time) and a checkpoint under ``--ckpt-dir``;
``--resume`` continues from it (``--stop-at`` ends a session early on purpose).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from recipe_common import (
    REPO,
    adamw,
    cosine_lr,
    provenance,
    recipe_parser,
    restore_run,
    run_command,
    save_run,
    set_lr,
    set_threads,
    settings_from,
    write_json,
)
from tqdm import tqdm

import qsparse_compile  # noqa: F401  (registers the qsparse ops; the backend needs no import)
from qsparse_compile.compile_records import records_of
from qsparse_compile.report import report
from qsparse_compile.research.data import shakespeare_split
from qsparse_compile.research.measure import measure_sparsity
from qsparse_compile.research.models import TinyLlama, TinyLlamaConfig
from qsparse_compile.roles import role_of

#: The runs: qsparse options (``relu2_glu`` and ``inner`` are added to all of them).
RUNS: dict[str, dict[str, Any]] = {
    "dense": {"sparsity": 0.0},
    "topk40": {"sparsity": 0.4},
    "topk40-noste": {"sparsity": 0.4, "ste": False},
    "relu": {"method": "relu"},
    "block16-32": {"method": "block", "block": (16, 32)},
    "bitnet-dense": {"quant": "bitnet", "sparsity": 0.0},  # quantized, not sparsified
    "bitnet-topk61": {"quant": "bitnet", "sparsity": 0.6125},
}


@dataclasses.dataclass
class Settings:
    """Everything that defines a run besides its qsparse options (logged with the run)."""

    steps: int = 400
    batch: int = 16
    seq: int = 128
    hidden: int = 128
    intermediate: int = 384  # a multiple of 32, so block 16:32 applies to the down projection
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    lr: float = 3e-3
    warmup: int = 30
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 40
    eval_seqs: int = 64  # held-out windows, rounded up to a multiple of the batch
    seed: int = 0
    inner: str = "inductor"
    threads: int = 1


#: ``--tiny``: a smoke test in seconds (inner "eager": no Inductor compile).
TINY = {"steps": 24, "batch": 4, "seq": 32, "hidden": 64, "intermediate": 192, "layers": 2,
        "warmup": 4, "eval_every": 12, "eval_seqs": 8, "inner": "eager"}


# --- data --------------------------------------------------------------------------------


@dataclasses.dataclass
class ByteData:
    """The corpus as bytes (vocabulary 256: no tokenizer to train or ship)."""

    train: torch.Tensor
    validation: torch.Tensor

    @classmethod
    def load(cls) -> ByteData:
        split = shakespeare_split()
        as_tensor = lambda text: torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8)  # noqa: E731
        return cls(as_tensor(split.train), as_tensor(split.validation))

    def train_batch(self, step: int, batch: int, seq: int, seed: int) -> torch.Tensor:
        """Random windows, a pure function of (seed, step): every run and every resumed run
        sees exactly the same batches."""
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        starts = torch.randint(0, len(self.train) - seq - 1, (batch,), generator=gen)
        return torch.stack([self.train[s:s + seq + 1] for s in starts.tolist()]).long()

    def validation_batches(self, count: int, batch: int, seq: int) -> list[torch.Tensor]:
        """``count`` windows evenly spread over the held-out plays, in batches of ``batch``
        (the training shape, so the compiled graph is reused, not recompiled)."""
        count = batch * math.ceil(count / batch)
        starts = torch.linspace(0, len(self.validation) - seq - 2, count).long().tolist()
        windows = torch.stack([self.validation[s:s + seq + 1] for s in starts]).long()
        return list(windows.split(batch))


# --- model -------------------------------------------------------------------------------


def model_config(s: Settings, hidden_act: str = "silu") -> TinyLlamaConfig:
    return TinyLlamaConfig(vocab_size=256, hidden_size=s.hidden, intermediate_size=s.intermediate,
                           num_layers=s.layers, num_heads=s.heads, num_kv_heads=s.kv_heads,
                           max_positions=max(512, s.seq), hidden_act=hidden_act)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def validation_loss(compiled: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    """Mean next-byte loss (nats) over the held-out windows, through the compiled model.

    Gradient mode stays on (nothing is backpropagated): Dynamo guards on it, and switching
    it off would compile a second graph for evaluation only.
    """
    total = 0.0
    for window in batches:
        total += lm_loss(compiled(window[:, :-1]), window[:, 1:]).item()
    return total / len(batches)


class SparsityProbe:
    """Measured input sparsity of the *trained* model as the compiled graph computes it.

    The compiler's ``relu2_glu`` pass changes the feed-forward in the graph, not in the
    module, so the probe measures an eager twin built with ``hidden_act="relu2"`` and loaded
    with the current weights: the same function the compiled model computes.
    """

    def __init__(self, s: Settings, options: dict[str, Any], batch: torch.Tensor):
        self.twin = TinyLlama(model_config(s, "relu2"))
        self.options = {k: v for k, v in options.items() if k not in ("inner", "fuse")}
        self.inputs = [batch[:, :-1]]

    def __call__(self, model: torch.nn.Module) -> dict[str, Any]:
        self.twin.load_state_dict(model.state_dict())
        return measure_sparsity(self.twin, self.inputs, self.options).to_dict()


# --- one run -----------------------------------------------------------------------------


def run(name: str, s: Settings, out: Path, ckpt_dir: Path, command: str, resume: bool,
        stop_at: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Train run ``name``; return its log (also written to ``out/<name>.json``)."""
    set_threads(s.threads)
    options = {**RUNS[name], "relu2_glu": True, "inner": s.inner}
    data = ByteData.load()
    val = data.validation_batches(s.eval_seqs, s.batch, s.seq)
    probe = SparsityProbe(s, options, val[0])
    stem = name if s.seed == 0 else f"{name}-seed{s.seed}"  # other seeds: noise estimates
    log_path, ckpt_path = out / f"{stem}.json", ckpt_dir / f"{stem}.pt"

    torch.manual_seed(s.seed)  # same initial weights for every run
    model = TinyLlama(model_config(s))
    optimizer = adamw(model, s.lr, s.weight_decay)
    log: dict[str, Any] = {
        "recipe": "train_from_scratch", "run": name, "status": "running", "command": command,
        "settings": dataclasses.asdict(s),
        "options": {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()},
        "model": {**dataclasses.asdict(model_config(s)), "params": sum(
            p.numel() for p in model.parameters())},
        "tokens_per_step": s.batch * s.seq, "provenance": provenance(s.threads),
        "train_loss": [], "lr": [], "evals": [],
        "wall": {"train_s": 0.0, "eval_s": 0.0, "first_call_s": None, "step_s_median": None},
    }
    start = 0
    restored = restore_run(ckpt_path, model, optimizer, command) if resume else None
    if restored is not None:
        log, start = restored
        if start >= s.steps:
            print(f"{name}: already complete ({start} steps), nothing to do")
            return log

    torch._dynamo.reset()  # a fresh compile per run: no graph cached from another run's options
    compiled = torch.compile(model, backend="qsparse", options=options)
    step_times: list[float] = []

    def evaluate(step: int) -> None:
        t0 = time.perf_counter()
        entry = {"step": step, "val_loss": round(validation_loss(compiled, val), 5)}
        if step > 0:
            entry["grad_norm"] = projection_grad_norms(model)
        entry["sparsity"] = probe(model)
        if step not in (0, s.steps):  # per-projection detail only at the ends: logs stay small
            entry["sparsity"].pop("per_projection")
        entry["wall_s"] = round(log["wall"]["train_s"], 1)
        log["evals"].append(entry)
        log["wall"]["eval_s"] += time.perf_counter() - t0

    def checkpoint(step: int) -> None:
        log["wall"]["step_s_median"] = round(statistics.median(step_times), 4) if \
            step_times else log["wall"]["step_s_median"]
        write_json(log_path, log)
        save_run(ckpt_path, model, optimizer, step, log)

    if start == 0:
        # the initial point of every curve; the first call of the compiled model compiles
        t0 = time.perf_counter()
        evaluate(0)
        log["wall"]["first_call_s"] = round(time.perf_counter() - t0, 2)
        log["compiled"] = compiled_summary(name, compiled)
    end = s.steps if stop_at is None else min(stop_at, s.steps)
    bar = tqdm(range(start, end), desc=name, initial=start, total=s.steps,
               disable=not progress, mininterval=5, file=sys.stderr)
    for step in bar:
        window = data.train_batch(step, s.batch, s.seq, s.seed)
        lr = cosine_lr(step, s.steps, s.warmup, s.lr, s.min_lr_ratio)
        set_lr(optimizer, lr)
        t0 = time.perf_counter()
        loss = lm_loss(compiled(window[:, :-1]), window[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        optimizer.step()
        seconds = time.perf_counter() - t0
        log["wall"]["train_s"] += seconds
        if step != start:  # a resumed session compiles in its first step
            step_times.append(seconds)
        log["train_loss"].append(round(loss.item(), 4))
        log["lr"].append(float(f"{lr:.4g}"))
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"{name}: loss is {loss.item()} at step {step}")
        if (step + 1) % s.eval_every == 0 or step + 1 == s.steps:
            evaluate(step + 1)
            checkpoint(step + 1)
            bar.set_postfix(loss=f"{loss.item():.3f}", val=f"{log['evals'][-1]['val_loss']:.3f}")
    bar.close()
    if end == s.steps:
        log["status"] = "done"
    log["wall"] = {k: round(v, 2) if isinstance(v, float) else v for k, v in log["wall"].items()}
    checkpoint(end)
    return log


def projection_grad_norms(model: torch.nn.Module) -> dict[str, list[float]]:
    """``{role: [weight-gradient norm of layer 0, 1, ...]}`` from the last optimizer step.

    The paper's case for the straight-through estimator is that without it the gradient of
    the lower layers vanishes, most visibly in q and k: this records what happened here.
    The gradients are the clipped ones (clipping scales every layer alike).
    """
    norms: dict[str, list[float]] = {}
    for path, param in model.named_parameters():
        parts = path.split(".")
        if param.grad is None or parts[0] != "layers" or parts[-1] != "weight":
            continue
        role = role_of(".".join(parts[:-1]))
        if role in ("q", "k", "v", "o", "gate", "up", "down"):
            norms.setdefault(role, []).append(float(f"{param.grad.norm().item():.4g}"))
    return norms


def compiled_summary(name: str, compiled: torch.nn.Module) -> dict[str, Any]:
    """What the compiler did to the graph (from the compilation's records), checked against
    the run's intent: a projection silently left dense would make the comparison meaningless."""
    results = records_of(compiled).graphs
    rows = report(compiled)
    if RUNS[name].get("quant"):
        quant = RUNS[name]["quant"]
        wrong = [r["path"] for r in rows if r["role"] != "head" and r["quant"] != quant]
        if wrong:
            raise RuntimeError(f"{name}: projections not quantized: {wrong}")
    return {
        "graphs": len(results),
        "relu2_replaced": sum(res.relu2 for res in results),
        "fused": sum(res.fused for res in results),
        "projections": [{"path": r["path"], "method": r["method"], "quant": r["quant"],
                         "k": r["k"], "in_features": r["in_features"]} for r in rows],
        "activated_fraction": round(rows.totals["activated_fraction"], 4),
    }


# --- command line --------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = recipe_parser(__doc__, list(RUNS), Settings, REPO / "docs/results/logs/from_scratch",
                      REPO / "runs/from_scratch", "inductor", "bytes")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """Run the recipe; return ``{run name: log}``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    s = settings_from(args, Settings, TINY, ("steps", "batch", "seq", "lr", "eval_every", "seed",
                                             "inner", "threads"))
    names = list(RUNS) if args.all else list(dict.fromkeys(args.run))
    logs = {}
    for name in names:
        logs[name] = run(name, s, args.out, args.ckpt_dir,
                         run_command("train_from_scratch.py", argv, name, args.all),
                         args.resume, args.stop_at, progress=not args.quiet)
        last = logs[name]["evals"][-1] if logs[name]["evals"] else {}
        print(f"{name}: step {len(logs[name]['train_loss'])}, val loss "
              f"{last.get('val_loss')}, measured sparsity "
              f"{last.get('sparsity', {}).get('overall')}", flush=True)
    return logs


if __name__ == "__main__":
    main()
