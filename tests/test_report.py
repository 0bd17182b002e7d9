"""``report()``: one row per projection, totals, JSON, an aligned table, and the same numbers
whether the model is walked, exported, or compiled."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch
from hf_models import HF_MODELS, LAYERS, VOCAB, Logits, token_ids

import qsparse_compile as qc
from qsparse_compile.config import topk_count
from qsparse_compile.report import COLUMNS
from qsparse_compile.research.models.tiny_llama import TinyLlama, TinyLlamaConfig

KEYS = set(COLUMNS) | {"in_features", "out_features", "quant", "note", "rotation_macs", "experts",
                      "experts_per_token"}


def _tiny_llama(intermediate_size: int = 64) -> torch.nn.Module:
    torch.manual_seed(0)
    return TinyLlama(TinyLlamaConfig(vocab_size=VOCAB, hidden_size=32,
                                     intermediate_size=intermediate_size, num_layers=LAYERS,
                                     num_heads=4, num_kv_heads=2)).eval()


def _export(model, ids):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(model, (ids,), strict=False)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_one_row_per_projection(name):
    spec = HF_MODELS[name]
    model = spec.build()
    rep = qc.report(model, sparsity=0.4)

    assert isinstance(rep, list) and all(set(row) == KEYS for row in rep)
    assert [r["path"] for r in rep] == spec.expected_paths() + ["lm_head"]
    assert [r["role"] for r in rep] == list(spec.layer_roles) * LAYERS + ["head"]
    for row in rep:
        weight = model.get_submodule(row["path"]).weight
        # nn.Linear stores [out, in]; GPT-2's Conv1D stores [in, out]
        out_f, in_f = weight.shape if name != "gpt2" or row["role"] == "head" \
            else weight.shape[::-1]
        assert (row["in_features"], row["out_features"]) == (in_f, out_f)
        assert row["shape"] == f"{out_f}x{in_f}"
        assert row["params"] == in_f * out_f
        if row["role"] == "head":
            assert (row["method"], row["sparsity"], row["k"]) == ("dense", 0.0, in_f)
            assert row["activated_params"] == row["params"]
        else:
            assert (row["method"], row["sparsity"]) == ("topk", 0.4)
            assert row["k"] == topk_count(in_f, 0.4)
            assert row["activated_params"] == row["k"] * out_f < row["params"]


def test_totals():
    rep = qc.report(_tiny_llama(), sparsity=0.5, overrides={"layers.0.*": None})
    params = sum(r["in_features"] * r["out_features"] for r in rep)
    activated = sum(r["k"] * r["out_features"] for r in rep)
    assert rep.totals == {
        "projections": 7 * LAYERS + 1,
        "sparsified": 7 * (LAYERS - 1),
        "params": params,
        "activated_params": activated,
        "activated_fraction": activated / params,
        "rotation_macs": 0,  # no calibration, no rotations
    }
    assert 0.5 < rep.totals["activated_fraction"] < 1.0
    dense = qc.report(_tiny_llama(), sparsity=0.0)
    assert dense.totals["activated_fraction"] == 1.0 and dense.totals["sparsified"] == 0


def test_block_rows_and_projections_left_dense():
    with pytest.warns(UserWarning, match="not a multiple") as caught:
        rep = qc.report(_tiny_llama(intermediate_size=48), method="block", block=(16, 32))
    assert sorted(str(w.message).split("'")[1] for w in caught) == [
        f"layers.{i}.mlp.down_proj" for i in range(LAYERS)]
    rows = {r["path"]: r for r in rep}
    up, down = rows["layers.0.mlp.up_proj"], rows["layers.0.mlp.down_proj"]
    assert (up["method"], up["sparsity"], up["k"]) == ("block 16:32", 0.5, 16)
    assert (down["method"], down["k"]) == ("dense", 48) and "multiple" in down["note"]


def test_json_serialisable():
    rep = qc.report(HF_MODELS["gpt2"].build(), method="block", block=(2, 4))
    assert json.loads(json.dumps(list(rep))) == list(rep)
    decoded = json.loads(rep.to_json())
    assert decoded == {"rows": list(rep), "totals": rep.totals}
    assert rep.to_dict()["totals"]["activated_fraction"] == rep.totals["activated_fraction"]


_CELL = re.compile(r"\S+(?: \S+)*")  # a cell: words separated by single spaces


def test_table_is_aligned():
    rep = qc.report(HF_MODELS["llama"].build(), sparsity=0.4,
                    overrides={"*.mlp.down_proj": 0.65})
    lines = str(rep).splitlines()
    assert str(rep) == rep.table()
    header, rule, *rows, summary = lines
    assert header.split() == list(COLUMNS)
    assert set(rule) <= {"-", " "}
    starts = [m.start() for m in _CELL.finditer(rule)]
    assert len(starts) == len(COLUMNS) and len(rows) == len(rep)
    for line in [header, *rows]:
        assert [m.start() for m in _CELL.finditer(line)] == starts, line
    for line, row in zip(rows, rep, strict=True):
        assert line.startswith(row["path"])
    assert summary.startswith(f"{rep.totals['sparsified']}/{rep.totals['projections']} ")


def _by_path(rep):
    return sorted(rep, key=lambda r: r["path"])


@pytest.mark.parametrize("options", [
    {"sparsity": 0.4},
    {"method": "block", "block": (16, 32)},
    {"sparsity": 0.6, "overrides": {"*.self_attn.*": 0.3}, "exclude": ("*.lm_head", "lm_head",
                                                                       "*.up_proj")},
], ids=["topk", "block-16:32", "overrides-exclude"])
def test_module_walk_export_and_compile_agree(options):
    """The module walk, an exported program (given directly or made from example inputs) and
    the records of a compile report the same rows and totals."""
    model = _tiny_llama(intermediate_size=48)
    ids = token_ids()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        walked = qc.report(model, **options)
        exported = qc.report(_export(model, ids), **options)
        traced = qc.report(model, ids, **options)
    assert walked.totals == exported.totals == traced.totals
    assert _by_path(walked) == _by_path(exported) == _by_path(traced)

    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = torch.compile(model, backend="qsparse", options={**options, "inner": "eager"})
        with pytest.raises(ValueError, match="nothing was compiled"):
            qc.report(compiled)  # compilation happens at the first call
        with torch.no_grad():
            compiled(ids)
    compiled_rows = qc.report(compiled)
    with pytest.raises(ValueError, match="its own options"):
        qc.report(compiled, sparsity=0.1)
    torch._dynamo.reset()
    assert compiled_rows.totals == walked.totals
    assert _by_path(compiled_rows) == _by_path(walked)


def test_hf_model_walk_matches_its_exported_program():
    model = HF_MODELS["llama"].build()
    wrapped = Logits(model)
    walked = qc.report(wrapped, sparsity=0.5)
    exported = qc.report(_export(wrapped, token_ids()), sparsity=0.5)
    assert walked.totals == exported.totals
    assert _by_path(walked) == _by_path(exported)
    assert [r["path"] for r in walked][-1] == "inner.lm_head"


class _Functional(torch.nn.Module):
    """A projection the module walk cannot see: ``x @ self.w.t()``."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(12, 16))
        self.proj = torch.nn.Linear(12, 8)

    def forward(self, x):
        return self.proj(torch.relu(x @ self.w.t()))


