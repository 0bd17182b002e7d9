"""``QSparseConfig``: validation, the top-K count, per-projection plans and the dict round trip.

Bad options must fail where they are given, with a message that names the option, repeats the
value and says what is allowed (DESIGN.md, "Parameters that are out of range").
"""

from __future__ import annotations

import json

import pytest
from assertions import raises_naming
from hypothesis import given
from hypothesis import strategies as st

from qsparse_compile import QSparseConfig, topk_count
from qsparse_compile.config import DEFAULT_DENSE_ROLES, DEFAULT_EXCLUDE, ProjectionPlan

DENSE = ProjectionPlan(None, None, None)


# --- topk_count (DESIGN.md point 1) -------------------------------------------------------------


@pytest.mark.parametrize(
    ("dim", "sparsity", "k"),
    [
        pytest.param(10, 0.0, 10, id="dense"),
        pytest.param(10, 0.5, 5, id="half"),
        pytest.param(4096, 0.4, 2458, id="llm-width"),
        pytest.param(10, 0.75, 2, id="2.5-rounds-to-even-2"),
        pytest.param(6, 0.75, 2, id="1.5-rounds-to-even-2"),
        pytest.param(2, 0.75, 1, id="0.5-rounds-to-0-then-floor-1"),
        pytest.param(1, 0.99, 1, id="D1-keeps-one"),
        pytest.param(7, 0.99, 1, id="never-zero"),
    ],
)
def test_topk_count_examples(dim, sparsity, k):
    """Python's round (half to even), never below one entry per row."""
    assert topk_count(dim, sparsity) == k


@given(dim=st.integers(1, 10_000), sparsity=st.floats(0.0, 0.99))
def test_topk_count_in_range(dim, sparsity):
    k = topk_count(dim, sparsity)
    assert isinstance(k, int) and 1 <= k <= dim
    assert k == max(1, round((1 - sparsity) * dim))


# --- defaults ------------------------------------------------------------------------------------


def test_defaults():
    config = QSparseConfig()
    assert (config.method, config.sparsity, config.block) == ("topk", 0.5, None)
    assert (config.rescale, config.quant, config.ste, config.strict) == ("none", None, True, False)
    assert config.exclude == DEFAULT_EXCLUDE == ()
    assert config.dense_roles == DEFAULT_DENSE_ROLES == ("head", "router")


@pytest.mark.parametrize(
    ("options", "sparsity", "block"),
    [
        pytest.param({}, 0.5, (16, 32), id="paper-16of32"),
        pytest.param({"block": (2, 4)}, 0.5, (2, 4), id="2of4"),
        pytest.param({"block": [1, 4]}, 0.75, (1, 4), id="list-1of4"),
        pytest.param({"block": (2, 4), "sparsity": 0.5}, 0.5, (2, 4), id="explicit-matching"),
        pytest.param({"block": (3, 4), "sparsity": 0}, 0.0, (3, 4), id="explicit-dense"),
    ],
)
def test_block_method_implies_sparsity(options, sparsity, block):
    """With ``method="block"`` the sparsity is ``1 - n/m`` unless given (and then must agree)."""
    config = QSparseConfig(method="block", **options)
    assert config.sparsity == pytest.approx(sparsity) and config.block == block


# --- invalid options ---------------------------------------------------------------------------

