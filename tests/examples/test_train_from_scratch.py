"""Smoke tests of examples/train_from_scratch.py: tiny settings, in-process, seconds each."""

import json
import math
import statistics

import pytest
import torch
import train_from_scratch as recipe

from qsparse_compile.config import topk_count
from qsparse_compile.reference import reference_model
from qsparse_compile.research.models import TinyLlama

HIDDEN, INTERMEDIATE = recipe.TINY["hidden"], recipe.TINY["intermediate"]


def _run(tmp_path, name, *extra):
    argv = ["--run", name, "--tiny", "--quiet", "--out", str(tmp_path / "logs"),
            "--ckpt-dir", str(tmp_path / "ckpt"), *extra]
    return recipe.main(argv)[name]


@pytest.fixture(scope="module")
def topk40(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("topk40"), "topk40")


def _assert_learns(log):
    losses = log["train_loss"]
    assert len(losses) == recipe.TINY["steps"]
    assert all(math.isfinite(x) for x in losses)
    # from the uniform-byte loss (ln 256 = 5.55) the byte frequencies alone are learnt fast
    assert statistics.mean(losses[:4]) - statistics.mean(losses[-4:]) > 0.5
    val = [e["val_loss"] for e in log["evals"]]
    assert val[-1] < val[0] - 0.3


def test_topk40_learns_and_measures_the_configured_sparsity(topk40):
    _assert_learns(topk40)
    assert topk40["status"] == "done" and topk40["compiled"]["relu2_replaced"] == 2
    narrow = 1 - topk_count(HIDDEN, 0.4) / HIDDEN
    for entry in topk40["evals"]:
        roles = entry["sparsity"]["per_role"]
        for role in ("q", "k", "v", "o", "gate", "up"):
            assert roles[role] == pytest.approx(narrow, abs=1e-6)
        # the down input also holds the squared-ReLU GLU's own zeros: never fewer than top-K's
        assert roles["down"] >= 1 - topk_count(INTERMEDIATE, 0.4) / INTERMEDIATE - 1e-6
        assert roles["head"] == 0.0
    # weight-gradient norms per role and layer (the STE ablation's evidence) after step 0
    grads = topk40["evals"][-1]["grad_norm"]
    assert set(grads) == {"q", "k", "v", "o", "gate", "up", "down"}
    assert all(len(v) == recipe.TINY["layers"] and min(v) > 0 for v in grads.values())


def test_the_log_says_how_to_reproduce_it(topk40, tmp_path):
    assert topk40["command"].startswith("python examples/train_from_scratch.py --run topk40")
    assert topk40["settings"]["steps"] == recipe.TINY["steps"]
    assert topk40["options"] == {"sparsity": 0.4, "relu2_glu": True, "inner": "eager"}
    assert [e["step"] for e in topk40["evals"]] == [0, 12, 24]


def test_resume_continues_exactly(topk40, tmp_path):
    first = _run(tmp_path, "topk40", "--stop-at", "12")
    assert first["status"] == "running" and len(first["train_loss"]) == 12
    resumed = _run(tmp_path, "topk40", "--resume")
    assert resumed["status"] == "done" and resumed["resumed"][0]["at_step"] == 12
    assert resumed["train_loss"] == pytest.approx(topk40["train_loss"], abs=1e-3)
    on_disk = json.loads((tmp_path / "logs" / "topk40.json").read_text())
    assert on_disk["train_loss"] == resumed["train_loss"]


def test_relu_logs_its_data_dependent_sparsity(tmp_path):
    log = _run(tmp_path, "relu")
    _assert_learns(log)
    for entry in log["evals"]:
        roles = entry["sparsity"]["per_role"]
        assert set(roles) == {"q", "k", "v", "o", "gate", "up", "down", "head"}
        assert all(0.05 < roles[r] < 0.95 for r in ("q", "gate", "down"))
    assert log["compiled"]["projections"][0]["method"] == "relu"


def test_bitnet_dense_quantizes_every_projection_and_keeps_every_entry(tmp_path):
    log = _run(tmp_path, "bitnet-dense", "--steps", "12")
    assert all(math.isfinite(x) for x in log["train_loss"])
    rows = [p for p in log["compiled"]["projections"] if p["path"] != "lm_head"]
    assert rows and all(p["method"] == "dense" and p["quant"] == "bitnet"
                        and p["k"] == p["in_features"] for p in rows)
    head = [p for p in log["compiled"]["projections"] if p["path"] == "lm_head"]
    assert head and head[0]["quant"] is None  # excluded: neither sparsified nor quantized


@pytest.mark.parametrize("name", ["topk40", "relu", "bitnet-topk61"])
def test_the_probe_twin_computes_what_the_compiled_model_computes(name):
    """Sparsity is measured on an eager twin (hidden_act="relu2") of the compiled model
    (SwiGLU turned into ReLU²GLU by the compiler): both must compute the same function."""
    settings = recipe.Settings(**recipe.TINY)
    torch.manual_seed(0)
    model = TinyLlama(recipe.model_config(settings))
    twin = TinyLlama(recipe.model_config(settings, "relu2"))
    twin.load_state_dict(model.state_dict())
    ids = torch.randint(0, 256, (2, 16))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="qsparse",
                             options={**recipe.RUNS[name], "relu2_glu": True, "inner": "eager"})
    with torch.no_grad(), reference_model(twin, **recipe.RUNS[name]):
        expected = twin(ids)
    torch.testing.assert_close(compiled(ids), expected, rtol=1e-5, atol=1e-5)
