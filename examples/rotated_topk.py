"""Training-free sparsity on SmolLM2-135M: calibrated rotations and sparsity allocation.

Held-out Shakespeare perplexity of the pretrained model (no training) with, at 40% and 50%:

* ``topk``: plain top-K of every projection input (the continue_train training-free rows);
* ``rot-topk``: top-K in the rotated space of a calibration (PCA of each projection input's
  second moment; projections sharing an input share the rotation, folded into the weights);
* ``rot-alloc``: rotated top-K with a greedy per-projection sparsity allocation meeting the
  same activated-parameter budget as uniform top-K (loss proxy measured in rotated space);
* ``alloc``: the allocation without rotations (proxy measured in the original space).

Training-free mode (rotations folded into the weights, no runtime product; allocation by the
measured loss), :data:`FOLDED_ROWS`:

* ``fold-pca``: one residual-stream rotation (PCA of the weightless normalised stream at every
  norm, pooled) folded with the norm weights into embedding, readers and writers;
* ``fold-pca-heads``: plus one rotation per kv head of o's input, folded into v and o;
* ``fold-scaled``: plus every projection input scaled by its weight columns' norms, folded into
  norm weights / readers, v / o, up / down (top-K keeps the largest ``|x_j| ||W[:, j]||``);
* ``fold-hadamard``: data-free randomised Hadamard-like rotations (residual and heads) instead;
* ``fold-layers``: one PCA rotation per layer (+ heads, scales); the stream changes basis
  between layers, a ``D x D`` product per boundary at runtime (counted in ``added_macs``);
* ``fold-segments3``: the same with 3 segments of 10 layers sharing a rotation: 2 changes;
* ``fold-layers-plain``: ``fold-layers`` without the importance scales;
* ``fold-layers64`` / ``fold-layers64-plain``: ``fold-layers`` (-``plain``) calibrated on
  64 windows instead of ``Settings.fold_seqs``;
* ``fold-layers-down-pca`` / ``fold-layers-down-hadamard``: ``fold-layers`` plus an online
  block-diagonal rotation of the down input (PCA of each block of 64 features, or one
  Hadamard block of 512 repeated), the importance scales folded into it;
* ``loss-alloc``: per-role sparsities (q/k/v, o, gate/up, down) by TEAL's greedy on the
  measured loss of held-out calibration windows, at the activated budget of uniform top-K;
* ``fold-loss-alloc``: ``fold-layers64-plain`` with the loss-driven allocation (measured on it).

Every folded row is the folded model compiled by ``backend="qsparse"`` with plain options, so
the decode fast paths run the folded weights; :func:`row_model` builds it for timing
(``run(..., timer=...)`` records what a timer returns under each row's ``speed``).

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
from collections.abc import Callable, Sequence
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
from qsparse_compile.research.folded_rotations import FoldedRotations, calibrate_folded
from qsparse_compile.research.loss_allocation import loss_allocation

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

#: Folding variants: keyword arguments of calibrate_folded (and ``windows``: calibration
#: windows, default ``Settings.fold_seqs``), and the importance-scale power.
FOLDS: dict[str, tuple[dict[str, Any], float | None]] = {
    "none": ({"residual": None, "heads": None}, None),
    "pca": ({"residual": "pca", "heads": None}, None),
    "pca-heads": ({"residual": "pca", "heads": "pca"}, None),
    "scaled": ({"residual": "pca", "heads": "pca"}, 1.0),
    "hadamard": ({"residual": "hadamard", "heads": "hadamard"}, None),
    "layers": ({"residual": "pca", "per_layer": True, "heads": "pca"}, 1.0),
    "segments3": ({"residual": "pca", "per_layer": True, "segments": 3, "heads": "pca"}, 1.0),
    "layers-plain": ({"residual": "pca", "per_layer": True, "heads": "pca"}, None),
    "layers64": ({"residual": "pca", "per_layer": True, "heads": "pca", "windows": 64}, 1.0),
    "layers64-plain": ({"residual": "pca", "per_layer": True, "heads": "pca", "windows": 64},
                       None),
    "layers-down-pca": ({"residual": "pca", "per_layer": True, "heads": "pca", "down": "pca",
                         "down_block": 64}, 1.0),
    "layers-down-hadamard": ({"residual": "pca", "per_layer": True, "heads": "pca",
                              "down": "hadamard", "down_block": 512}, 1.0),
}

#: Training-free rows: (sparsity, fold variant, loss-driven allocation).
FOLDED_ROWS: dict[str, tuple[float, str, bool]] = {
    **{f"{name}{p}": (p / 100, fold, alloc) for p in (40, 50) for name, fold, alloc in (
        ("fold-scaled", "scaled", False), ("loss-alloc", "none", True),
        ("fold-loss-alloc", "layers64-plain", True), ("fold-pca", "pca", False),
        ("fold-pca-heads", "pca-heads", False), ("fold-hadamard", "hadamard", False),
        ("fold-layers", "layers", False), ("fold-segments3", "segments3", False),
        ("fold-layers-plain", "layers-plain", False),
        ("fold-layers64", "layers64", False), ("fold-layers64-plain", "layers64-plain", False),
        ("fold-layers-down-pca", "layers-down-pca", False),
        ("fold-layers-down-hadamard", "layers-down-hadamard", False))},
}
ALL_ROWS = [*ROWS, *FOLDED_ROWS]


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
    fold_seqs: int = 16  # calibration windows of the folded rotations (training plays)
    alloc_seqs: int = 4  # held-out calibration windows whose loss drives the allocation
    alloc_step: float = 0.1  # sparsity added to one role group per greedy step


QUICK = {"calib_seqs": 2, "calib_len": 32, "sample_rows": 32, "eval_seqs": 4, "eval_len": 32,
         "eval_batch": 2, "layers": 2, "train_chars": 100_000, "fold_seqs": 2,
         "alloc_seqs": 1, "alloc_step": 0.25}


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


class FoldedState:
    """The folded rotations and loss-driven allocations of one run: computed on first use,
    cached under ``cal_dir`` (so a resumed run reuses them), reported in the log."""

    def __init__(self, model: torch.nn.Module, train: torch.Tensor, s: Settings, cal_dir: Path,
                 progress: bool):
        self.model, self.train, self.s, self.progress = model, train, s, progress
        self.tag = f"seed{s.seed}{'-quick' if s.layers else ''}"
        self.cal_dir = cal_dir
        self._rotations: dict[str, FoldedRotations] = {}
        self._allocations: dict[str, dict[str, Any]] = {}

    def rotations(self, fold: str) -> FoldedRotations:
        if fold not in self._rotations:
            path = self.cal_dir / f"folded-{fold}-{self.tag}.safetensors"
            if path.is_file():
                self._rotations[fold] = FoldedRotations.load(path)
            else:
                kwargs, power = FOLDS[fold]
                if "segments" in kwargs:  # smoke runs have fewer layers than segments
                    kwargs = {**kwargs, "segments": min(kwargs["segments"],
                                                        len(self.model.model.layers))}
                t0 = time.perf_counter()
                windows = kwargs.get("windows", self.s.fold_seqs)
                kwargs = {k: v for k, v in kwargs.items() if k != "windows"}
                if self.s.layers:  # smoke runs: a few windows
                    windows = min(windows, self.s.fold_seqs)
                batches = calibration_batches(self.train, windows, self.s.calib_len,
                                              self.s.seed)
                rot = calibrate_folded(self.model, batches, seed=self.s.seed,
                                       runner=self.model.model, **kwargs)
                rot.scale_power = power
                rot.metadata["wall_s"] = round(time.perf_counter() - t0, 1)
                rot.metadata["windows"] = windows
                rot.save(path)
                self._rotations[fold] = rot
        return self._rotations[fold]

    def folded(self, fold: str) -> torch.nn.Module:
        return self.rotations(fold).apply(self.model)

    def allocation(self, fold: str, sparsity: float) -> dict[str, Any]:
        """The loss-driven allocation of ``fold``'s model at ``sparsity`` (both targets of
        one greedy trajectory are computed together)."""
        if fold not in self._allocations:
            # the windows and the greedy's pricing (per weight) name the file: a resumed run
            # never reuses an allocation found otherwise
            path = self.cal_dir / (f"loss-alloc-{fold}-{self.tag}-{self.s.alloc_seqs}w"
                                   f"-per-weight.json")
            if path.is_file():
                self._allocations[fold] = read_json(path)
            else:
                t0 = time.perf_counter()
                model = self.folded(fold)
                # held-out calibration: training-play windows of another seed than the fold's
                ids = torch.cat([b["input_ids"] for b in calibration_batches(
                    self.train, self.s.alloc_seqs, self.s.calib_len, self.s.seed + 1)])
                found = loss_allocation(model, [ids], targets=(0.4, 0.5),
                                        step=self.s.alloc_step,
                                        progress=print if self.progress else None)
                self._allocations[fold] = {
                    f"{t:g}": {**a.to_dict(), "calib_tokens": int(ids.numel())}
                    for t, a in found.items()}
                self._allocations[fold]["wall_s"] = round(time.perf_counter() - t0, 1)
                write_json(path, self._allocations[fold])
        return self._allocations[fold][f"{sparsity:g}"]


def row_model(name: str, state: FoldedState, inner: str = "eager"
              ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(the compiled model of a training-free row, its qsparse options): the hook for timing
    a row's decode (compile with another ``inner`` there, e.g. ``"inductor"``)."""
    sparsity, fold, allocated = FOLDED_ROWS[name]
    options: dict[str, Any] = {"sparsity": sparsity}
    if FOLDS[fold][0].get("per_layer"):
        # the basis change between layers is a product on a buffer the compiler would
        # otherwise sparsify like a projection: it is an exact rotation, kept dense
        options["exclude"] = (*qc.config.DEFAULT_EXCLUDE, "*.basis_change.change")
    if allocated:
        options["overrides"] = dict(state.allocation(fold, sparsity)["overrides"])
    return ct.compile_model(state.folded(fold), options, inner), options


