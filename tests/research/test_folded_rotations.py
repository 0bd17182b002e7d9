"""Training-free folded rotations: every fold is the same function, and the compiled folded
model equals the reference that applies the same rotations explicitly.

Exactness (fp32, 1e-4 relative to the largest logit) at sparsity 0 for the residual rotation,
the per-kv-head v/o rotations (GQA: 4 q heads on 2 kv heads), the folded importance scales and
per-layer rotations with their basis change, on tiny Llama, Qwen2 and Mistral; SmolLM2-135M
with its real weights in a ``slow`` test.
"""

from __future__ import annotations

import json

import pytest
import torch
from hf_models import HF_MODELS, logits, perturb_norms_and_biases, relative_error, token_ids
from rotated_reference import rotated_reference

from qsparse_compile.reference import reference_model
from qsparse_compile.research.folded_rotations import (
    FoldedRotations,
    calibrate_folded,
    fwht_macs,
    hadamard_like,
    pca_rotation,
)
from qsparse_compile.research.rotation_folding import (
    fold_down_rotations,
    fold_head_rotations,
    fold_importance_scales,
    fold_norm_weights,
    head_layout,
)
from qsparse_compile.rotations import RotationGroup, Rotations

FAMILIES = ("llama", "qwen2", "mistral")
#: calibrate_folded keyword arguments and scale power of each variant under test.
VARIANTS = {
    "pca": ({"residual": "pca", "heads": None}, None),
    "pca-heads": ({"residual": "pca", "heads": "pca"}, None),
    "pca-heads-scaled": ({"residual": "pca", "heads": "pca"}, 1.0),
    "hadamard": ({"residual": "hadamard", "heads": "hadamard"}, None),
    "scales-only": ({"residual": None, "heads": None}, 0.5),
    "per-layer": ({"residual": "pca", "per_layer": True, "heads": "pca"}, 1.0),
    "one-segment": ({"residual": "pca", "per_layer": True, "segments": 1, "heads": None}, None),
    "down-pca": ({"residual": "pca", "per_layer": True, "heads": "pca", "down": "pca",
                  "down_block": 16}, 1.0),
    "down-hadamard": ({"residual": None, "heads": None, "down": "hadamard",
                       "down_block": 32}, None),
}
#: The basis change is a 2-D buffer the pass would sparsify like a projection: an exact
#: rotation, kept dense. The down input's blocks are a batch of matrices, which the pass never
#: takes for a projection (no exclusion needed, and a glob naming them would match nothing).
EXCLUDE = {"per-layer": ("*.basis_change.change",), "down-pca": ("*.basis_change.change",)}


def _build(family: str) -> torch.nn.Module:
    model = HF_MODELS[family].build()
    return perturb_norms_and_biases(model)  # so the folds are exercised




def _rotations(model: torch.nn.Module, variant: str) -> FoldedRotations:
    kwargs, power = VARIANTS[variant]
    batches = [{"input_ids": token_ids(seed=s), "use_cache": False} for s in (3, 4)]
    rot = calibrate_folded(model, batches, **kwargs)
    rot.scale_power = power
    return rot


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("family", FAMILIES)
def test_folded_model_has_the_originallogits(family, variant):
    model = _build(family)
    ids = token_ids()
    before = logits(model, ids)
    folded = _rotations(model, variant).apply(model)
    assert relative_error(logits(folded, ids), before) <= 1e-4
    assert torch.equal(logits(model, ids), before)  # the original is untouched


def test_head_rotation_moves_v_and_o_only():
    model = _build("llama")
    q_heads, kv_heads, head_dim = head_layout(model)
    assert (q_heads, kv_heads) == (4, 2)
    rot = _rotations(model, "pca-heads").heads
    folded = fold_head_rotations(model, rot)
    changed = {p for (p, a), (_, b) in zip(model.named_parameters(), folded.named_parameters(),
                                           strict=True) if not torch.equal(a, b)}
    assert changed and all(p.endswith(("v_proj.weight", "o_proj.weight")) for p in changed)


def test_importance_scales_make_topk_keep_the_weighted_magnitudes():
    """After the scale fold, down's input is ``x * c`` with ``c`` proportional to down's
    column norms: top-K of it is top-K of ``|x_j| ||W_down[:, j]||``."""
    model = _build("llama")
    folded = fold_importance_scales(fold_norm_weights(model), 1.0)
    captured = []
    for m in (model, folded):
        handle = m.model.layers[0].mlp.down_proj.register_forward_pre_hook(
            lambda _m, args: captured.append(args[0].detach()))
        logits(m, token_ids())
        handle.remove()
    x, scaled = captured
    norms = model.model.layers[0].mlp.down_proj.weight.norm(dim=0)
    ratio = (scaled / x) / norms  # a constant: c_j = norm_j / rms(norms)
    torch.testing.assert_close(ratio, ratio.flatten()[0].expand_as(ratio), rtol=1e-3, atol=0)