INVALID = [
    pytest.param({"sparsity": -0.1}, ValueError, ("'sparsity'", "-0.1", "[0, 1)"), id="s=-0.1"),
    pytest.param({"sparsity": 1.0}, ValueError, ("'sparsity'", "1.0", "[0, 1)"), id="s=1.0"),
    pytest.param({"sparsity": 1.5}, ValueError, ("'sparsity'", "1.5", "[0, 1)"), id="s=1.5"),
    pytest.param(
        {"sparsity": float("nan")}, ValueError, ("'sparsity'", "nan", "[0, 1)"), id="s=nan"
    ),
    pytest.param({"sparsity": "0.5"}, TypeError, ("'sparsity'", "'0.5'", "str"), id="s=str"),
    pytest.param({"sparsity": True}, TypeError, ("'sparsity'", "True", "bool"), id="s=bool"),
    pytest.param(
        {"method": "block", "block": (5, 4)}, ValueError,
        ("'block'", "(5, 4)", "1 <= n <= m"), id="block=5of4",
    ),
    pytest.param(
        {"method": "block", "block": (0, 4)}, ValueError,
        ("'block'", "(0, 4)", "1 <= n <= m"), id="block=0of4",
    ),
    pytest.param(
        {"method": "block", "block": (2, 4, 8)}, TypeError,
        ("'block'", "(2, 4, 8)", "pair of integers"), id="block=triple",
    ),
    pytest.param(
        {"method": "block", "block": (2.0, 4)}, TypeError,
        ("'block'", "(2.0, 4)", "pair of integers"), id="block=float",
    ),
    pytest.param(
        {"block": (2, 4)}, ValueError,
        ("'block'", "(2, 4)", "method='topk'", "only with method='block'"), id="block-with-topk",
    ),
    pytest.param(
        {"method": "block", "block": (2, 4), "sparsity": 0.3}, ValueError,
        ("'sparsity'", "0.3", "block=(2, 4)", "sparsity=0.5"), id="block-sparsity-mismatch",
    ),
    pytest.param(
        {"method": "topk_"}, ValueError, ("'method'", "'topk_'", "'topk', 'block'"), id="topk_"
    ),
    pytest.param(
        {"method": "blok"}, ValueError, ("'method'", "'blok'", "'topk', 'block'"), id="blok"
    ),
    pytest.param(
        {"rescale": "L2"}, ValueError, ("'rescale'", "'L2'", "'none', 'l2'"), id="rescale=L2"
    ),
    pytest.param(
        {"quant": "int4"}, ValueError, ("'quant'", "'int4'", "None, 'int8', 'bitnet'"),
        id="quant=int4",
    ),
    pytest.param({"ste": "yes"}, TypeError, ("'ste'", "'yes'", "True or False"), id="ste=str"),
    pytest.param(
        {"strict": 1}, TypeError, ("'strict'", "1", "True or False"), id="strict=int"
    ),
    pytest.param(
        {"overrides": {"*.mlp.*": 1.5}}, ValueError,
        ("'overrides'['*.mlp.*']", "1.5", "[0, 1)"), id="override=1.5",
    ),
    pytest.param(
        {"overrides": [("*.mlp.*", 0.5)]}, TypeError,
        ("'overrides'", "mapping", "[('*.mlp.*', 0.5)]"), id="overrides=list",
    ),
    pytest.param(
        {"method": "block", "block": (2, 4), "overrides": {"*.o_proj": 0.6}}, ValueError,
        ("'overrides'['*.o_proj']", "0.6", "0.5, 0 or None"), id="block-override-mismatch",
    ),
    pytest.param(
        {"exclude": ["lm_head", 3]}, TypeError, ("'exclude'", "['lm_head', 3]", "glob strings"),
        id="exclude=int",
    ),
    pytest.param(
        {"tensor_parallel": "shard"}, ValueError,
        ("'tensor_parallel'", "'shard'", "'exact', 'per_shard'"), id="tensor_parallel=shard",
    ),
]


@pytest.mark.parametrize(("options", "exc", "parts"), INVALID)
def test_constructor_rejects(options, exc, parts):
    with raises_naming(exc, *parts):
        QSparseConfig(**options)


@pytest.mark.parametrize(("options", "exc", "parts"), INVALID)
def test_from_options_rejects(options, exc, parts):
    """The dict path is what ``torch.compile(options=...)`` uses: same checks, same messages."""
    with raises_naming(exc, *parts):
        QSparseConfig.from_options(dict(options))


@pytest.mark.parametrize("name", ["sparsty", "Sparsity", "blocks", "topk"])
def test_from_options_rejects_unknown_names(name):
    """A misspelt option must not be silently ignored: it would run with the default."""
    with raises_naming(ValueError, "unknown option", repr(name), "allowed", "sparsity, overrides"):
        QSparseConfig.from_options({name: 0.5})


def test_from_options_rejects_unknown_keyword_on_existing_config():
    with raises_naming(ValueError, "unknown option", "'sparsty'", "allowed"):
        QSparseConfig.from_options(QSparseConfig(), sparsty=0.3)


def test_constructor_rejects_unknown_names():
    """Python itself refuses an unknown keyword; the name is in the message."""
    with pytest.raises(TypeError, match="sparsty"):
        QSparseConfig(sparsty=0.5)  # type: ignore[call-arg]


# --- from_options ---------------------------------------------------------------------------


def test_from_options_accepts_dict_kwargs_and_config():
    base = QSparseConfig.from_options({"sparsity": 0.4, "rescale": "l2"})
    assert base == QSparseConfig(sparsity=0.4, rescale="l2")
    assert QSparseConfig.from_options(None) == QSparseConfig()
    assert QSparseConfig.from_options(base) is base
    assert QSparseConfig.from_options(base, ste=False) == QSparseConfig(
        sparsity=0.4, rescale="l2", ste=False
    )
    assert QSparseConfig.from_options({"sparsity": 0.4}, sparsity=0.6).sparsity == 0.6


