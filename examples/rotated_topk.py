"""Training-free sparsity on SmolLM2-135M: calibrated rotations and sparsity allocation.

Held-out Shakespeare perplexity of the pretrained model (no training) with, at 40% and 50%:

* ``topk``: plain top-K of every projection input (the continue_train training-free rows);
* ``rot-topk``: top-K in the rotated space of a calibration (PCA of each projection input's
  second moment; projections sharing an input share the rotation, folded into the weights);
* ``rot-alloc``: rotated top-K with a greedy per-projection sparsity allocation meeting the
  same activated-parameter budget as uniform top-K (loss proxy measured in rotated space);
* ``alloc``: the allocation without rotations (proxy measured in the original space).

Calibration tokens come from the *training* plays only (random windows, ``--seed``); the
evaluation windows are those of ``examples/continue_train.py`` (same held-out plays, same
windows), every row compiled through ``torch.compile(backend="qsparse")``, so the numbers
compare with its training-free table.

    python examples/rotated_topk.py            # the full table (about 20 min on one thread)
    python examples/rotated_topk.py --quick    # a smoke test on 2 layers

Log: ``docs/results/logs/training_free_rotations/rotated_topk.json`` (``--out``); the
calibration itself goes to ``runs/training_free_rotations/`` (not committed).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import continue_train as ct
import torch
from recipe_common import REPO, command_line, provenance, read_json, set_threads, write_json

import qsparse_compile as qc
from qsparse_compile.compile_records import records_of
from qsparse_compile.report import report
from qsparse_compile.research.allocation import activated, allocation_table, budget
from qsparse_compile.research.calibration import summary

#: Rows of the table: (sparsity, rotated, allocated); dense has sparsity 0.
ROWS: dict[str, tuple[float, bool, bool]] = {
    "dense": (0.0, False, False),
    "topk40": (0.4, False, False),
    "topk50": (0.5, False, False),
    "rot-topk40": (0.4, True, False),
    "rot-topk50": (0.5, True, False),
    "rot-alloc40": (0.4, True, True),
    "rot-alloc50": (0.5, True, True),
    "alloc40": (0.4, False, True),
    "alloc50": (0.5, False, True),
}


@dataclasses.dataclass
class Settings:
    """What defines the run (logged with it)."""

    calib_seqs: int = 32  # calibration windows from the training plays
    calib_len: int = 256
    sample_rows: int = 256  # rows per projection input for the allocation's loss proxy
    seed: int = 0
    eval_seqs: int = ct.Settings.eval_seqs
    eval_len: int = ct.Settings.eval_len
    eval_batch: int = ct.Settings.eval_batch
    inner: str = "eager"
    threads: int = 1
    layers: int | None = None  # keep the first n decoder layers (smoke tests)
    train_chars: int | None = None  # tokenize only the start of the training plays (smoke)


QUICK = {"calib_seqs": 2, "calib_len": 32, "sample_rows": 32, "eval_seqs": 4, "eval_len": 32,
         "eval_batch": 2, "layers": 2, "train_chars": 100_000}


def calibration_batches(train: torch.Tensor, count: int, length: int, seed: int
                        ) -> list[dict[str, Any]]:
    """``count`` random windows of the training tokens, a pure function of ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(train) - length, (count,), generator=gen).tolist()
    return [{"input_ids": train[s:s + length].unsqueeze(0), "use_cache": False}
            for s in starts]


def row_options(name: str, cal: qc.Calibration) -> dict[str, Any]:
    """qsparse options of a row (the calibration object is added by the caller)."""
    sparsity, rotated, allocated = ROWS[name]
    if not allocated:
        return {"sparsity": sparsity}
    config = cal.allocate(sparsity, rotated=rotated)
    return {"sparsity": sparsity, "overrides": dict(config.overrides)}