def test_example_inputs_find_functional_projections():
    module = _Functional()
    walked = qc.report(module, sparsity=0.5)
    traced = qc.report(module, torch.randn(3, 16), sparsity=0.5)
    assert [r["path"] for r in walked] == ["proj"]
    assert [(r["path"], r["shape"], r["k"]) for r in traced] == [("w", "12x16", 8),
                                                                 ("proj", "8x12", 6)]


def test_rejects_other_objects():
    with pytest.raises(TypeError, match="nn.Module or an ExportedProgram"):
        qc.report("model", sparsity=0.5)
    with pytest.raises(ValueError, match="'method'.*'blok'"):
        qc.report(_tiny_llama(), method="blok")


class _PartlyEager(torch.nn.Module):
    """``b`` runs in a function Dynamo is told to skip: it is in no compiled graph."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(32, 32)
        self.b = torch.nn.Linear(32, 32)

    @torch._dynamo.disable
    def eager_part(self, x):
        return self.b(x)

    def forward(self, x):
        return self.eager_part(self.a(x))


def test_a_projection_no_compiled_graph_read_is_reported_dense_with_a_warning():
    compiled = torch.compile(_PartlyEager(), backend="qsparse",
                             options={"sparsity": 0.5, "inner": "eager"})
    compiled(torch.randn(4, 32))
    with pytest.warns(UserWarning, match=r"1 projection\(s\) .* no compiled graph.*: b$"):
        rows = qc.report(compiled)
    by_path = {r["path"]: r for r in rows}
    assert by_path["a"]["method"] == "topk"
    assert by_path["b"]["method"] == "dense" and "no compiled graph" in by_path["b"]["note"]
    assert rows.totals["projections"] == 2


def test_a_compiled_function_reading_part_of_a_model_reports_no_missing_projection():
    model = _PartlyEager()
    compiled = torch.compile(lambda x: model.a(x), backend="qsparse",
                             options={"sparsity": 0.5, "inner": "eager"})
    compiled(torch.randn(4, 32))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        rows = qc.report(compiled)
    assert [r["path"] for r in rows] == ["a"]
