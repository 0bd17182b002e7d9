"""Projection paths by parameter identity: what globs match against and what reports show.

Unit cases of :mod:`qsparse_compile.passes.identity` (tied weights, containers at the root,
bare parameters, functions); the matrix of ways of compiling real models is in
``tests/test_compile_paths.py``.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from qsparse_compile.backend import Backend
from qsparse_compile.passes.identity import CompiledCall, ParameterNames, real_inputs, unwrap
from qsparse_compile.research.models.tiny_llama import TinyLlama, TinyLlamaConfig

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def _compiled_paths(model, x: torch.Tensor, **options) -> dict[str, bool]:
    """Path -> sparsified?, for every projection the backend found compiling ``model``."""
    backend = Backend({**options, "inner": "eager"})
    torch.compile(model, backend=backend)(x)
    return {r.path: not r.plan.dense for result in backend.results for r in result.records}


def test_tied_head_is_still_called_lm_head_and_stays_dense():
    """The tied head reads the embedding's weight; the calling module names it."""
    torch.manual_seed(0)
    model = TinyLlama(TinyLlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_layers=1, num_heads=4, num_kv_heads=2,
                                      tie_embeddings=True))
    assert model.lm_head.weight is model.embed_tokens.weight
    paths = _compiled_paths(model, torch.randint(0, 64, (1, 5)), sparsity=0.5)
    assert paths.pop("lm_head") is False
    assert len(paths) == 7 and all(paths.values())


def test_sequential_root_paths_match_named_modules():
    """A torch.nn container at the root is traced as ``L['fn']``; paths must not say so."""
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    paths = _compiled_paths(model, torch.randn(3, 8), sparsity=0.5, overrides={"2": None})
    assert paths == {"0": True, "2": False}


def test_root_linear_is_the_empty_path():
    assert _compiled_paths(nn.Linear(8, 4), torch.randn(3, 8), sparsity=0.5) == {"": True}


