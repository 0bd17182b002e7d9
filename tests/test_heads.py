"""The output head is found by what it is, not by its name, and stays dense by default.

BERT's masked-LM head is ``cls.predictions.decoder`` (its output embeddings, tied to the word
embeddings); T5's ``lm_head`` is tied to ``shared``; GPT-2's and Llama's are ``lm_head``. The
compiler's records, the reference, ``report`` and the sparsity measurement agree on the role;
``dense_roles=()`` sparsifies the head, and an override naming the head's path literally does.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hf_models import HF_MODELS, VOCAB, build_bert_mlm, build_t5, token_ids

import qsparse_compile as qc
from qsparse_compile.reference import reference_model
from qsparse_compile.research.measure import measure_sparsity
from qsparse_compile.roles import projection_roles

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def _bert():
    return build_bert_mlm(layers=1), "cls.predictions.decoder", lambda m, ids: m(ids).logits


def _t5():
    ids = token_ids()
    return build_t5(layers=1), "lm_head", lambda m, x: m(x, decoder_input_ids=ids).logits


def _causal(name):
    def make():
        return (HF_MODELS[name].build(layers=1), "lm_head",
                lambda m, ids: m(ids, use_cache=False).logits)
    return make


MODELS = {"bert-mlm": _bert, "t5": _t5, "gpt2": _causal("gpt2"), "llama": _causal("llama")}


def _records(backend) -> dict:
    return {r.path: r for result in backend.results for r in result.records}


@pytest.mark.parametrize("name", list(MODELS))
def test_head_is_dense_by_default_everywhere(name):
    model, head, run = MODELS[name]()
    ids = token_ids()
    assert projection_roles(model).role(head) == "head"

    rows = {r["path"]: r for r in qc.report(model, sparsity=0.5)}
    assert rows[head]["role"] == "head" and rows[head]["method"] == "dense"
    assert all(r["method"] == "topk" for r in rows.values() if r["role"] != "head")

    backend = qc.Backend(sparsity=0.5, inner="eager")
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        got = run(compiled, ids)
    records = _records(backend)
    heads = [p for p, r in records.items() if r.role == "head"]
    assert heads == [head] and records[head].plan.dense
    assert {p for p, r in records.items() if not r.plan.dense} == {
        p for p, r in rows.items() if r["method"] != "dense"}
    with torch.no_grad(), reference_model(model, sparsity=0.5):
        expected = run(model, ids)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    batch = {"input_ids": ids, **({"decoder_input_ids": ids} if name == "t5" else {})}
    measured = measure_sparsity(model, [batch], sparsity=0.5)
    by_path = {p.path: p for p in measured.projections}
    assert by_path[head].role == "head" and not by_path[head].governed
    assert by_path[head].measured == 0.0


@pytest.mark.parametrize("options", [
    {"sparsity": 0.5, "dense_roles": ()},
    {"sparsity": 0.5, "overrides": {"cls.predictions.decoder": 0.25}},
], ids=["no-dense-roles", "literal-override"])
def test_the_head_can_be_sparsified(options):
    model, head, run = _bert()
    ids = token_ids()
    backend = qc.Backend(options, inner="eager")
    with torch.no_grad():
        got = run(torch.compile(model, backend=backend), ids)
    record = _records(backend)[head]
    assert record.role == "head" and record.plan.method == "topk"
    with torch.no_grad(), reference_model(model, **options):
        expected = run(model, ids)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_wildcard_overrides_do_not_reach_the_head():
    model, head, _ = _bert()
    rows = {r["path"]: r for r in qc.report(model, sparsity=0.5, overrides={"*": 0.7})}
    assert rows[head]["method"] == "dense"
    assert rows["bert.encoder.layer.0.intermediate.dense"]["sparsity"] == 0.7


class _ToVocab(torch.nn.Module):
    """A head no name convention covers, without ``get_output_embeddings`` or tying."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, 16)
        self.mix = torch.nn.Linear(16, 16)
        self.to_vocab = torch.nn.Linear(16, VOCAB)

    def forward(self, ids):
        return self.to_vocab(torch.relu(self.mix(self.embed(ids)))) * 0.5


def test_exported_programs_find_the_head_by_the_graph():
    """Without a module, the projection producing the output (through a scaling) with the
    vocabulary's width is the head; an exported HF model agrees with its module walk."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(_ToVocab(), (token_ids(),), strict=False)
    rows = {r["path"]: r for r in qc.report(ep, sparsity=0.5)}
    assert (rows["to_vocab"]["role"], rows["to_vocab"]["method"]) == ("head", "dense")
    assert rows["mix"]["method"] == "topk"

    from hf_models import Logits

    model = Logits(HF_MODELS["gpt2"].build(layers=1))
    walked = qc.report(model, sparsity=0.5)
    traced = qc.report(model, token_ids(), sparsity=0.5)
    assert sorted(walked, key=lambda r: r["path"]) == sorted(traced, key=lambda r: r["path"])
    assert [r["role"] for r in walked if r["path"] == "inner.lm_head"] == ["head"]