def _explicit_rotations(model: torch.nn.Module, rot: FoldedRotations) -> Rotations:
    """The residual rotation on q/k/v and gate/up, and o's input rotated by the block-diagonal
    of its q heads' kv-head rotations: what the folds do, as explicit ``x @ Q`` products."""
    q_heads, kv_heads, head_dim = head_layout(model)
    groups = []
    for i in range(len(model.model.layers)):
        attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        groups.append(RotationGroup((f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj"),
                                    rot.residual))
        groups.append(RotationGroup((f"{mlp}.gate_proj", f"{mlp}.up_proj"), rot.residual))
        per_q = rot.heads[i].repeat_interleave(q_heads // kv_heads, dim=0)
        groups.append(RotationGroup((f"{attn}.o_proj",), torch.block_diag(*per_q)))
    return Rotations(groups)


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_compiled_folded_model_equals_the_explicitly_rotated_reference(family):
    sparsity = 0.4
    model = _build(family)
    rot = _rotations(model, "pca-heads")
    folded = rot.apply(model)
    ids = token_ids()
    compiled = torch.compile(folded, backend="qsparse",
                             options={"sparsity": sparsity, "inner": "eager"})
    out = logits(compiled, ids)
    normed = fold_norm_weights(model)  # readers see the weightless norm output, unrotated
    with torch.no_grad(), rotated_reference(normed, _explicit_rotations(normed, rot),
                                            sparsity=sparsity):
        expected = normed(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad(), reference_model(fold_norm_weights(model), sparsity=sparsity):
        unrotated = fold_norm_weights(model)(input_ids=ids, use_cache=False).logits
    assert not torch.allclose(out, unrotated, rtol=1e-3, atol=1e-3)  # top-K did change


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("variant", ["pca-heads-scaled", "per-layer", "down-pca",
                                     "down-hadamard"])
def test_compiled_folded_model_equals_the_eager_reference_of_its_weights(variant):
    """Scales, basis changes and the down input's online rotation are not orthogonal input
    rotations of a projection: the compiled model is checked against the eager reference on
    the folded weights (the online products kept dense)."""
    model = _build("llama")
    folded = _rotations(model, variant).apply(model)
    options = {"sparsity": 0.5}
    if variant in EXCLUDE:
        options["exclude"] = EXCLUDE[variant]
    ids = token_ids()
    compiled = torch.compile(folded, backend="qsparse", options={**options, "inner": "eager"})
    out = logits(compiled, ids)
    with torch.no_grad(), reference_model(folded, **options):
        expected = folded(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_added_macs_and_file_round_trip(tmp_path):
    model = _build("llama")
    dim = model.config.hidden_size
    layers = _rotations(model, "per-layer")
    assert layers.added_macs(model) == (len(model.model.layers) - 1) * dim * dim
    one = _rotations(model, "one-segment")
    assert one.added_macs(model) == 0 and not hasattr(one.apply(model).model.layers[1],
                                                      "basis_change")
    shared = FoldedRotations.load(one.save(tmp_path / "one.safetensors"))  # shared tensors
    assert shared.added_macs(model) == 0 and torch.equal(shared.layers[0], one.layers[1])
    rot = _rotations(model, "pca-heads-scaled")
    assert rot.added_macs(model) == 0
    loaded = FoldedRotations.load(rot.save(tmp_path / "r.safetensors"))
    assert torch.equal(loaded.residual, rot.residual) and loaded.scale_power == 1.0
    assert all(torch.equal(a, b) for a, b in zip(loaded.heads, rot.heads, strict=True))
    ids = token_ids()
    torch.testing.assert_close(logits(loaded.apply(model), ids), logits(rot.apply(model), ids))
    assert fwht_macs(1536, 512) == 1536 * 9 + 1536
    down = _rotations(model, "down-pca")
    hidden = model.config.intermediate_size
    assert [tuple(r.shape) for r in down.down] == [(hidden // 16, 16, 16)] * 2
    assert down.added_macs(model) == (len(model.model.layers) - 1) * dim * dim + 2 * hidden * 16
    again = FoldedRotations.load(down.save(tmp_path / "d.safetensors"))
    # a file of the first format (no down rotations) still loads; an unknown one is refused
    from safetensors.torch import save_file
    for fmt in ("qsparse-folded-rotations/1", "qsparse-folded-rotations/9"):
        header = {"format": fmt, "layers": 0, "heads": 0, "scale_power": None, "metadata": {}}
        save_file({"residual": torch.eye(dim)}, str(tmp_path / "v.safetensors"),
                  metadata={"qsparse": json.dumps(header)})
        if fmt.endswith("/1"):
            old = FoldedRotations.load(tmp_path / "v.safetensors")
            assert old.down is None and torch.equal(old.residual, torch.eye(dim))
        else:
            with pytest.raises(ValueError, match=r"format '.*/9', expected one of"):
                FoldedRotations.load(tmp_path / "v.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(again.down, down.down, strict=True))
    torch.testing.assert_close(logits(again.apply(model), ids), logits(down.apply(model), ids))


def test_down_rotation_moves_down_only_and_is_applied_online():
    model = _build("llama")
    rot = _rotations(model, "down-hadamard")
    folded = rot.apply(model)
    for (name, before), after in zip(fold_norm_weights(model).named_parameters(),
                                     folded.parameters(), strict=True):
        assert torch.equal(before, after) != name.endswith("down_proj.weight"), name
    seen = []
    layer = folded.model.layers[0]
    layer.mlp.down_proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    blocks = layer.mlp.down_rotation.blocks
    for shape in ((3,), (2, 5)):  # rows, and [batch, tokens]
        x = torch.randn(*shape, model.config.intermediate_size)
        layer.mlp.down_proj(x)
        torch.testing.assert_close(seen[-1], x @ torch.block_diag(*blocks))


def test_rotation_builders_are_orthogonal():
    moment = torch.randn(12, 12, dtype=torch.float64)
    q = pca_rotation(moment @ moment.T)
    for r in (q, hadamard_like(24, seed=1), hadamard_like(16)):
        torch.testing.assert_close(r.T @ r, torch.eye(r.shape[0], dtype=torch.float64),
                                   rtol=0, atol=1e-12)


def test_bad_input_is_named(tmp_path):
    model = _build("llama")
    with pytest.raises(ValueError, match=r"residual must be one of \['pca', 'hadamard'\].*'svd'"):
        calibrate_folded(model, [], residual="svd")
    with pytest.raises(ValueError, match="per_layer=True needs residual='pca', got 'hadamard'"):
        calibrate_folded(model, [], residual="hadamard", per_layer=True)
    with pytest.raises(ValueError, match=r"segments must be an int in \[1, 2\].*got 3"):
        calibrate_folded(model, [], per_layer=True, segments=3)
    with pytest.raises(ValueError, match=r"one \[kv_heads, head_dim, head_dim\] tensor per "
                                         r"layer \(2\), got 1"):
        fold_head_rotations(model, [torch.eye(8).expand(2, 8, 8)])
    with pytest.raises(ValueError, match=r"rotations\[0\] must be \[2, 8, 8\].*got \[8, 8\]"):
        fold_head_rotations(model, [torch.eye(8), torch.eye(8)])
    with pytest.raises(ValueError, match=r"power must be a number in \[0, 4\], got -1"):
        fold_importance_scales(model, -1)
    with pytest.raises(ValueError, match=r"fold_down_rotations: power must be a number in "
                                         r"\[0, 4\], got 5"):
        fold_down_rotations(model, [torch.eye(16).expand(4, 16, 16)] * 2, scale_power=5)
    with pytest.raises(ValueError, match=r"down_block must be a positive int dividing the "
                                         r"down input's width 64, got 48"):
        calibrate_folded(model, [], residual=None, heads=None, down="hadamard", down_block=48)
    with pytest.raises(ValueError, match=r"rotations\[1\] must be \[blocks, block, block\] "
                                         r"with blocks \* block = 64.*got \[2, 16, 16\]"):
        fold_down_rotations(model, [torch.eye(16).expand(4, 16, 16),
                                    torch.eye(16).expand(2, 16, 16)])
    with pytest.raises(ValueError, match="residual .* or layers .* not both"):
        FoldedRotations(residual=torch.eye(2), layers=[torch.eye(2)])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FoldedRotations.load(tmp_path / "missing.safetensors")


@pytest.mark.slow  # SmolLM2-135M's real weights: a few seconds to load and fold
def test_smollm2_folded_logits_equal_the_original():
    pytest.importorskip("transformers")
    from qsparse_compile.research.models.smollm2 import load_smollm2

    model, _ = load_smollm2()
    assert head_layout(model) == (9, 3, 64)
    ids = torch.randint(0, model.config.vocab_size, (1, 24),
                        generator=torch.Generator().manual_seed(0))
    before = logits(model, ids)
    rot = calibrate_folded(model, [{"input_ids": ids, "use_cache": False}], residual="pca",
                           heads="pca", runner=model.model)
    rot.scale_power = 1.0
    assert relative_error(logits(rot.apply(model), ids), before) <= 1e-4
