"""``CompileOptions``: every option read once, at one door, with clear errors."""

from __future__ import annotations

import pytest
from assertions import raises_naming

from qsparse_compile import Backend
from qsparse_compile.config import OPTION_NAMES, QSparseConfig
from qsparse_compile.options import BACKEND_OPTIONS, INDUCTOR_FLAGS, CompileOptions


def test_defaults_and_round_trip():
    options = CompileOptions.parse({"sparsity": 0.4})
    assert (options.inner, options.fuse, options.decode, options.kernels,
            options.calibration) == ("inductor", True, True, "auto", None)
    assert options.config == QSparseConfig(sparsity=0.4)
    assert CompileOptions.parse(options.to_dict()) == options
    assert CompileOptions.parse(options) is options
    assert CompileOptions.parse(QSparseConfig(sparsity=0.4)) == options
    assert CompileOptions.parse(None, sparsity=0.4, inner="eager").inner == "eager"


def test_unknown_options_list_every_allowed_one():
    with pytest.raises(ValueError) as info:
        CompileOptions.parse({"sparsty": 0.5, "kernel": "aten"})
    message = str(info.value)
    assert "'kernel'" in message and "'sparsty'" in message
    for name in OPTION_NAMES + BACKEND_OPTIONS:
        assert name in message


@pytest.mark.parametrize(("options", "exc", "parts"), [
    ({"inner": "tvm"}, ValueError, ("'inner'", "'tvm'", "'inductor'", "'eager'")),
    ({"kernels": "cuda"}, ValueError, ("'kernels'", "'cuda'", "'auto'", "'triton'", "'aten'")),
    ({"fuse": 1}, TypeError, ("'fuse'", "True or False", "1")),
    ({"decode": "yes"}, TypeError, ("'decode'", "'yes'")),
    ({"calibration": 3}, TypeError, ("'calibration'", "int")),
    ({"sparsity": 1.5}, ValueError, ("'sparsity'", "1.5", "[0, 1)")),
], ids=["inner", "kernels", "fuse", "decode", "calibration", "sparsity"])
def test_bad_values_name_option_value_and_allowed(options, exc, parts):
    with raises_naming(exc, *parts):
        CompileOptions.parse(options)


def test_options_must_be_a_mapping():
    with raises_naming(TypeError, "dict", "list"):
        CompileOptions.parse([("sparsity", 0.5)])


@pytest.mark.parametrize("flag", list(INDUCTOR_FLAGS))
def test_inductor_flags_default_off_and_round_trip(flag):
    options = CompileOptions.parse({"sparsity": 0.4})
    assert getattr(options, flag) is False and options.inductor_patches() == {}
    on = CompileOptions.parse({"sparsity": 0.4, flag: True})
    assert getattr(on, flag) is True and CompileOptions.parse(on.to_dict()) == on
    assert on.inductor_patches() == {INDUCTOR_FLAGS[flag][0]: True}


@pytest.mark.parametrize("flag", list(INDUCTOR_FLAGS))
@pytest.mark.parametrize("value", [1, "yes", None])
def test_inductor_flag_bad_type_names_the_option(flag, value):
    with raises_naming(TypeError, repr(flag), "True or False", repr(value)):
        CompileOptions.parse({flag: value})


@pytest.mark.parametrize("flag", list(INDUCTOR_FLAGS))
def test_inductor_flag_with_eager_inner_refused(flag):
    with raises_naming(ValueError, repr(flag), "Inductor", "inner='eager'"):
        CompileOptions.parse({flag: True, "inner": "eager"})
    with raises_naming(ValueError, repr(flag), "inner='eager'"):
        Backend(sparsity=0.5, inner="eager", **{flag: True})
