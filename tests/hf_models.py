"""Tiny Hugging Face causal LMs built from configs (no downloads), shared by the tests.

Every model has hidden size 32 and 2 layers, so every projection input width (32, 64 or 128)
is a multiple of 32 and both 2:4 and 16:32 apply everywhere; ``intermediate_size`` can be set
to a width that 32 does not divide to exercise the "left dense" path. Each builder seeds the
generator, so a model is the same every time it is built.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Callable

import torch

VOCAB = 64
HIDDEN = 32
LAYERS = 2


@dataclasses.dataclass(frozen=True)
class HFModel:
    """A tiny model family: how to build it and what the pass must find in it."""

    name: str
    build: Callable[..., torch.nn.Module]
    #: Roles of one layer's projections, in the order the forward pass calls them.
    layer_roles: tuple[str, ...]
    #: Module path of layer ``i``'s projections, relative to the model.
    layer_paths: Callable[[int], tuple[str, ...]]

    @property
    def per_layer(self) -> int:
        return len(self.layer_roles)

    def expected_paths(self, layers: int = LAYERS) -> list[str]:
        return [p for i in range(layers) for p in self.layer_paths(i)]


def quiet_transformers() -> None:
    """Silence config-validation chatter (tiny vocabularies trip token-id checks)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)


def _llama_like(config_cls_name: str, model_cls_name: str):
    def build(intermediate_size: int = 64, layers: int = LAYERS, seed: int = 0,
              tie_word_embeddings: bool = False, **extra) -> torch.nn.Module:
        import transformers

        quiet_transformers()
        config = getattr(transformers, config_cls_name)(
            vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=intermediate_size,
            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=None,
            tie_word_embeddings=tie_word_embeddings, attn_implementation="sdpa", **extra,
        )
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return getattr(transformers, model_cls_name)(config).eval()

    return build


def build_gpt2(layers: int = LAYERS, seed: int = 0, **extra) -> torch.nn.Module:
    import transformers

    quiet_transformers()
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=layers, n_head=4, n_positions=64,
        bos_token_id=0, eos_token_id=1, attn_implementation="sdpa", **extra,
    )
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.GPT2LMHeadModel(config).eval()


def _llama_paths(i: int) -> tuple[str, ...]:
    attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
    return (f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj", f"{attn}.o_proj",
            f"{mlp}.gate_proj", f"{mlp}.up_proj", f"{mlp}.down_proj")


def _gpt2_paths(i: int) -> tuple[str, ...]:
    h = f"transformer.h.{i}"
    return (f"{h}.attn.c_attn", f"{h}.attn.c_proj", f"{h}.mlp.c_fc", f"{h}.mlp.c_proj")


LLAMA_ROLES = ("q", "k", "v", "o", "gate", "up", "down")

HF_MODELS = {
    "llama": HFModel("llama", _llama_like("LlamaConfig", "LlamaForCausalLM"),
                     LLAMA_ROLES, _llama_paths),
    "mistral": HFModel("mistral", _llama_like("MistralConfig", "MistralForCausalLM"),
                       LLAMA_ROLES, _llama_paths),
    "qwen2": HFModel("qwen2", _llama_like("Qwen2Config", "Qwen2ForCausalLM"),
                     LLAMA_ROLES, _llama_paths),
    "gpt2": HFModel("gpt2", build_gpt2, ("qkv", "o", "up", "down"), _gpt2_paths),
}


