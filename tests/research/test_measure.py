"""measure_sparsity: exact for top-K and block plans, data-dependent for ReLU, paper's overall."""

import pytest
import torch

from qsparse_compile.config import QSparseConfig, topk_count
from qsparse_compile.reference import reference_model
from qsparse_compile.research.measure import (
    ProjectionSparsity,
    SparsityMeasurement,
    measure_sparsity,
)
from qsparse_compile.research.models import TinyLlama, TinyLlamaConfig

ROLES = ("q", "k", "v", "o", "gate", "up", "down")


def _model(hidden_act: str = "silu") -> TinyLlama:
    torch.manual_seed(0)
    cfg = TinyLlamaConfig(hidden_size=64, intermediate_size=176, num_layers=2, num_heads=4,
                          num_kv_heads=2, hidden_act=hidden_act)
    return TinyLlama(cfg).eval()


def _batches(n: int = 2) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (2, 16), generator=gen) for _ in range(n)]


@pytest.mark.parametrize("sparsity", [0.25, 0.4, 0.5, 0.6125])
def test_topk_measures_the_configured_sparsity(sparsity):
    model = _model()
    m = measure_sparsity(model, _batches(), sparsity=sparsity)
    for p in m.projections:
        if p.role == "head":
            assert p.method == "dense" and not p.governed
            continue
        # random float inputs hold no exact zeros: exactly D - k zeros per row
        expected = 1 - topk_count(p.in_features, sparsity) / p.in_features
        assert p.measured == pytest.approx(expected, abs=1e-12), p.path
        assert p.configured == sparsity
    assert set(m.per_role) == {*ROLES, "head"}
    assert m.per_role["head"] == 0.0


def test_topk_counts_zeros_already_in_the_input():
    """Under a squared-ReLU GLU the down input is partly zero already: top-K cannot undo it."""
    model = _model("relu2")
    dense = measure_sparsity(model, _batches(), sparsity=0.0)
    topk = measure_sparsity(model, _batches(), sparsity=0.4)
    natural = dense.per_role["down"]
    assert natural > 0.3  # relu(gate)^2 * up: about half the entries are exactly zero
    # more zeros than top-K's own D - k: rows with more than D - k zeros keep them all
    assert topk.per_role["down"] > 1 - topk_count(176, 0.4) / 176 + 0.05
    assert topk.per_role["q"] == pytest.approx(1 - topk_count(64, 0.4) / 64)


def test_block_and_widths_that_do_not_fit():
    model = _model()
    m = measure_sparsity(model, _batches(), method="block", block=(16, 32))
    by_role = {p.role: p for p in m.projections}
    assert by_role["q"].measured == 0.5 and by_role["q"].method == "block 16:32"
    assert by_role["down"].method == "dense"  # 176 is not a multiple of 32: left dense
    assert by_role["down"].measured == 0.0


def test_relu_matches_an_independent_count_under_the_reference():
    """ReLU sparsity is data-dependent: compare with the inputs the oracle model receives."""
    model = _model()
    config = QSparseConfig(method="relu")
    batches = _batches()
    captured: dict[str, list[torch.Tensor]] = {}
    hooks = [mod.register_forward_hook(
        lambda mod, inp, out, path=path: captured.setdefault(path, []).append(inp[0]))
        for path, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)]
    with torch.no_grad(), reference_model(model, config):
        for b in batches:
            model(b)
    for h in hooks:
        h.remove()
    m = measure_sparsity(model, batches, config)
    for p in m.projections:
        xs = torch.cat([x.reshape(-1) for x in captured[p.path]])
        expected = (xs <= 0).double().mean().item() if p.method == "relu" else 0.0
        assert p.measured == pytest.approx(expected, abs=1e-12), p.path
        assert p.configured is None
    assert 0.3 < m.overall < 0.7


def test_the_model_is_left_as_it_was():
    model = _model()
    ids = _batches(1)[0]
    before = model(ids)
    measure_sparsity(model, [ids], {"sparsity": 0.5, "quant": "bitnet"})
    assert torch.equal(model(ids), before)
    assert not model.training


def test_batches_as_tuples_and_options_dict_with_int8():
    model = _model()
    ids = _batches(1)[0]
    m = measure_sparsity(model, [(ids,)], {"sparsity": 0.4, "quant": "int8"})
    # int8 may round small kept values to zero: never fewer zeros than top-K leaves
    for p in m.projections:
        if p.governed:
            assert p.measured >= 1 - topk_count(p.in_features, 0.4) / p.in_features


def test_overall_is_weighted_by_weights_like_the_paper():
    """Mistral-7B shapes with the paper's 3.8B-model sparsities give its 45.7% overall."""
    h, f, kv = 4096, 14336, 1024
    rows = [("q", h, h, 0.42), ("k", h, kv, 0.42), ("v", h, kv, 0.42), ("o", h, h, 0.40),
            ("gate", h, f, 0.40), ("up", h, f, 0.40), ("down", f, h, 0.604),
            ("head", h, 32000, 0.0)]
    projections = [
        ProjectionSparsity(path=role, role=role, in_features=i, out_features=o, method="topk",
                           configured=s, governed=role != "head", zeros=round(s * 1000),
                           elements=1000)
        for role, i, o, s in rows]
    m = SparsityMeasurement(projections)
    assert m.overall == pytest.approx(0.457, abs=1e-3)
    assert m.to_dict()["per_role"]["down"] == 0.604


def test_gpt2_conv1d_projections_are_measured():
    """``Conv1D`` (weight ``[in, out]``) is a projection module like ``nn.Linear``."""
    from hf_models import HF_MODELS, token_ids

    model = HF_MODELS["gpt2"].build()
    result = measure_sparsity(model, [{"input_ids": token_ids(), "use_cache": False}],
                              sparsity=0.5)
    assert [p.path for p in result.projections] == HF_MODELS["gpt2"].expected_paths() + [
        "lm_head"]
    for p in result.projections[:-1]:
        assert p.governed and p.measured == pytest.approx(
            1 - topk_count(p.in_features, 0.5) / p.in_features)
    head = result.projections[-1]
    assert not head.governed and head.method == "dense" and head.measured < 0.1