def _rounded(totals: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in totals.items()}


def run_folded_row(name: str, state: FoldedState, windows: torch.Tensor, s: Settings,
                   timer: Callable[[str, torch.nn.Module], dict[str, Any]] | None = None
                   ) -> dict[str, Any]:
    """Perplexity, activated weights and runtime multiply-adds of a training-free row."""
    sparsity, fold, allocated = FOLDED_ROWS[name]
    t0 = time.perf_counter()
    compiled, options = row_model(name, state, s.inner)
    row: dict[str, Any] = ct.evaluate(compiled, windows, s.eval_batch)
    rot = state.rotations(fold)
    totals = _rounded(report(compiled).totals)
    added = rot.added_macs(state.model) + totals["rotation_macs"]
    row.update({
        "sparsity": sparsity, "fold": fold, "fold_metadata": rot.metadata,
        "scale_power": rot.scale_power, "allocated": allocated, "compiled": totals,
        # weights the sparsity skips per token, beside what the rotations add at runtime
        "skipped_weights": totals["params"] - totals["activated_params"],
        "added_macs": added,
        "added_macs_detail": {"folded": 0, "layer_basis_changes": rot.added_macs(state.model),
                              "compiled_rotations": totals["rotation_macs"]}})
    if allocated:
        row["allocation"] = state.allocation(fold, sparsity)
    if timer is not None:
        row["speed"] = timer(name, compiled)
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    return row