class Logits(torch.nn.Module):
    """``model(ids, use_cache=False).logits`` as a module returning a plain tensor (export)."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.inner(ids, use_cache=False).logits


def token_ids(batch: int = 2, seq: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def perturb_norms_and_biases(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Move RMSNorm weights away from ones and biases away from zero (in place), so that a
    transform folding norm weights, or rotating biases, is not a no-op on a fresh model."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for path, param in model.named_parameters():
            if path.endswith("norm.weight"):
                param.copy_(1.0 + 0.3 * torch.randn(param.shape, generator=generator))
            elif path.endswith(".bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    return model


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """A causal LM's logits for ``ids`` (no cache, no grad)."""
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference of ``a`` from ``b`` relative to the largest ``|b|``."""
    return ((a - b).abs().max() / b.abs().max()).item()


# --- mixtures of experts, and models whose head is not called lm_head -------------------------

#: Experts per MoE block and experts each token reads, in the tiny MoE models.
EXPERTS = 4
EXPERTS_PER_TOKEN = 2


def _moe(config_cls_name: str, model_cls_name: str, **sizes):
    def build(layers: int = LAYERS, seed: int = 0, experts_implementation: str | None = None,
              **extra) -> torch.nn.Module:
        import transformers

        quiet_transformers()
        if experts_implementation is not None:
            extra["experts_implementation"] = experts_implementation
        config = getattr(transformers, config_cls_name)(
            vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            bos_token_id=0, eos_token_id=1, pad_token_id=None, tie_word_embeddings=False,
            attn_implementation="sdpa", num_experts_per_tok=EXPERTS_PER_TOKEN,
            **sizes, **extra)
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = getattr(transformers, model_cls_name)(config).eval()
        # routers start at zero in some families (ties everywhere): random routing instead
        with torch.no_grad():
            for path, param in model.named_parameters():
                if path.endswith("mlp.gate.weight"):
                    param.normal_(0.0, 0.5)
        return model

    return build


@dataclasses.dataclass(frozen=True)
class MoEModel:
    """A tiny mixture-of-experts family and the paths of one layer's MoE block."""

    name: str
    build: Callable[..., torch.nn.Module]
    #: (path suffix under ``model.layers.i.mlp``, role) of the block's projections
    block: tuple[tuple[str, str], ...]

    def block_paths(self, i: int) -> dict[str, str]:
        return {f"model.layers.{i}.mlp.{suffix}": role for suffix, role in self.block}


_EXPERT_ROLES = (("gate", "router"), ("experts.gate_up_proj", "gate_up"),
                 ("experts.down_proj", "down"))

MOE_MODELS = {
    "mixtral": MoEModel("mixtral", _moe("MixtralConfig", "MixtralForCausalLM",
                                        intermediate_size=64, num_local_experts=EXPERTS),
                        _EXPERT_ROLES),
    "qwen2_moe": MoEModel(
        "qwen2_moe", _moe("Qwen2MoeConfig", "Qwen2MoeForCausalLM", intermediate_size=64,
                          moe_intermediate_size=32, shared_expert_intermediate_size=64,
                          num_experts=EXPERTS),
        (*_EXPERT_ROLES, ("shared_expert_gate", "router"), ("shared_expert.gate_proj", "gate"),
         ("shared_expert.up_proj", "up"), ("shared_expert.down_proj", "down"))),
    "qwen3_moe": MoEModel("qwen3_moe", _moe("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                                            intermediate_size=64, moe_intermediate_size=32,
                                            num_experts=EXPERTS, head_dim=8),
                          _EXPERT_ROLES),
}


def build_bert_mlm(layers: int = LAYERS, seed: int = 0) -> torch.nn.Module:
    """BERT for masked LM: its head is ``cls.predictions.decoder``, tied to the embeddings."""
    import transformers

    quiet_transformers()
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=layers,
                                     num_attention_heads=4, intermediate_size=64,
                                     max_position_embeddings=64, attn_implementation="sdpa")
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.BertForMaskedLM(config).eval()


def build_t5(layers: int = LAYERS, seed: int = 0) -> torch.nn.Module:
    """T5 (encoder-decoder): its head is ``lm_head``, tied to ``shared`` by default."""
    import transformers

    quiet_transformers()
    config = transformers.T5Config(vocab_size=VOCAB, d_model=HIDDEN, d_ff=64, d_kv=8,
                                   num_layers=layers, num_heads=4, decoder_start_token_id=0,
                                   pad_token_id=0, eos_token_id=1)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.T5ForConditionalGeneration(config).eval()
