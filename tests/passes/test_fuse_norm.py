"""The share and fuse passes on real model graphs: op counts before/after, same outputs.

Per layer of a pre-norm model, the rewrite leaves four sparsify nodes (q/k/v share one,
gate/up share one, o, down); fusion must replace the two that follow a norm with
``norm_sparsify`` and remove those norms; the outputs must not change.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from op_counts import CountingBackend, op_counts

from qsparse_compile import reference
from qsparse_compile.config import QSparseConfig

qsparse = torch.ops.qsparse
LAYERS = 2


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                      num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).eval()


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=LAYERS, n_head=4, n_positions=16)
    return GPT2LMHeadModel(cfg).eval()


MODELS = {"llama": (_llama, "rsqrt"), "gpt2": (_gpt2, "layer_norm")}


def _compile_counting(model, ids, config: QSparseConfig, fuse: bool):
    """Compile with the backend (eager inner); return (logits, counts before, counts after)."""
    backend = CountingBackend({**config.to_dict(), "fuse": fuse})
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = torch.compile(model, backend=backend, fullgraph=True)(ids, use_cache=False).logits
    return out, backend.before[0], backend.after[0]


@pytest.fixture(scope="module", params=list(MODELS))
def model_case(request):
    torch.manual_seed(0)
    build, norm_op = MODELS[request.param]
    return request.param, build(), norm_op


@pytest.mark.parametrize("quant", [None, "int8"])
def test_fusion_counts_and_outputs(model_case, quant):
    name, model, norm_op = model_case
    ids = torch.randint(0, 64, (2, 7))
    config = QSparseConfig(sparsity=0.5, quant=quant, rescale="l2" if quant else "none")
    unfused, before, plain = _compile_counting(model, ids, config, fuse=False)
    fused, _, after = _compile_counting(model, ids, config, fuse=True)

    # unfused: one sparsify per distinct projection input (4 per layer), no fused op
    assert plain["topk_sparsify"] == 4 * LAYERS and plain["norm_sparsify"] == 0
    # fused: the two sparsifies after the layer norms are gone, the norms with them
    assert after["norm_sparsify"] == 2 * LAYERS
    assert after["topk_sparsify"] == 2 * LAYERS
    assert after[norm_op] == before[norm_op] - 2 * LAYERS
    if quant:
        # the quantizer of the fused inputs is folded into the fused op
        assert plain["int8_fake_quant"] == 4 * LAYERS
        assert after["int8_fake_quant"] == 2 * LAYERS
    assert after["sparse_linear"] == plain["sparse_linear"] > 0
    assert torch.equal(fused, unfused)
    with reference.reference_model(model, config):
        expected = model(ids, use_cache=False).logits
    torch.testing.assert_close(fused, expected, atol=1e-5, rtol=1e-5)


def test_block_sparsity_fuses_too(model_case):
    _, model, _ = model_case
    ids = torch.randint(0, 64, (1, 5))
    config = QSparseConfig(method="block", block=(2, 4))
    fused, _, after = _compile_counting(model, ids, config, fuse=True)
    assert after["norm_sparsify"] == 2 * LAYERS and after["block_sparsify"] == 2 * LAYERS
    with reference.reference_model(model, config):
        expected = model(ids, use_cache=False).logits
    torch.testing.assert_close(fused, expected, atol=1e-5, rtol=1e-5)


class _NormFeedsTwo(torch.nn.Module):
    """The norm's output is used by a projection and by the residual: it must stay."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(16)
        self.proj = torch.nn.Linear(16, 16)

    def forward(self, x):
        h = self.norm(x)
        return self.proj(h) + h


class _RmsOp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.rand(16) + 0.5)
        self.proj = torch.nn.Linear(16, 8)

    def forward(self, x):
        return self.proj(F.rms_norm(x, (16,), self.weight, 1e-6))


def _export_counts(module, x, fuse=True):
    import qsparse_compile as qc

    ep = torch.export.export(module, (x,))
    ep2 = qc.sparsify_exported(ep, sparsity=0.5, fuse=fuse)
    return op_counts(ep2.graph_module), ep2