class _Block(nn.Module):
    """Two bare parameters used functionally in one module."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(12, 8))
        self.w2 = nn.Parameter(torch.randn(12, 8))

    def forward(self, x):
        return x @ self.w1.t() + x @ self.w2.t()


class _Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_Block(), nn.Linear(12, 8)])

    def forward(self, x):
        return self.blocks[1](self.blocks[0](x))


def test_bare_parameters_are_named_by_the_parameter():
    paths = _compiled_paths(_Blocks(), torch.randn(3, 8), sparsity=0.5,
                            overrides={"blocks.0.w2": None})
    assert paths == {"blocks.0.w1": True, "blocks.0.w2": False, "blocks.1": True}


def test_export_and_dynamo_agree_on_paths():
    from qsparse_compile.config import QSparseConfig
    from qsparse_compile.export import sparsify_exported_with_result

    module, x = _Blocks(), torch.randn(3, 8)
    ep = torch.export.export(module, (x,))
    _, result = sparsify_exported_with_result(ep, QSparseConfig(sparsity=0.5))
    exported = [r.path for r in result.records]
    assert exported == ["blocks.0.w1", "blocks.0.w2", "blocks.1"]
    assert list(_compiled_paths(module, x, sparsity=0.5)) == exported


class _Runner:
    """Not a module: a method of it calls the model (paths are the model's)."""

    def __init__(self, model):
        self.model = model

    def step(self, x):
        return self.model(x)


def test_functions_and_methods_that_call_a_model_use_its_paths():
    model, x = _Blocks(), torch.randn(3, 8)
    expected = {"blocks.0.w1": True, "blocks.0.w2": False, "blocks.1": True}
    options = {"sparsity": 0.5, "overrides": {"blocks.0.w2": None}}
    assert _compiled_paths(lambda t: model(t), x, **options) == expected
    assert _compiled_paths(_Runner(model).step, x, **options) == expected
    assert _compiled_paths(functools.partial(lambda m, t: m(t), model), x, **options) == expected
    assert _compiled_paths(model.forward, x, **options) == expected


def test_a_model_passed_as_an_argument_is_named_by_it():
    model, x = _Blocks(), torch.randn(3, 8)
    backend = Backend(sparsity=0.5, inner="eager")
    torch.compile(lambda m, t: m(t), backend=backend)(model, x)
    assert [r.path for r in backend.results[0].records] == ["blocks.0.w1", "blocks.0.w2",
                                                            "blocks.1"]


def test_two_unrelated_models_keep_their_variable_names():
    first, second, x = nn.Linear(8, 8), nn.Linear(8, 4), torch.randn(3, 8)
    paths = _compiled_paths(lambda t: second(first(t)), x, sparsity=0.5,
                            overrides={"second": None})
    assert paths == {"first": True, "second": False}


def test_a_bare_parameter_read_by_a_function_is_named_by_its_variable():
    weight, x = nn.Parameter(torch.randn(4, 8)), torch.randn(3, 8)
    assert _compiled_paths(lambda t: t @ weight.t(), x, sparsity=0.5) == {"weight": True}


def test_graph_breaks_keep_the_root_of_the_compiled_model():
    """A graph break inside a submodule makes Dynamo compile that submodule's frame on its
    own; its projections are still named from the model that was compiled."""

    class Breaking(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.b = nn.Linear(8, 4)

        def forward(self, x):
            x = self.a(x)
            torch._dynamo.graph_break()
            return self.b(x)

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Breaking()

        def forward(self, x):
            return self.inner(x)

    backend = Backend(sparsity=0.5, inner="eager")
    torch.compile(Outer(), backend=backend)(torch.randn(3, 8))
    assert len(backend.results) == 2
    assert [r.path for result in backend.results for r in result.records] == [
        "inner.a", "inner.b"]


def test_names_look_through_compiled_modules_and_keep_every_alias():
    model = TinyLlama(TinyLlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_layers=1, num_heads=4, num_kv_heads=2,
                                      tie_embeddings=True))
    compiled = torch.compile(model, backend="eager")
    assert unwrap(compiled) is model
    names = ParameterNames({"": compiled})
    tied = [n.name for n in names.names_of(model.lm_head.weight)]
    assert tied == ["embed_tokens.weight", "lm_head.weight"]
    assert names.projection_path(model.lm_head.weight) == "lm_head"
    assert torch.randn(2) not in names


def test_a_weight_tied_between_two_projections_is_told_apart_by_the_calling_module():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8, bias=False)
            self.lm_head = nn.Linear(8, 8, bias=False)
            self.lm_head.weight = self.proj.weight

        def forward(self, x):
            return self.lm_head(torch.relu(self.proj(x)))

    assert _compiled_paths(Tied(), torch.randn(2, 8), sparsity=0.5) == {"proj": True,
                                                                        "lm_head": False}


def test_fake_stand_ins_of_parameters_are_found_by_identity():
    """DDP's graph pieces are compiled on fake copies of their inputs: each fake that the mode
    made for a parameter maps back to that parameter; other fakes and real inputs stay."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    mode = FakeTensorMode()
    weight = mode.from_tensor(model[2].weight)
    activation = mode.from_tensor(torch.randn(3, 8))
    real = torch.randn(3)
    inputs = [activation, weight, real, mode.from_tensor(model[0].bias)]
    got = real_inputs(CompiledCall(model, (), {}), inputs)
    assert got[0] is activation and got[2] is real
    assert got[1] is model[2].weight and got[3] is model[0].bias
    # without a compiled call, or without fakes, nothing changes
    assert real_inputs(None, inputs) == inputs
    plain = [model[0].weight, real]
    assert real_inputs(CompiledCall(model, (), {}), plain) == plain


def test_matrix_paths_name_every_2d_parameter_and_buffer_once():
    class Rotated(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("rotation", torch.eye(4))
            self.register_buffer("scale", torch.ones(4))  # 1-D: never a product's weight
            self.proj = nn.Linear(4, 4)
            self.alias = self.proj  # one module under two names: one path

    names = ParameterNames({"": Rotated()})
    assert names.matrix_paths() == ["rotation", "proj"]
    bare = nn.Parameter(torch.zeros(3, 2))
    assert ParameterNames({"w": bare}).matrix_paths() == ["w"]