def test_exclude_accepts_a_single_glob():
    assert QSparseConfig(exclude="*.o_proj").exclude == ("*.o_proj",)


# --- plan_for (DESIGN.md point 8) ---------------------------------------------------------------


@pytest.mark.parametrize("path", ["lm_head", "model.lm_head", "embed_out", "gpt_neox.embed_out"])
def test_output_head_is_dense_by_default(path):
    assert QSparseConfig(sparsity=0.5).plan_for(path) == DENSE


def test_plan_for_projection():
    plan = QSparseConfig(sparsity=0.4).plan_for("model.layers.0.self_attn.q_proj")
    assert plan == ProjectionPlan("topk", 0.4, None) and not plan.dense


@pytest.mark.parametrize("quant", ["int8", "bitnet"])
@pytest.mark.parametrize("options", [
    {"sparsity": 0.0},
    {"sparsity": 0.5, "overrides": {"*.q_proj": 0}},
    {"sparsity": 0.5, "overrides": {"*.q_proj": None}},
    {"method": "block", "block": (2, 4), "overrides": {"*.q_proj": 0}},
    {"method": "relu", "sparsity": 0.0},
], ids=["sparsity-0", "override-0", "override-none", "block-override-0", "relu-off"])
def test_quantization_does_not_depend_on_sparsity(quant, options):
    """A projection that is not sparsified is still quantized (dense BitNet is sparsity 0)."""
    plan = QSparseConfig(quant=quant, **options).plan_for("model.layers.0.self_attn.q_proj")
    assert plan == ProjectionPlan(None, None, None, quant)
    assert not plan.sparse and not plan.dense


def test_excluded_projections_are_not_quantized():
    config = QSparseConfig(sparsity=0.5, quant="bitnet", exclude=("lm_head", "*.o_proj"))
    for path in ("lm_head", "model.layers.0.self_attn.o_proj"):
        assert config.plan_for(path) == DENSE and config.plan_for(path).dense
    assert config.plan_for("model.layers.0.mlp.up_proj") == ProjectionPlan("topk", 0.5, None,
                                                                           "bitnet")


def test_last_matching_override_wins():
    """Overrides apply in the order given; a later, more general glob overrules an earlier one."""
    path = "model.layers.3.mlp.down_proj"
    specific_first = QSparseConfig(sparsity=0.4, overrides={"*.down_proj": 0.6, "*.mlp.*": 0.3})
    general_first = QSparseConfig(sparsity=0.4, overrides={"*.mlp.*": 0.3, "*.down_proj": 0.6})
    assert specific_first.plan_for(path).sparsity == 0.3
    assert general_first.plan_for(path).sparsity == 0.6
    assert general_first.plan_for("model.layers.3.mlp.up_proj").sparsity == 0.3
    assert general_first.plan_for("model.layers.3.self_attn.o_proj").sparsity == 0.4


@pytest.mark.parametrize("dense_value", [None, 0, 0.0], ids=["None", "int0", "float0"])
def test_override_to_dense(dense_value):
    config = QSparseConfig(sparsity=0.5, overrides={"*.layers.0.*": dense_value})
    assert config.plan_for("model.layers.0.mlp.gate_proj") == DENSE
    assert config.plan_for("model.layers.1.mlp.gate_proj").sparsity == 0.5


def test_override_can_sparsify_selected_projections_of_a_dense_default():
    config = QSparseConfig(sparsity=0.0, overrides={"*.mlp.down_proj": 0.6})
    assert config.plan_for("model.layers.0.mlp.down_proj") == ProjectionPlan("topk", 0.6, None)
    assert config.plan_for("model.layers.0.mlp.up_proj") == DENSE


def test_exclusion_wins_over_overrides():
    """Exclusion is checked first, even before an override naming the path literally."""
    config = QSparseConfig(sparsity=0.5, overrides={"*": 0.7, "model.layers.0.mlp.up_proj": 0.3},
                           exclude=("*.mlp.*",))
    assert config.plan_for("model.layers.0.mlp.up_proj") == DENSE
    assert config.plan_for("model.layers.0.self_attn.q_proj").sparsity == 0.7


def test_dense_roles_win_over_wildcard_overrides():
    """The head (by role) stays dense even if a wildcard glob matches it; ``dense_roles=()``
    sparsifies it."""
    config = QSparseConfig(sparsity=0.5, overrides={"*": 0.7})
    assert config.plan_for("model.lm_head") == DENSE
    assert config.plan_for("model.lm_head", "q") == ProjectionPlan("topk", 0.7, None)
    assert QSparseConfig(sparsity=0.5, dense_roles=()).plan_for("model.lm_head").sparsity == 0.5


