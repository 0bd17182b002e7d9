"""``compile_model``: in place, so ``generate()`` runs sparse; options and globs checked first.

Also the backend's own glob check: under ``torch.compile(..., backend="qsparse")`` an override
that matches no projection warns at the first call.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hf_models import HF_MODELS, token_ids

import qsparse_compile
from qsparse_compile.glob_check import UnmatchedGlobWarning
from qsparse_compile.reference import reference_model

OPTIONS = {"sparsity": 0.5}


def _generate(model, ids, **kwargs) -> torch.Tensor:
    return model.generate(ids, max_new_tokens=10, do_sample=False, **kwargs)


@pytest.mark.parametrize("cache", [None, "static"], ids=["dynamic-cache", "static-cache"])
def test_generate_after_compile_model_decodes_the_sparse_tokens(cache):
    model = HF_MODELS["llama"].build()
    ids = token_ids(1, 8)
    kwargs = {} if cache is None else {"cache_implementation": cache}
    with reference_model(model, **OPTIONS):
        expected = _generate(model, ids, **kwargs)
    dense = _generate(model, ids, **kwargs)
    assert not torch.equal(expected, dense)  # the sparse model decodes other tokens

    backend = qsparse_compile.compile_model(model, OPTIONS, inner="eager")
    got = _generate(model, ids, **kwargs)
    assert torch.equal(got, expected)
    assert backend.results, "generate() compiled nothing"
    assert all(r.count("rewrite") == 7 * 2 for r in backend.results)


def test_generate_on_what_torch_compile_returns_runs_the_uncompiled_model():
    """Documented in the README: ``torch.compile(model).generate`` is the model's own method."""
    model = HF_MODELS["llama"].build()
    ids = token_ids(1, 8)
    dense = _generate(model, ids)
    backend = qsparse_compile.Backend(OPTIONS, inner="eager")
    compiled = torch.compile(model, backend=backend)
    assert torch.equal(_generate(compiled, ids), dense)
    assert backend.results == []


@pytest.mark.parametrize("options,error", [
    ({"sparsity": 1.5}, ValueError),
    ({"sparsity": "half"}, TypeError),
    ({"sparsity": 0.5, "sparsty": 0.4}, ValueError),
    ({"inner": "tvm"}, ValueError),
])
def test_option_errors_are_raised_before_compiling(options, error):
    model = HF_MODELS["llama"].build()
    with pytest.raises(error):
        qsparse_compile.compile_model(model, options)
    assert not hasattr(model, "_compiled_call_impl") or model._compiled_call_impl is None


def test_an_override_matching_no_projection_warns_with_the_nearest_paths_once():
    model = HF_MODELS["llama"].build()
    with pytest.warns(UnmatchedGlobWarning, match=r"'layers\.0\.\*'.*model\.layers\.0\."):
        qsparse_compile.compile_model(model, sparsity=0.5, inner="eager",
                                      overrides={"layers.0.*": None})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(token_ids(1, 8), use_cache=False)  # the graphs do not warn again
    assert not [w for w in caught if issubclass(w.category, UnmatchedGlobWarning)]


def test_strict_raises_for_a_glob_matching_no_projection():
    model = HF_MODELS["llama"].build()
    with pytest.raises(ValueError, match=r"layers\.0\.\*"):
        qsparse_compile.compile_model(model, sparsity=0.5, overrides={"layers.0.*": None},
                                      strict=True)


def test_a_matching_glob_is_silent():
    model = HF_MODELS["llama"].build()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnmatchedGlobWarning)
        qsparse_compile.compile_model(model, sparsity=0.5, overrides={"*.layers.0.*": None})


def test_the_backend_warns_about_an_unmatched_glob_at_the_first_call():
    model = HF_MODELS["llama"].build()
    compiled = torch.compile(model, backend="qsparse",
                             options={**OPTIONS, "inner": "eager",
                                      "overrides": {"layers.1.mlp.*": 0.7}})
    with pytest.warns(UnmatchedGlobWarning, match=r"layers\.1\.mlp"):
        compiled(token_ids(1, 8), use_cache=False)
