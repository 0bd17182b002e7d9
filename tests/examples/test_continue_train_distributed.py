"""examples/continue_train.py under torchrun on 2 gloo ranks (SmolLM2-135M's first 2 layers).

FSDP2 trains the first half of the ``--tiny`` run on 2 ranks and checkpoints it with DCP; one
process without torchrun resumes it, checkpoints again, and a third session finishes it. The
loss curve must be that of one uninterrupted process on the same global batch. DDP trains the
whole run on 2 ranks, with the same expectation.

Tolerance: unrounded, the 2-rank losses differed from one process by 8.3e-8 relative at most
(FSDP2; DDP 7.8e-8), quick and final evaluations by 1.4e-7 (fp32 sums in another order); the
logs round losses to 4 decimals, so two equal runs may differ by one unit there. A wrong
gradient average or a dense projection moves the losses by 1e-2 and more.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import continue_train as recipe
import pytest
from recipe_distributed import Parallel

pytest.importorskip("transformers")

EXAMPLES = Path(recipe.__file__).resolve().parent
RUN = "ft-topk40"
STEPS, SAVED = recipe.TINY["steps"], 3  # the 2-rank session stops (and saves) at step 3
ARGS = ["--run-name", RUN, "--tiny", "--layers", "2", "--quiet"]
#: loss equality: relative (measured 1e-7) and the 4-decimal rounding of the logged losses
RTOL, ATOL = 1e-4, 1e-4
#: seconds one torchrun session may take (2 ranks on 2 busy cores; 40 s measured)
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A QSPARSE_CACHE_DIR of this module's own (as tests/distributed/ranks.py gives its
    ranks), holding the already converted SmolLM2 weights by a link, not a second copy."""
    from qsparse_compile.research.models import smollm2

    if not (smollm2.cache_dir() / "model.safetensors").is_file():
        smollm2.load_smollm2()  # converts once
    root = tmp_path_factory.mktemp("qsparse-cache")
    (root / "smollm2-135m").symlink_to(smollm2.cache_dir(), target_is_directory=True)
    return root


@pytest.fixture
def in_cache(cache, monkeypatch) -> Path:
    monkeypatch.setenv("QSPARSE_CACHE_DIR", str(cache))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)  # the in-process sessions: one process
    return cache


@pytest.fixture(scope="module")
def single(cache, tmp_path_factory) -> dict:
    """The reference: one process, the whole run, uninterrupted."""
    out = tmp_path_factory.mktemp("single")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QSPARSE_CACHE_DIR", str(cache))
        log = recipe.main([*ARGS, "--out", str(out / "logs"), "--ckpt-dir", str(out / "ckpt")])
    return log[RUN]


def torchrun(cache: Path, cwd: Path, *args: str) -> None:
    """``torchrun --standalone --nproc-per-node 2 examples/continue_train.py *args``, each
    rank on one thread; killed with its ranks (its process group) past :data:`TIMEOUT_S`."""
    env = {**os.environ, "QSPARSE_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", str(EXAMPLES / "continue_train.py"), *args]
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"torchrun {' '.join(args)} ran past {TIMEOUT_S} s:\n{output[-4000:]}")
    assert proc.returncode == 0, f"torchrun {' '.join(args)} failed:\n{output[-6000:]}"


def _assert_same_curve(got: dict, expected: dict, what: str) -> None:
    assert len(got["train_loss"]) == len(expected["train_loss"]) == STEPS
    assert got["train_loss"] == pytest.approx(expected["train_loss"], rel=RTOL, abs=ATOL), what
    for a, b in zip(got["quick_evals"], expected["quick_evals"], strict=True):
        assert a["step"] == b["step"]
        assert a["loss"] == pytest.approx(b["loss"], rel=RTOL, abs=ATOL), f"{what}: {a} vs {b}"
    assert got["final"]["loss"] == pytest.approx(expected["final"]["loss"], rel=RTOL, abs=ATOL)
    assert got["final"]["sparsity"] == expected["final"]["sparsity"]


