"""Plumbing shared by the training recipes: schedule, checkpoints, JSON logs, provenance.

Nothing here is about sparsity; it keeps the two recipes short and their logs alike, so
``make_results.py`` can read both the same way.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent


def cosine_lr(step: int, steps: int, warmup: int, peak: float, floor_ratio: float) -> float:
    """Linear warm-up to ``peak`` in ``warmup`` steps, then cosine decay to ``floor_ratio*peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (floor_ratio + (1 - floor_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def adamw(model: torch.nn.Module, lr: float, weight_decay: float,
          fused: bool = False) -> torch.optim.AdamW:
    """AdamW that decays matrices only (norm gains and biases are not regularised toward 0).

    ``fused=True`` (one kernel for all parameters) made the step of a 100M-parameter model
    about 8x faster on our CPU; it is off by default so small-model runs keep the results
    they were logged with.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": rest, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95), fused=fused or None)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def write_json(path: Path, data: Any) -> None:
    """Write atomically: a run killed mid-write leaves the previous log, not half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` through a temporary file, for the same reason as :func:`write_json`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


def save_run(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
             log: dict[str, Any]) -> None:
    """Checkpoint a training run: weights, optimizer state, the step reached and its log."""
    save_checkpoint(path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                           "step": step, "log": log})


def restore_run(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                command: str) -> tuple[dict[str, Any], int] | None:
    """Load a :func:`save_run` checkpoint into ``model`` and ``optimizer``.

    Returns the run's log (this resumption, by ``command``, recorded in it) and the step to
    continue from; None where there is no checkpoint.
    """
    state = load_checkpoint(path)
    if state is None:
        return None
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    log, step = state["log"], state["step"]
    log.setdefault("resumed", []).append({"at_step": step, "command": command})
    return log, step


def command_line(script: str, argv: Sequence[str],
                 launcher: Sequence[str] = ("python",)) -> str:
    """The command that reproduces a run, as typed from the repository root; ``launcher``
    starts the script (``torchrun --nproc-per-node 2`` for a distributed run)."""
    return shlex.join([*launcher, f"examples/{script}", *argv])


def run_command(script: str, argv: Sequence[str], name: str, every_run: bool,
                launcher: Sequence[str] = ("python",)) -> str:
    """The command that reproduces run ``name`` alone: ``--all`` becomes ``--run name``."""
    if not every_run:
        return command_line(script, argv, launcher)
    return command_line(script, ["--run", name, *[a for a in argv if a != "--all"]], launcher)


def settings_from(args: argparse.Namespace, defaults: Any, tiny: dict[str, Any],
                  fields: Sequence[str]) -> Any:
    """The recipe's settings: ``defaults`` (a dataclass type) or its ``tiny`` variant
    (``--tiny``), then every option among ``fields`` given on the command line."""
    s = defaults(**(tiny if args.tiny else {}))
    for field in fields:
        value = getattr(args, field)
        if value is not None:
            setattr(s, field, value)
    return s


def provenance(threads: int) -> dict[str, Any]:
    """Where and with what a run was produced (so numbers can be compared honestly)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "git_commit": commit or None,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def set_threads(threads: int) -> None:
    """One intra-op thread by default: on a shared 2-core machine, OpenMP threads that
    spin-wait for a busy core made steps 5-10x slower in our measurements."""
    torch.set_num_threads(threads)


def rounded(values: Sequence[float], digits: int = 4) -> list[float]:
    return [round(float(v), digits) for v in values]


def recipe_parser(doc: str, runs: Sequence[str], defaults: Any, out: Path, ckpt_dir: Path,
                  inner_default: str, seq_unit: str) -> argparse.ArgumentParser:
    """The command line the recipes share: which runs, the training budget, the compiler,
    where logs and checkpoints go, resuming. ``defaults`` is the recipe's settings object
    (its field values are shown in the help)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group(required=True)
    # --run-name: the same option, for torchrun, whose own --run-path makes argparse refuse
    # --run there as an ambiguous abbreviation, even after the script's name
    which.add_argument("--run", "--run-name", choices=list(runs), action="append",
                       help="run (repeatable)")
    which.add_argument("--all", action="store_true", help="every run, one after the other")
    p.add_argument("--steps", type=int, help=f"optimizer steps (default {defaults.steps})")
    p.add_argument("--batch", type=int, help=f"sequences per step (default {defaults.batch})")
    p.add_argument("--seq", type=int, help=f"{seq_unit} per training sequence "
                   f"(default {defaults.seq})")
    p.add_argument("--lr", type=float, help=f"peak learning rate (default {defaults.lr})")
    p.add_argument("--eval-every", type=int, help="steps between validation points")
    p.add_argument("--seed", type=int, help="data order (and initial weights; default 0)")
    p.add_argument("--inner", choices=("inductor", "eager"),
                   help=f"the qsparse backend's inner compiler (default {inner_default})")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default 1)")
    p.add_argument("--tiny", action="store_true", help="smoke-test settings (seconds)")
    p.add_argument("--out", type=Path, default=out, help="folder of the JSON logs")
    p.add_argument("--ckpt-dir", type=Path, default=ckpt_dir,
                   help="folder of the checkpoints (not committed)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    p.add_argument("--stop-at", type=int, help="stop after this step (checkpointed), to be "
                   "continued with --resume")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p