def run(s: Settings, out: Path, cal_dir: Path, command: str, resume: bool,
        rows: Sequence[str], progress: bool = True,
        timer: Callable[[str, torch.nn.Module], dict[str, Any]] | None = None
        ) -> dict[str, Any]:
    """Run ``rows`` (skipping those already logged when ``resume``); ``timer(name, compiled)``,
    if given, times each training-free row's compiled model (its dict goes under ``speed``)."""
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
    log["settings"].update({f: getattr(s, f) for f in ("fold_seqs", "alloc_seqs", "alloc_step")})
    write_json(log_path, log)
    state = FoldedState(model, data.train, s, cal_dir, progress)
    for name in rows:
        if name in log["rows"] or name not in FOLDED_ROWS:
            continue
        log["rows"][name] = row = run_folded_row(name, state, windows, s, timer)
        write_json(log_path, log)
        print(f"{name}: ppl {row['ppl']} (loss {row['loss']}), {row['wall_s']} s", flush=True)
    if all(name in log["rows"] for name in rows if name in ROWS):
        log["status"] = "done"
        write_json(log_path, log)
        return log
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
        if name in log["rows"] or name not in ROWS:
            continue  # done in an earlier session, or a training-free row
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
    p.add_argument("--rows", nargs="+", choices=ALL_ROWS,
                   help="rows to run (default all)")
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
               args.rows or ALL_ROWS, progress=not args.quiet)


if __name__ == "__main__":
    main()
