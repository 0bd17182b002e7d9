"""The core of ``benchmarks/smollm2_quality.py`` on a tiny random Llama (no SmolLM2, no GGUF).

The windows are those of ``examples/continue_train.py``; a compiled row evaluates what the eager
reference model with the same options computes; the byte counts follow the packed layouts.
"""

from __future__ import annotations

import math
import sys

import pytest
import smollm2_quality as sq
import torch
import torch.nn.functional as F
from hf_models import HF_MODELS, VOCAB

from qsparse_compile.codegen.cpu.packed_weights import PackedLayout
from qsparse_compile.config import topk_count
from qsparse_compile.reference import reference_model

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return HF_MODELS["llama"].build()


def _windows(count: int = 4, length: int = 12) -> torch.Tensor:
    ids = torch.randint(0, VOCAB, (200,), generator=torch.Generator().manual_seed(0))
    return sq.eval_windows(ids, count, length)


def test_eval_windows_are_evenly_spread_and_disjoint():
    ids = torch.arange(100)
    w = sq.eval_windows(ids, 3, 10)  # 10 windows of 10; picks 0, 4, 9
    assert w.tolist() == [list(range(s, s + 10)) for s in (0, 40, 90)]
    assert sq.eval_windows(ids, 10, 10).flatten().tolist() == list(range(100))
    with pytest.raises(ValueError, match="only 10 windows"):
        sq.eval_windows(ids, 11, 10)


def test_dense_row_is_the_model_itself(model):
    windows = _windows()
    row = sq.run_row(model, sq.Row(), windows, batch=2)
    with torch.no_grad():
        logits = model(input_ids=windows, use_cache=False).logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), windows[:, 1:].reshape(-1))
    assert row["tokens"] == 4 * 11
    assert row["nll"] == pytest.approx(loss.item(), rel=1e-5)
    assert row["ppl"] == pytest.approx(math.exp(row["nll"]))


@pytest.mark.parametrize("config", [sq.Row("int8", None, 0.0), sq.Row("int4", "int4", 0.5),
                                    sq.Row("int4", "int4", 0.5, "int8", True)],
                         ids=lambda r: r.label)
def test_compiled_row_matches_the_reference_model(model, config):
    windows = _windows()
    row = sq.run_row(model, config, windows, batch=2)
    with reference_model(model, **config.options):
        expected = sq.evaluate(model, windows, batch=2)
    dense = sq.evaluate(model, windows, batch=2)
    assert row["nll"] == pytest.approx(expected["nll"], rel=1e-4)
    assert row["nll"] != pytest.approx(dense["nll"], rel=1e-6)  # the options took effect


def test_weight_bytes(model):
    linears = {p: m for p, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    head = model.get_output_embeddings()
    dense = sq.weight_bytes(model, sq.Row())
    assert dense["projections"] == sum(4 * m.weight.numel() for m in linears.values()
                                       if m is not head)
    assert dense["head"] == 4 * head.weight.numel()
    assert dense["total"] == pytest.approx(4 * sum(p.numel() for p in model.parameters())
                                           - 4 * (VOCAB - 1) * model.config.hidden_size)
    packed = sq.weight_bytes(model, sq.Row("int4", "int8", 0.5))
    assert packed["projections"] == sum(
        PackedLayout("int4", m.in_features, m.out_features).read_bytes(
            topk_count(m.in_features, 0.5)) for m in linears.values() if m is not head)
    assert packed["head"] == PackedLayout("int8", head.in_features,
                                          head.out_features).read_bytes(head.in_features)
    assert packed["other"] == dense["other"]
    assert sq.weight_bytes(model, sq.Row("int4"))["head"] == dense["head"]  # head stays fp32


def test_quant_rows():
    row = sq.Row("int4", "int4", 0.5, "int8", True)
    assert row.options["quant"] == "int8" and row.options["overrides"] == {"lm_head": 0.0}
    assert "quant" not in sq.Row("int4").options and not row.dense
    assert not sq.Row(quant="int8").dense
    with pytest.raises(ValueError, match="quant_head=True"):
        sq.Row(quant_head=True)


def test_table_and_rows(model):
    assert len(sq.all_rows()) == 15 and sq.all_rows()[0].dense
    assert len(sq.all_rows(quick=True)) == 5 and sq.all_rows(quick=True)[0].dense
    rows = [{"name": "x", **sq.Row().options, "nll": 1.0, "ppl": math.e, "wall_s": 1.0,
             "bytes_per_token": {"total": 2.0**20}},
            {"name": "llama.cpp (GGUF)", "weights": "gguf", "head_weights": "gguf",
             "sparsity": 0.0, "nll": 1.5, "ppl": math.exp(1.5), "wall_s": 1.0,
             "bytes_per_token": {}}]
    text = sq.table(rows, 1.0)
    assert "+0.5000" in text and "llama.cpp" in text and "1.0" in text


def test_llama_cpp_row_is_skipped_without_llama_cpp(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import raises ImportError
    assert sq.llama_cpp_row(None, _windows(), None, threads=1) is None
    assert "left out" in capsys.readouterr().out


def test_format_error_is_zero_on_weights_already_in_the_format():
    from qsparse_compile.ops.quant import int4_weight_fake_quant

    model = HF_MODELS["llama"].build(seed=1)
    assert 0 < sq.format_error(model, "int8")["projections"] < 0.05
    assert sq.format_error(model, "int4")["projections"] > 0.01
    with torch.no_grad():  # Q4_1-like weights, as SmolLM2's dequantised GGUF projections
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(int4_weight_fake_quant(m.weight, -1))
    assert sq.format_error(model, "int4")["projections"] < 1e-6
