"""Greedy allocation: the budget is met exactly, overrides reproduce k, the proxy improves."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hf_models import HF_MODELS, token_ids
from hypothesis import given, settings
from hypothesis import strategies as st

import qsparse_compile as qc
from qsparse_compile.config import QSparseConfig, topk_count
from qsparse_compile.research.allocation import activated, allocate, budget, overrides_for
from qsparse_compile.research.calibrate import DEFAULT_GRID

GRID = DEFAULT_GRID


def _proxy(sizes, curves, ks):
    grid = np.asarray(GRID)
    return sum(float(np.interp(1 - k / d, grid, c)) for (d, _), c, k in
               zip(sizes, np.asarray(curves), ks, strict=True))


@st.composite
def problems(draw):
    """Projections of SmolLM2-like and odd widths, with increasing error curves."""
    count = draw(st.integers(2, 8))
    sizes = [(draw(st.sampled_from([32, 48, 64, 96, 576])),
              draw(st.sampled_from([16, 32, 40, 64, 192, 576]))) for _ in range(count)]
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    steps = rng.exponential(1.0, (count, len(GRID) - 1)) * rng.exponential(1.0, (count, 1))
    curves = np.concatenate([np.zeros((count, 1)), np.cumsum(steps, axis=1)], axis=1) / 20
    sparsity = draw(st.sampled_from([0.3, 0.4, 0.5, 0.6]))
    return sizes, curves, sparsity


@settings(max_examples=20, deadline=None)
@given(problems())
def test_budget_met_exactly_and_overrides_reproduce_k(problem):
    sizes, curves, sparsity = problem
    ks = allocate(sizes, curves, GRID, sparsity)
    assert activated(sizes, ks) == budget(sizes, sparsity)
    assert all(topk_count(d, GRID[-1]) <= k <= d for (d, _), k in zip(sizes, ks, strict=True))
    paths = [f"p{i}" for i in range(len(sizes))]
    overrides = overrides_for(paths, sizes, ks)
    for path, (d, _), k in zip(paths, sizes, ks, strict=True):
        assert topk_count(d, overrides[path]) == k and 0 <= overrides[path] < 1
    uniform = [topk_count(d, sparsity) for d, _ in sizes]
    assert _proxy(sizes, curves, ks) <= _proxy(sizes, curves, uniform) + 1e-12
    assert allocate(sizes, curves, GRID, sparsity) == ks  # deterministic


def test_budget_moves_to_the_projection_that_needs_it():
    sizes = [(64, 64), (64, 64)]
    flat = np.zeros(len(GRID))  # loses nothing at any sparsity
    steep = np.asarray(GRID) ** 2
    ks = allocate(sizes, np.stack([flat, steep]), GRID, 0.5)
    assert ks == [topk_count(64, GRID[-1]), 2 * 32 - topk_count(64, GRID[-1])]


def test_unequal_output_widths_exchange_in_lcm_quanta():
    sizes = [(64, 192), (64, 576)]  # lcm 576: +3 inputs of the first per 1 of the second
    curves = np.stack([np.asarray(GRID) ** 2 * 10, np.asarray(GRID) * 0.01])
    ks = allocate(sizes, curves, GRID, 0.5)
    assert activated(sizes, ks) == budget(sizes, 0.5)
    assert (ks[0] - 32) % 3 == 0 and ks[0] > 32 and ks[1] < 32


@pytest.mark.parametrize("args,match", [
    (([(8, 8)], np.zeros((1, len(GRID))), GRID, 0.95), "beyond the calibrated grid"),
    (([(8, 8)], np.zeros((2, len(GRID))), GRID, 0.5), r"curves must be \[projections, grid\]"),
    (([(8, 8)], np.zeros((1, 2)), (0.1, 0.5), 0.2), "ascending sparsities from 0"),
    (([(8, 8)], np.zeros((1, len(GRID))), GRID, 1.5), "sparsity must be in"),
], ids=["beyond-grid", "shape", "grid", "sparsity"])
def test_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        allocate(*args)


def test_calibration_allocation_is_an_ordinary_config_and_reproducible_with_a_seed():
    model = HF_MODELS["llama"].build()
    batches = [{"input_ids": token_ids(2, 16, seed=s), "use_cache": False} for s in range(4)]
    configs = [qc.calibrate(model, batches, sample_rows=32, seed=7).allocate(0.5)
               for _ in range(2)]
    assert configs[0] == configs[1]
    config = configs[0]
    assert isinstance(config, QSparseConfig) and config.sparsity == 0.5
    assert len(config.overrides) == 14
    # usable without rotations: the report's activated weights are those of uniform top-K
    allocated = qc.report(model, config=config)
    uniform = qc.report(model, sparsity=0.5)
    assert allocated.totals["activated_params"] == uniform.totals["activated_params"]
    assert [r["k"] for r in allocated] != [r["k"] for r in uniform]
    cal = qc.calibrate(model, batches, sample_rows=32, seed=7)
    plain = cal.allocate(0.5, rotated=False)
    assert set(cal.allocations) == {"0.5/plain"} and plain.overrides == cal.allocations[
        "0.5/plain"]
    with torch.no_grad():
        model(token_ids(), use_cache=False)  # the model is unchanged by calibration
