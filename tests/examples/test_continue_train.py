"""Smoke tests of examples/continue_train.py on SmolLM2-135M's first layers (real weights)."""

import copy
import math

import continue_train as recipe
import pytest

from qsparse_compile.config import topk_count

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def small_smollm2():
    """Load (and on first use convert) the real model once; every run gets its own copy."""
    return recipe.load_model(recipe.TINY["layers"])


@pytest.fixture
def recipe_on_copies(small_smollm2, monkeypatch):
    monkeypatch.setattr(recipe, "load_model", lambda layers=None: copy.deepcopy(small_smollm2))
    return recipe


def _argv(tmp_path, run):
    return ["--run", run, "--tiny", "--quiet", "--out", str(tmp_path / "logs"),
            "--ckpt-dir", str(tmp_path / "ckpt")]


def test_ste_continue_training_lowers_the_loss_at_40_percent(recipe_on_copies, tmp_path):
    log = recipe_on_copies.main(_argv(tmp_path, "ft-topk40"))["ft-topk40"]
    losses = log["train_loss"]
    assert len(losses) == recipe.TINY["steps"] and all(math.isfinite(x) for x in losses)
    # one repeated batch: the loss must fall if the straight-through gradient reaches weights
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.2
    assert log["status"] == "done" and math.isfinite(log["final"]["ppl"])
    assert log["compiled"]["methods"] == ["dense", "topk"]  # the head stays dense
    roles = log["final"]["sparsity"]["per_role"]
    for role, width in (("q", 576), ("o", 576), ("gate", 576), ("up", 576), ("down", 1536)):
        assert roles[role] == pytest.approx(1 - topk_count(width, 0.4) / width, abs=1e-6)
    assert not (tmp_path / "ckpt" / "ft-topk40.dcp").exists()  # removed once complete
    assert not (tmp_path / "ckpt" / "ft-topk40.pt").exists()  # no --keep-checkpoint
    assert log["command"].startswith("python examples/continue_train.py --run ft-topk40")


def test_training_free_rows(recipe_on_copies, tmp_path, monkeypatch):
    monkeypatch.setattr(recipe, "TRAINING_FREE", {
        k: recipe.TRAINING_FREE[k] for k in ("dense", "block2-4")})
    log = recipe_on_copies.main(_argv(tmp_path, "training-free"))["training-free"]
    dense, block = log["rows"]["dense"], log["rows"]["block2-4"]
    assert math.isfinite(dense["ppl"]) and math.isfinite(block["ppl"])
    assert block["sparsity"]["per_role"]["q"] == 0.5
    assert dense["sparsity"]["per_role"]["q"] < 0.01  # a few exact zeros of its own
    assert block["report_activated_fraction"] < dense["report_activated_fraction"] == 1.0