def run_row(name: str, model: torch.nn.Module, cal: qc.Calibration, windows: torch.Tensor,
            s: Settings) -> dict[str, Any]:
    sparsity, rotated, allocated = ROWS[name]
    t0 = time.perf_counter()
    options = row_options(name, cal)
    compile_options = {**options, "calibration": cal} if rotated and sparsity else options
    compiled = ct.compile_model(model, compile_options, s.inner)
    row: dict[str, Any] = ct.evaluate(compiled, windows, s.eval_batch)
    results = records_of(compiled).graphs
    compiled_rows = report(compiled)
    row["compiled"] = {"graphs": len(results), "rotated_inputs": sum(
        len(res.rotations) for res in results), **{
        k: (round(v, 4) if isinstance(v, float) else v)
        for k, v in compiled_rows.totals.items()}}
    walked = report(model, calibration=cal if rotated and sparsity else None, **options)
    row["report"] = {k: (round(v, 4) if isinstance(v, float) else v)
                     for k, v in walked.totals.items()}
    row["sparsity"], row["rotated"], row["allocated"] = sparsity, rotated, allocated
    if allocated:
        sizes = [(p.in_features, p.out_features) for p in cal.projections]
        ks = [qc.topk_count(d, options["overrides"][p.path])
              for p, (d, _) in zip(cal.projections, sizes, strict=True)]
        row["allocation"] = {
            "budget": budget(sizes, sparsity), "activated": activated(sizes, ks),
            "per_role_sparsity": allocation_table(cal.paths, sizes, options["overrides"])}
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    return row


def run(s: Settings, out: Path, cal_dir: Path, command: str, resume: bool,
        rows: Sequence[str], progress: bool = True) -> dict[str, Any]:
    set_threads(s.threads)
    log_path = out / "rotated_topk.json"
    log: dict[str, Any] = {"recipe": "rotated_topk", "status": "running", "command": command,
                           "settings": dataclasses.asdict(s),
                           "provenance": provenance(s.threads), "rows": {}}
    if resume and log_path.is_file():
        log = read_json(log_path)
        log.setdefault("resumed", []).append({"command": command})
    model, tokenizer = ct.load_model(s.layers)
    data = ct.TokenData(tokenizer, REPO / "runs/continue_train", s.train_chars)
    windows = data.eval_windows(s.eval_seqs, s.eval_len)
    log["eval_tokens"] = int(windows.numel() - windows.shape[0])
    log["calibration_plays"] = "training plays only: " + ", ".join(data.split.train_plays)
    cal_path = cal_dir / f"calibration-seed{s.seed}{'-quick' if s.layers else ''}.safetensors"
    if resume and cal_path.is_file():
        cal = qc.Calibration.load(cal_path)
    else:
        t0 = time.perf_counter()
        batches = calibration_batches(data.train, s.calib_seqs, s.calib_len, s.seed)
        # the decoder only: the head is not calibrated, and at SmolLM2's 49k-token vocabulary
        # it would cost more than the 30 layers
        cal = qc.calibrate(model, batches, sample_rows=s.sample_rows, seed=s.seed,
                           runner=model.model, progress=progress)
        cal.metadata["wall_s"] = round(time.perf_counter() - t0, 1)
        cal.save(cal_path)
    log["calibration"] = {"file": str(cal_path.relative_to(REPO)) if cal_path.is_relative_to(
        REPO) else str(cal_path), "tokens": s.calib_seqs * s.calib_len,
        "groups": len(cal.groups), "projections": len(cal.projections),
        "metadata": cal.metadata, "mean_proxy_error_uniform": summary(cal)}
    write_json(log_path, log)
    for name in rows:
        if name in log["rows"]:
            continue  # done in an earlier session
        row = run_row(name, model, cal, windows, s)
        log["rows"][name] = row
        write_json(log_path, log)
        print(f"{name}: ppl {row['ppl']} (loss {row['loss']}), {row['wall_s']} s", flush=True)
    log["status"] = "done"
    write_json(log_path, log)
    return log


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke-test settings (2 layers)")
    p.add_argument("--rows", nargs="+", choices=list(ROWS), help="rows to run (default all)")
    p.add_argument("--seed", type=int, help="calibration windows and row sample (default 0)")
    p.add_argument("--calib-seqs", type=int, help=f"calibration windows ({Settings.calib_seqs})")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default 1)")
    p.add_argument("--out", type=Path,
                   default=REPO / "docs/results/logs/training_free_rotations",
                   help="folder of the JSON log")
    p.add_argument("--cal-dir", type=Path, default=REPO / "runs/training_free_rotations",
                   help="folder of the calibration file (not committed)")
    p.add_argument("--resume", action="store_true", help="skip rows already in the log")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the evaluation; return the log."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    s = Settings(**(QUICK if args.quick else {}))
    for field, value in (("seed", args.seed), ("calib_seqs", args.calib_seqs),
                         ("threads", args.threads)):
        if value is not None:
            setattr(s, field, value)
    return run(s, args.out, args.cal_dir, command_line("rotated_topk.py", argv), args.resume,
               args.rows or list(ROWS), progress=not args.quiet)


if __name__ == "__main__":
    main()