@pytest.mark.parametrize(("overrides", "expected"), [
    ({"lm_head": 0.3}, ProjectionPlan("topk", 0.3, None)),
    ({"lm_head": None}, DENSE),
    ({"lm_hea?": 0.3}, DENSE),
    ({"*lm_head": 0.3}, DENSE),
], ids=["literal", "literal-none", "wildcard-?", "wildcard-*"])
def test_an_override_naming_the_path_literally_wins_over_its_role(overrides, expected):
    config = QSparseConfig(sparsity=0.5, overrides=overrides)
    assert config.plan_for("lm_head") == expected
    assert config.plan_for("model.layers.0.mlp.gate", "router") == DENSE


def test_dense_roles_take_the_role_given_else_the_name():
    config = QSparseConfig(sparsity=0.5, quant="int8")
    # a structural head (BERT's decoder), a structural router, and names alone
    assert config.plan_for("cls.predictions.decoder", "head") == DENSE
    assert config.plan_for("model.layers.0.mlp.gate", "router") == DENSE
    assert config.plan_for("model.layers.0.mlp.gate") == ProjectionPlan("topk", 0.5, None,
                                                                        "int8")
    assert config.plan_for("embed_out") == DENSE
    only_routers = QSparseConfig(sparsity=0.5, dense_roles=("router",))
    assert only_routers.plan_for("lm_head").sparsity == 0.5
    assert not only_routers.governs("x.gate", "router") and only_routers.governs("lm_head")


@pytest.mark.parametrize(("value", "error", "words"), [
    ("heads", ValueError, ("'dense_roles'", "'heads'", "router")),
    (("head", 3), TypeError, ("'dense_roles'", "role names")),
    ({"head": True}, TypeError, ("'dense_roles'",)),
], ids=["unknown-role", "not-a-string", "mapping"])
def test_dense_roles_are_checked(value, error, words):
    with pytest.raises(error) as caught:
        QSparseConfig(dense_roles=value)
    for word in words:
        assert word in str(caught.value)


def test_dense_roles_accepts_one_role_and_round_trips():
    config = QSparseConfig(dense_roles="head")
    assert config.dense_roles == ("head",)
    assert QSparseConfig.from_options(json.loads(json.dumps(config.to_dict()))) == config


def test_custom_exclusions_add_to_the_dense_roles():
    config = QSparseConfig(sparsity=0.5, exclude=("*.self_attn.*",))
    assert config.plan_for("model.layers.0.self_attn.k_proj") == DENSE
    assert config.plan_for("lm_head") == DENSE
    assert QSparseConfig(sparsity=0.5, exclude=("*.self_attn.*",),
                         dense_roles=()).plan_for("lm_head").sparsity == 0.5


def test_globs_are_case_sensitive():
    config = QSparseConfig(sparsity=0.5, overrides={"*.Down_Proj": None})
    assert config.plan_for("model.layers.0.mlp.down_proj").sparsity == 0.5


def test_block_plan():
    config = QSparseConfig(method="block", block=(2, 4), overrides={"*.o_proj": None})
    assert config.plan_for("model.layers.0.mlp.up_proj") == ProjectionPlan("block", 0.5, (2, 4))
    assert config.plan_for("model.layers.0.self_attn.o_proj") == DENSE
    assert config.plan_for("lm_head") == DENSE


def test_block_with_zero_sparsity_is_dense_everywhere():
    config = QSparseConfig(method="block", block=(2, 4), sparsity=0)
    assert config.plan_for("model.layers.0.mlp.up_proj") == DENSE


# --- to_dict round trip ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({}, id="defaults"),
        pytest.param(
            {
                "sparsity": 0.4,
                "overrides": {"*.mlp.down_proj": 0.6, "*.layers.0.*": None},
                "rescale": "l2",
                "quant": "int8",
                "ste": False,
                "exclude": ("lm_head", "*.o_proj"),
                "strict": True,
            },
            id="topk-everything",
        ),
        pytest.param(
            {"method": "block", "block": (2, 4), "quant": "bitnet", "overrides": {"*.q_proj": 0}},
            id="block-bitnet",
        ),
    ],
)
def test_to_dict_round_trips_through_json_and_from_options(options):
    """``to_dict`` is plain JSON (so it can be logged or stored) and rebuilds the same config."""
    config = QSparseConfig(**options)
    as_json = json.dumps(config.to_dict())
    rebuilt = QSparseConfig.from_options(json.loads(as_json))
    assert rebuilt == config
    assert rebuilt.to_dict() == config.to_dict()
    for path in ("model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj", "lm_head"):
        assert rebuilt.plan_for(path) == config.plan_for(path)