def test_fsdp_on_2_ranks_resumes_on_1_and_matches_one_process(single, in_cache, tmp_path):
    losses = single["train_loss"]
    assert losses[-1] < losses[0] - 1.0, losses  # it trains: equal curves mean something
    where = ["--out", str(tmp_path / "logs"), "--ckpt-dir", str(tmp_path / "ckpt")]
    torchrun(in_cache, tmp_path, *ARGS, *where, "--fsdp", "--stop-at", str(SAVED))
    log_path, ckpt = tmp_path / "logs" / f"{RUN}.json", tmp_path / "ckpt" / f"{RUN}.dcp"
    # both ranks wrote their shards, rank 0 the pointer, the run's state and the log
    assert sorted(p.name for p in (ckpt / "step-000003").glob("*.distcp")) == [
        "__0_0.distcp", "__1_0.distcp"]
    half = recipe.read_json(log_path)
    assert half["parallel"] == {"mode": "fsdp", "world": 2, "backend": "gloo", "device": "cpu"}
    assert half["command"].startswith("torchrun --nproc-per-node 2 examples/continue_train.py")
    assert half["compiled"]["methods"] == ["topk"] and half["compiled"]["projections"] == 7
    assert len(half["train_loss"]) == SAVED and half["status"] == "running"

    # one process, no torchrun: steps 3-4, checkpointed in one process, then the last step
    recipe.main([*ARGS, *where, "--resume", "--stop-at", str(STEPS - 1)])
    assert recipe.read_json(ckpt / "latest.json")["step"] == STEPS - 1
    log = recipe.main([*ARGS, *where, "--resume"])[RUN]
    assert log["status"] == "done" and log["parallel"]["world"] == 1
    assert [(r["at_step"], r["saved_on_ranks"], r["ranks"]) for r in log["resumed"]] == [
        (SAVED, 2, 1), (STEPS - 1, 1, 1)]
    assert not ckpt.exists()  # removed once complete
    _assert_same_curve(log, single, "fsdp 2 ranks, resumed on 1")
    assert recipe.read_json(log_path)["train_loss"] == log["train_loss"]


@pytest.mark.slow  # 33 s on 2 cores; tests/distributed/test_ddp.py checks DDP itself in CI
def test_ddp_on_2_ranks_matches_one_process(single, in_cache, tmp_path):
    where = ["--out", str(tmp_path / "logs"), "--ckpt-dir", str(tmp_path / "ckpt")]
    torchrun(in_cache, tmp_path, *ARGS, *where, "--ddp")
    log = recipe.read_json(tmp_path / "logs" / f"{RUN}.json")
    assert log["parallel"]["mode"] == "ddp" and log["status"] == "done"
    # DDP's bucket split: the backend compiled the pieces, the head among them (dense)
    assert log["compiled"]["methods"] == ["dense", "topk"] and log["compiled"]["graphs"] >= 2
    _assert_same_curve(log, single, "ddp 2 ranks")


# --- what the command line refuses (no process started) ----------------------------------


def test_fsdp_and_ddp_together_are_refused(capsys):
    with pytest.raises(SystemExit):
        recipe.parse_args(["--run", RUN, "--fsdp", "--ddp"])
    assert "--fsdp and --ddp were both given; choose one" in capsys.readouterr().err


def test_training_free_is_not_distributed(capsys):
    with pytest.raises(SystemExit):
        recipe.parse_args(["--all", "--fsdp"])
    assert "training-free run does not train" in capsys.readouterr().err


def test_fsdp_without_a_process_group_names_torchrun(monkeypatch, tmp_path):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match=r"--fsdp needs a process group, and RANK, "
                       r"WORLD_SIZE, MASTER_ADDR, MASTER_PORT are not set.*torchrun"):
        recipe.main(["--run", RUN, "--fsdp", "--out", str(tmp_path)])


def test_several_ranks_without_a_mode_are_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"started on 2 ranks \(WORLD_SIZE=2\) without --fsdp "
                       r"or --ddp"):
        recipe.main(["--run", RUN, "--out", str(tmp_path)])


def test_a_batch_that_does_not_split_over_the_ranks():
    import torch

    with pytest.raises(ValueError, match="a batch of 3 sequences does not split over 2 ranks"):
        Parallel("fsdp", rank=0, world=2).rows(torch.zeros(3, 4))
