"""Q-Sparse on a pretrained model: SmolLM2-135M (real weights), Shakespeare perplexity.

Two parts, every number through ``torch.compile(model, backend="qsparse", options=...)``:

* ``training-free``: held-out perplexity of the pretrained model as it is (dense) and with
  top-K 40% / 50% and block 2:4 / 16:32 applied without any training.
* ``ft-topk40``, ``ft-topk50``: continue-training (straight-through gradients) on the training
  plays at that sparsity for a fixed budget, then the same evaluation. ``ft-dense`` spends the
  same budget training the dense model: Shakespeare is a new domain for SmolLM2, so the dense
  model improves too, and the gap that sparse training should close is the one to *this*
  control, not to the untouched model.

Perplexity is measured on one fixed subset of the held-out plays (``--eval-seqs`` windows of
``--eval-len`` tokens, evenly spread), the same subset for every row.

    python examples/continue_train.py --all
    python examples/continue_train.py --run training-free
    python examples/continue_train.py --run ft-topk40 --steps 60
    python examples/continue_train.py --run ft-topk40 --tiny      # a smoke test
    torchrun --nproc-per-node 2 examples/continue_train.py --run-name ft-topk40 --fsdp --tiny

Logs: ``<out>/<run>.json``; checkpoints (for ``--resume``) under ``--ckpt-dir``, removed when
a run completes (``--keep-checkpoint`` keeps the final weights as ``<run>.pt``).

Under ``torchrun --nproc-per-node N`` with ``--fsdp`` (FSDP2) or ``--ddp``, each rank trains on
its ``batch / N`` rows of the same global batch, so the losses are those of one process up to
the order of floating-point sums. Checkpoints are ``torch.distributed.checkpoint`` folders
(``<run>.dcp/``) that resume on any number of ranks, one process without torchrun included.
Under torchrun, select a run with ``--run-name`` (torchrun's own ``--run-path`` makes ``--run``
ambiguous to it).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
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
    read_json,
    recipe_parser,
    run_command,
    save_checkpoint,
    set_lr,
    set_threads,
    settings_from,
    write_json,
)
from recipe_distributed import (
    Parallel,
    clip_grad_norm,
    full_state_dict,
    no_grad_sync,
    remove_checkpoint,
    start,
    stop,
    wrap,
)
from recipe_distributed import restore_run as restore_dcp
from recipe_distributed import save_run as save_dcp
from tqdm import tqdm

import qsparse_compile
from qsparse_compile.compile_records import records_of
from qsparse_compile.report import report
from qsparse_compile.research.data import shakespeare_split
from qsparse_compile.research.measure import measure_sparsity

#: Rows of the training-free table: qsparse options.
TRAINING_FREE: dict[str, dict[str, Any]] = {
    "dense": {"sparsity": 0.0},
    "topk40": {"sparsity": 0.4},
    "topk50": {"sparsity": 0.5},
    "block2-4": {"method": "block", "block": (2, 4)},
    "block16-32": {"method": "block", "block": (16, 32)},
}

#: Continue-training runs: qsparse options (straight-through gradients, the default).
FINE_TUNE: dict[str, dict[str, Any]] = {
    "ft-dense": {"sparsity": 0.0},
    "ft-topk40": {"sparsity": 0.4},
    "ft-topk50": {"sparsity": 0.5},
}

RUN_NAMES = ("training-free", *FINE_TUNE)


@dataclasses.dataclass
class Settings:
    """Everything that defines a run besides its qsparse options (logged with the run)."""

    steps: int = 32
    batch: int = 4
    seq: int = 128
    lr: float = 2e-4
    warmup: int = 3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    freeze_embeddings: bool = True  # tied with the head: 28M of the 135M parameters
    eval_seqs: int = 32
    eval_len: int = 256
    eval_batch: int = 4
    quick_eval_seqs: int = 8  # the curve during training: a subset of the eval windows
    eval_every: int = 8
    ckpt_every: int = 8
    seed: int = 0
    inner: str = "eager"
    threads: int = 1
    model: str = "smollm2-135m"
    layers: int | None = None  # keep only the first n decoder layers (smoke tests)
    repeat_batch: bool = False  # train on one batch over and over (smoke tests)
    train_chars: int | None = None  # tokenize only the start of the training plays (smoke)


#: ``--tiny``: a smoke test of the recipe, not an experiment: the real weights of the first
#: 4 layers (nothing smaller ships offline), 32-token windows, 6 steps on one repeated batch
#: (so the loss must fall if gradients reach the weights), evaluation windows of the
#: training shape (so the training graph is reused instead of a second one traced).
TINY = {"steps": 6, "batch": 2, "seq": 32, "warmup": 2, "eval_seqs": 4, "eval_len": 32,
        "eval_batch": 2, "quick_eval_seqs": 2, "eval_every": 3, "ckpt_every": 3,
        "lr": 3e-4, "layers": 4, "repeat_batch": True, "train_chars": 100_000}


# --- data and model ----------------------------------------------------------------------


def load_model(layers: int | None = None):
    """(model, tokenizer): SmolLM2-135M, optionally cut to its first ``layers`` layers."""
    from qsparse_compile.research.models.smollm2 import load_smollm2

    model, tokenizer = load_smollm2()
    if layers is not None:
        model.model.layers = torch.nn.ModuleList(list(model.model.layers)[:layers])
        model.config.num_hidden_layers = layers
    return model, tokenizer


class TokenData:
    """The Shakespeare split as token ids; the training plays are tokenized on first use
    (1.4M tokens: half a minute on a busy CPU) and cached next to the checkpoints."""

    def __init__(self, tokenizer, cache: Path | None = None, train_chars: int | None = None):
        self.tokenizer, self.cache, self.train_chars = tokenizer, cache, train_chars
        tokenizer.model_max_length = 1 << 30  # whole plays: no "sequence too long" warning
        self.split = shakespeare_split()
        self.validation = self._encode(self.split.validation)
        self._train: torch.Tensor | None = None

    def _encode(self, text: str) -> torch.Tensor:
        return torch.tensor(self.tokenizer(text, return_attention_mask=False)["input_ids"])

    @property
    def train(self) -> torch.Tensor:
        if self._train is None:
            text = self.split.train[: self.train_chars]
            key = hashlib.sha1(f"{len(self.tokenizer)}\n{text}".encode()).hexdigest()[:16]
            path = self.cache / f"train-tokens-{key}.pt" if self.cache else None
            if path is not None and path.is_file():
                self._train = torch.load(path)
            else:
                self._train = self._encode(text)
                if path is not None:
                    save_checkpoint(path, self._train)
        return self._train

    def train_batch(self, step: int, batch: int, seq: int, seed: int) -> torch.Tensor:
        """Random windows, a pure function of (seed, step), identical for every run."""
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        starts = torch.randint(0, len(self.train) - seq - 1, (batch,), generator=gen)
        return torch.stack([self.train[s:s + seq] for s in starts.tolist()])

    def eval_windows(self, count: int, length: int) -> torch.Tensor:
        """``count`` non-overlapping windows evenly spread over the held-out plays."""
        total = len(self.validation) // length
        if count > total:
            raise ValueError(f"only {total} windows of {length} tokens in the validation plays")
        picks = torch.linspace(0, total - 1, count).long()
        return self.validation[: total * length].view(total, length)[picks]


def nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token negative log-likelihood of ``ids`` (positions 1..T-1)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                           ids[:, 1:].reshape(-1), reduction="sum")


def evaluate(compiled: torch.nn.Module, windows: torch.Tensor, batch: int,
             grad: bool = False, par: Parallel | None = None) -> dict[str, float]:
    """Mean NLL (nats/token) and perplexity over ``windows``.

    ``grad=True`` keeps gradient mode on (nothing is backpropagated) during training: Dynamo
    guards on the mode, so windows of the training shape then reuse the training graph.
    Under ``par`` each rank evaluates its rows of every ``batch`` (the training split, so the
    graph is shared there too) and the sums are added over ranks.
    """
    par = par or Parallel()
    total, count = 0.0, 0
    with torch.set_grad_enabled(grad), no_grad_sync(compiled):
        for chunk in windows.split(batch):
            mine = par.rows(chunk).to(par.device)
            total += nll(compiled(input_ids=mine, use_cache=False).logits, mine).item()
            count += mine.shape[0] * (mine.shape[1] - 1)
    total, count = par.sum([total, count])
    loss = total / count
    return {"loss": round(loss, 5), "ppl": round(math.exp(loss), 4)}


def compile_model(model: torch.nn.Module, options: dict[str, Any], inner: str):
    """``model`` compiled by the qsparse backend with ``options`` (static shapes), afresh."""
    return wrap(model, {**options, "inner": inner}, Parallel())[0]


def compiled_summary(compiled: Any) -> dict[str, Any]:
    """Graphs, projections, methods and activated fraction of a compiled model, or of a
    :class:`qsparse_compile.Backend` (FSDP2's per-layer compiles: paths within a layer)."""
    per_layer = isinstance(compiled, qsparse_compile.Backend)
    results = compiled.results if per_layer else records_of(compiled).graphs
    rows = report(compiled)
    methods = sorted({r["method"] for r in rows})
    # evaluation and training shapes compile one graph each: count projections once
    summary = {"graphs": len(results), "projections": len({r["path"] for r in rows}),
               "methods": methods,
               "activated_fraction": round(rows.totals["activated_fraction"], 4)}
    if per_layer:  # the layers share their graphs: paths are a layer's, the head is eager
        summary["scope"] = "decoder layer"
    return summary


def measured(model: torch.nn.Module, options: dict[str, Any], ids: torch.Tensor
             ) -> dict[str, Any]:
    m = measure_sparsity(model, [ids], options).to_dict()
    m.pop("per_projection")
    return m


# --- runs ----------------------------------------------------------------------------------


def training_free(s: Settings, out: Path, command: str, resume: bool) -> dict[str, Any]:
    """Evaluate the pretrained model under each training-free configuration."""
    set_threads(s.threads)
    log_path = out / "training-free.json"
    log: dict[str, Any] = {
        "recipe": "continue_train", "run": "training-free", "status": "running",
        "command": command, "settings": dataclasses.asdict(s),
        "provenance": provenance(s.threads), "rows": {}}
    if resume and log_path.is_file():
        log = read_json(log_path)
        log.setdefault("resumed", []).append({"command": command})
    model, tokenizer = load_model(s.layers)
    windows = TokenData(tokenizer).eval_windows(s.eval_seqs, s.eval_len)
    log["eval_tokens"] = int(windows.numel() - windows.shape[0])
    for name, options in TRAINING_FREE.items():
        if name in log["rows"]:
            continue  # done in an earlier session
        t0 = time.perf_counter()
        compiled = compile_model(model, options, s.inner)
        row = evaluate(compiled, windows, s.eval_batch)
        row["compiled"] = compiled_summary(compiled)
        row["options"] = _jsonable(options)
        row["report_activated_fraction"] = round(
            report(model, **options).totals["activated_fraction"], 4)
        row["sparsity"] = measured(model, options, windows[:1])
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        log["rows"][name] = row
        write_json(log_path, log)
        print(f"training-free {name}: ppl {row['ppl']} (loss {row['loss']}), "
              f"{row['wall_s']} s", flush=True)
    log["status"] = "done"
    write_json(log_path, log)
    return log


def fine_tune(name: str, s: Settings, out: Path, ckpt_dir: Path, command: str, resume: bool,
              stop_at: int | None = None, progress: bool = True,
              keep_checkpoint: bool = False, tag: str | None = None,
              par: Parallel | None = None) -> dict[str, Any]:
    """Continue-train the pretrained model under ``FINE_TUNE[name]``, then evaluate it.

    ``tag`` names the files ``<name>-<tag>``: a run with other settings (a longer budget)
    beside the standard one. ``par`` (see :func:`recipe_distributed.start`): FSDP2 or DDP over
    a process group, each rank on its rows of the same global batch; one process if None.
    Rank 0 alone writes the log; every rank writes its shards of the checkpoints.
    """
    par = par or Parallel()
    set_threads(s.threads)
    options = FINE_TUNE[name]
    stem = f"{name}-{tag}" if tag else name
    log_path, ckpt_root = out / f"{stem}.json", ckpt_dir / f"{stem}.dcp"
    weights_path = ckpt_dir / f"{stem}.pt"  # --keep-checkpoint: the trained weights
    model, tokenizer = load_model(s.layers)
    data = TokenData(tokenizer, ckpt_dir, s.train_chars)
    if par.world > 1:  # rank 0 tokenizes and caches the training plays; the others read them
        if par.main:
            data.train  # noqa: B018  (the property tokenizes)
        par.barrier()
    windows = data.eval_windows(s.eval_seqs, s.eval_len)
    quick = windows[torch.linspace(0, len(windows) - 1, s.quick_eval_seqs).long()]
    if s.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    model.to(par.device).train()
    torch.manual_seed(s.seed)
    run, compiled = wrap(model, {**options, "inner": s.inner}, par)
    # after wrapping: under FSDP2 the optimizer must hold the sharded (DTensor) parameters
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(model, s.lr, s.weight_decay, fused=True)
    log: dict[str, Any] = {
        "recipe": "continue_train", "run": name, "status": "running", "command": command,
        "settings": dataclasses.asdict(s), "options": _jsonable(options),
        "parallel": par.describe(),
        "trainable_params": sum(p.numel() for p in trainable),
        "tokens_per_step": s.batch * s.seq, "eval_tokens": int(windows.numel() - len(windows)),
        "provenance": provenance(s.threads), "train_loss": [], "lr": [], "quick_evals": [],
        "wall": {"train_s": 0.0, "eval_s": 0.0, "step_s_median": None},
    }
    start = 0
    restored = restore_dcp(ckpt_root, model, optimizer, command, par) if resume else None
    if restored is not None:
        log, start = restored
        log["parallel"] = par.describe()
    elif resume and log_path.is_file():
        done = read_json(log_path)
        if done.get("status") == "done":
            if par.main:
                print(f"{name}: already complete, nothing to do")
            return done

    step_times: list[float] = []
    session_s = 0.0  # this session's training time (a resumed run's log sums every session)

    def session(to_step: int) -> None:
        # what each session (world size, steps) took: a run may change world size on resume
        log["wall"].setdefault("sessions", []).append(
            {"ranks": par.world, "mode": par.mode, "steps": [start, to_step],
             "train_s": round(session_s, 2),
             "step_s_median": round(statistics.median(step_times), 3) if step_times else None})

    def quick_eval(step: int) -> None:
        t0 = time.perf_counter()
        log["quick_evals"].append(
            {"step": step, **evaluate(run, quick, s.eval_batch, grad=True, par=par)})
        log["wall"]["eval_s"] += time.perf_counter() - t0

    def checkpoint(step: int) -> None:
        if step_times:
            log["wall"]["step_s_median"] = round(statistics.median(step_times), 3)
        if par.main:
            write_json(log_path, log)
        save_dcp(ckpt_root, model, optimizer, step, log, par)

    if start == 0:
        quick_eval(0)
    end = s.steps if stop_at is None else min(stop_at, s.steps)
    bar = tqdm(range(start, end), desc=name, initial=start, total=s.steps,
               disable=not (progress and par.main), mininterval=5, file=sys.stderr)
    for step in bar:
        ids = par.rows(data.train_batch(0 if s.repeat_batch else step, s.batch, s.seq, s.seed))
        lr = cosine_lr(step, s.steps, s.warmup, s.lr, s.min_lr_ratio)
        set_lr(optimizer, lr)
        t0 = time.perf_counter()
        ids = ids.to(par.device)
        # the mean over this rank's tokens; ranks hold equal shares, so DDP's and FSDP's
        # gradient average is the gradient of the mean over the global batch
        loss = nll(run(input_ids=ids, use_cache=False).logits, ids) / (ids.numel() - len(ids))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_grad_norm(trainable, s.grad_clip)
        optimizer.step()
        value = par.mean(loss.item())  # the global batch's loss, what one process reports
        seconds = time.perf_counter() - t0
        log["wall"]["train_s"] += seconds
        session_s += seconds
        if step == start:
            log["wall"].setdefault("first_step_s", round(seconds, 2))  # includes the compile
            log["compiled"] = compiled_summary(compiled)
        else:
            step_times.append(seconds)
        if not math.isfinite(value):
            raise FloatingPointError(f"{name}: loss is {value} at step {step}")
        log["train_loss"].append(round(value, 4))
        log["lr"].append(float(f"{lr:.4g}"))
        bar.set_postfix(loss=f"{value:.3f}")
        if (step + 1) % s.eval_every == 0 and step + 1 < s.steps:
            quick_eval(step + 1)
        if (step + 1) % s.ckpt_every == 0 and step + 1 < end:
            checkpoint(step + 1)
    bar.close()
    if end < s.steps:  # stopped on purpose: continue with --resume
        session(end)
        checkpoint(end)
        return log
    quick_eval(s.steps)
    if step_times:  # this session's steps (a resumed run's earlier ones are in its log)
        log["wall"]["step_s_median"] = round(statistics.median(step_times), 3)
    session(s.steps)
    t0 = time.perf_counter()
    log["final"] = evaluate(run, windows, s.eval_batch, grad=True, par=par)
    # the sparsity is measured eager on one process's whole model: rank 0 rebuilds it from
    # the gathered weights under FSDP2 (its layers are compiled and sharded in place)
    weights = full_state_dict(model, par) if par.mode == "fsdp" or keep_checkpoint else None
    if par.main:
        plain = model
        if par.mode == "fsdp":
            plain = load_model(s.layers)[0]
            plain.load_state_dict(weights)
        log["final"]["sparsity"] = measured(plain, options, windows[:1].to(plain.device))
    log["wall"]["eval_s"] += time.perf_counter() - t0
    log["wall"] = {k: round(v, 2) if isinstance(v, float) else v for k, v in log["wall"].items()}
    log["status"] = "done"
    if par.main:
        write_json(log_path, log)
        if keep_checkpoint:
            save_checkpoint(weights_path, {"model": weights, "step": s.steps, "log": log})
    remove_checkpoint(ckpt_root, par)  # 1.4 GB with the optimizer state
    if par.main:
        print(f"{name}: ppl {log['final']['ppl']} (loss {log['final']['loss']}) after "
              f"{s.steps} steps, {log['wall']['train_s']} s training", flush=True)
    return log


def _jsonable(options: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}


# --- command line --------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The recipe's command line; contradictory parallel options are refused here."""
    p = recipe_parser(__doc__, RUN_NAMES, Settings, REPO / "docs/results/logs/continue_train",
                      REPO / "runs/continue_train", "eager", "tokens")
    p.add_argument("--eval-seqs", type=int, help=f"held-out windows ({Settings.eval_seqs})")
    p.add_argument("--layers", type=int,
                   help="keep only the first n decoder layers (default: all 30; --tiny: 4)")
    p.add_argument("--keep-checkpoint", action="store_true",
                   help="keep the trained weights when a run completes")
    p.add_argument("--tag", help="suffix of the continue-training logs and checkpoints, for "
                   "runs with non-default settings (e.g. --steps 96 --tag 96steps)")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: FSDP2, each decoder layer compiled then fully_shard")
    p.add_argument("--ddp", action="store_true",
                   help="under torchrun: DistributedDataParallel around the compiled model")
    args = p.parse_args(argv)
    if args.fsdp and args.ddp:
        p.error("--fsdp and --ddp were both given; choose one: --fsdp (FSDP2, parameters "
                "sharded) or --ddp (parameters replicated)")
    args.parallel = "fsdp" if args.fsdp else "ddp" if args.ddp else None
    runs = list(RUN_NAMES) if args.all else args.run
    if args.parallel and "training-free" in runs:
        p.error(f"--{args.parallel} trains on several ranks, and the training-free run does "
                f"not train; run it in one process, or give --run-name with one of "
                f"{', '.join(FINE_TUNE)}")
    if args.layers is not None and args.layers < 1:
        p.error(f"--layers {args.layers}: keep at least 1 decoder layer")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """Run the recipe; return ``{run name: log}``.

    With ``--fsdp`` or ``--ddp``, every rank of the torchrun job runs this and joins the
    process group first.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    s = settings_from(args, Settings, TINY, ("steps", "batch", "seq", "lr", "eval_seqs",
                                             "eval_every", "seed", "inner", "threads",
                                             "layers"))
    par = start(args.parallel)
    try:
        names = list(RUN_NAMES) if args.all else list(dict.fromkeys(args.run))
        logs = {}
        for name in names:
            command = run_command("continue_train.py", argv, name, args.all, par.launcher)
            if name == "training-free":
                logs[name] = training_free(s, args.out, command, args.resume)
            else:
                logs[name] = fine_tune(name, s, args.out, args.ckpt_dir, command, args.resume,
                                       args.stop_at, progress=not args.quiet,
                                       keep_checkpoint=args.keep_checkpoint, tag=args.tag,
                                       par=par)
    finally:
        stop(par)
    return logs


if __name__ == "__main__":
    main()
