"""Globs of ``overrides`` and ``exclude`` that match no projection are found and explained.

Pure Python: the paths are those of a Llama-style model (``model.layers.N...`` and ``lm_head``),
written out, so no model is built.
"""

from __future__ import annotations

import warnings

import pytest

from qsparse_compile import glob_check
from qsparse_compile.config import DEFAULT_EXCLUDE, QSparseConfig
from qsparse_compile.glob_check import (
    UnmatchedGlob,
    UnmatchedGlobWarning,
    check_globs,
    nearest_paths,
    unmatched_globs,
)

ROLES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
LLAMA = [f"model.layers.{i}.{r}" for i in range(4) for r in ROLES] + ["lm_head"]
LAYER0 = tuple(p for p in LLAMA if p.startswith("model.layers.0."))


def test_globs_that_match_are_not_reported():
    config = QSparseConfig(overrides={"*.mlp.down_proj": 0.6, "model.layers.0.*": None},
                           exclude=("lm_head", "*.layers.3.self_attn.*"))
    assert unmatched_globs(config, LLAMA) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        assert check_globs(config, LLAMA, "model 'llama'") == []


def test_glob_anchored_at_the_root_suggests_the_star_dot_form_first():
    config = QSparseConfig(overrides={"layers.0.*": None})
    [found] = unmatched_globs(config, LLAMA)
    assert found == UnmatchedGlob("overrides", "layers.0.*", LAYER0[:3])
    # the hint is what "*.layers.0.*" matches, in model order
    assert nearest_paths("layers.0.*", LLAMA) == LAYER0[:3]
    assert nearest_paths("mlp.down_proj", LLAMA)[0] == "model.layers.0.mlp.down_proj"


def test_glob_naming_a_parent_module_suggests_its_projections():
    assert nearest_paths("model.layers.2", LLAMA) == (
        "model.layers.2.self_attn.q_proj", "model.layers.2.self_attn.k_proj",
        "model.layers.2.self_attn.v_proj")


def test_typo_gets_the_closest_paths_by_text():
    assert nearest_paths("*.down_prj", LLAMA) == (
        "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj",
        "model.layers.2.mlp.down_proj")
    assert nearest_paths("*.layer.1.*", LLAMA)[0] == "model.layers.1.self_attn.q_proj"
    assert nearest_paths("model.layers.2.mlp.gate_prj", LLAMA)[0] == \
        "model.layers.2.mlp.gate_proj"
    assert nearest_paths("zzz", LLAMA) == ()


HEAD_GLOBS = ("lm_head", "*.lm_head", "embed_out", "*.embed_out")


@pytest.mark.parametrize("default", [DEFAULT_EXCLUDE, HEAD_GLOBS],
                         ids=["current-default", "head-globs-default"])
def test_default_exclusions_are_never_reported(monkeypatch, default):
    # A default naming the head of several families ("embed_out" matches nothing on Llama, a
    # model without a head matches none of them) is not the user's mistake. Whatever the
    # default is (the head globs, or none when the head is found by its role), it is exempt.
    monkeypatch.setattr(glob_check, "DEFAULT_EXCLUDE", default)
    no_head = [p for p in LLAMA if p != "lm_head"]
    assert unmatched_globs(QSparseConfig(exclude=default), no_head) == []
    assert unmatched_globs(QSparseConfig(), no_head) == []
    # also when the user keeps the default beside globs of their own
    config = QSparseConfig(exclude=default + ("*.layers.0.*", "*.nothing"))
    assert [u.glob for u in unmatched_globs(config, no_head)] == ["*.nothing"]


def test_user_exclude_glob_that_matches_nothing_is_reported():
    config = QSparseConfig(overrides={"*.mlp.up_proj": 0.3},
                           exclude=("lm_head", "*.self_attn.qproj", "no.such.module"))
    found = unmatched_globs(config, LLAMA)
    assert [(u.option, u.glob) for u in found] == [("exclude", "*.self_attn.qproj"),
                                                  ("exclude", "no.such.module")]
    assert found[0].nearest[0] == "model.layers.0.self_attn.q_proj"
    assert found[1].nearest == ()


def test_overrides_come_before_exclusions_and_paths_may_be_a_generator():
    config = QSparseConfig(overrides={"a.*": 0.1, "*.mlp.up_proj": 0.3, "b": None},
                           exclude=("c",))
    found = unmatched_globs(config, (p for p in LLAMA))
    assert [(u.option, u.glob) for u in found] == [
        ("overrides", "a.*"), ("overrides", "b"), ("exclude", "c")]


def test_check_globs_warns_once_naming_globs_options_nearest_and_where():
    config = QSparseConfig(overrides={"layers.0.*": None, "*.down_prj": 0.6},
                           exclude=("*.nothing",))
    with pytest.warns(UnmatchedGlobWarning) as caught:
        found = check_globs(config, LLAMA, "model 'llama'")
    assert len(caught) == 1 and issubclass(UnmatchedGlobWarning, UserWarning)
    assert [u.glob for u in found] == ["layers.0.*", "*.down_prj", "*.nothing"]
    message = str(caught[0].message)
    assert message.startswith("model 'llama': 3 glob(s) match none of the 29 projection paths")
    for needle in ("option 'overrides' glob 'layers.0.*'", "'model.layers.0.self_attn.q_proj'",
                   "option 'overrides' glob '*.down_prj'", "'model.layers.0.mlp.down_proj'",
                   "option 'exclude' glob '*.nothing' (no path is close)"):
        assert needle in message
    assert "\n" not in message  # the command line prints it as one line


def test_strict_raises_the_same_message_instead_of_warning():
    config = QSparseConfig(overrides={"layers.0.*": None}, strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=r"^compile of Llama: 1 glob\(s\) match none") as err:
            check_globs(config, LLAMA, "compile of Llama")
    assert "'model.layers.0.self_attn.q_proj'" in str(err.value)
    # nothing unmatched: strict or not, nothing is raised
    assert check_globs(QSparseConfig(strict=True), LLAMA, "compile of Llama") == []


def test_no_paths_at_all_reports_every_user_glob():
    config = QSparseConfig(overrides={"*.q_proj": 0.4})
    [found] = unmatched_globs(config, [])
    assert found == UnmatchedGlob("overrides", "*.q_proj", ())


def test_module_imports_neither_torch_nor_the_passes():
    import ast
    from pathlib import Path

    import qsparse_compile.glob_check as module

    tree = ast.parse(Path(module.__file__).read_text())
    imported = {alias.name for node in tree.body if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {("." * node.level) + (node.module or "") for node in tree.body
                 if isinstance(node, ast.ImportFrom)}
    assert not any(name.split(".")[0] == "torch" or "passes" in name for name in imported)
    assert {n for n in imported if n.startswith(".")} <= {".config"}