def test_norm_with_other_users_is_not_fused():
    torch.manual_seed(0)
    module, x = _NormFeedsTwo().eval(), torch.randn(3, 16)
    counts, ep2 = _export_counts(module, x)
    assert counts["norm_sparsify"] == 0 and counts["topk_sparsify"] == 1
    with reference.reference_model(module, sparsity=0.5):
        expected = module(x)
    torch.testing.assert_close(ep2.module()(x), expected)


def test_rms_norm_op_is_fused_in_exported_program():
    torch.manual_seed(0)
    module, x = _RmsOp().eval(), torch.randn(2, 3, 16)
    counts, ep2 = _export_counts(module, x)
    assert counts["norm_sparsify"] == 1 and counts["topk_sparsify"] == 0
    unfused_counts, ep_plain = _export_counts(module, x, fuse=False)
    assert unfused_counts["norm_sparsify"] == 0 and unfused_counts["topk_sparsify"] == 1
    torch.testing.assert_close(ep2.module()(x), ep_plain.module()(x), atol=1e-6, rtol=1e-6)


def test_decomposed_export_shares_and_fuses():
    """After ``run_decompositions`` each projection reshapes its input separately; the
    normalised program merges repeated views and sharing looks through the rest, so fusion
    still applies."""
    import qsparse_compile as qc

    torch.manual_seed(0)
    model = _llama()

    class Logits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, ids):
            return self.inner(ids, use_cache=False).logits

    ids = torch.randint(0, 64, (1, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(Logits(model), (ids,), strict=False).run_decompositions()
    plain = op_counts(qc.sparsify_exported(ep, sparsity=0.4, fuse=False).graph_module)
    ep2 = qc.sparsify_exported(ep, sparsity=0.4)
    fused = op_counts(ep2.graph_module)
    # without sharing: one per distinct input node (normalisation merges repeated views)
    assert plain["topk_sparsify"] == 4 * LAYERS
    assert fused["norm_sparsify"] == 2 * LAYERS and fused["topk_sparsify"] == 2 * LAYERS
    with reference.reference_model(model, sparsity=0.4):
        expected = model(ids, use_cache=False).logits
    torch.testing.assert_close(ep2.module()(ids), expected, atol=1e-5, rtol=1e-5)


def _fused(fn, *args):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from qsparse_compile.passes.fuse_norm import fuse_norm_sparsify
    from qsparse_compile.passes.normalise import trace_normalised

    mode = FakeTensorMode()
    with mode:
        gm = trace_normalised(fn, [mode.from_tensor(a) for a in args])
    count = fuse_norm_sparsify(gm)
    gm.recompile()
    return count, gm(*args), fn(*args)


def test_rms_norm_op_fuses_only_where_it_computes_what_the_fused_op_does():
    """``F.rms_norm`` computes in the input's dtype; the fused op (Llama's chain) in float32:
    the same function in float32 only. Its default eps is the dtype's machine epsilon."""
    def sparse_rms(x, w, eps=1e-6):
        return qsparse.topk_sparsify.default(F.rms_norm(x, (x.shape[-1],), w, eps), 64,
                                             False, True)

    x, w = torch.randn(8, 256) * 3, torch.randn(256)
    count, got, expected = _fused(lambda x, w: sparse_rms(x, w), x, w)
    assert count == 1 and torch.equal(got != 0, expected != 0)
    count, got, expected = _fused(lambda x, w: sparse_rms(x, w, None), x, w)
    assert count == 1 and torch.equal(got != 0, expected != 0)
    count, got, expected = _fused(lambda x, w: sparse_rms(x, w), x.bfloat16(), w.bfloat16())
    assert count == 0 and torch.equal(got, expected)


def test_the_norm_weight_must_be_a_vector_over_the_features():
    """A gate the shape of the activation multiplying the chain is not a norm weight."""
    def gated(x, gate):
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return qsparse.topk_sparsify.default(gate * h, 4, False, True)

    x = torch.randn(3, 16)
    count, got, expected = _fused(gated, x, torch.sigmoid(torch.randn(3, 16)))
    assert count == 0 and torch.equal(got, expected)
