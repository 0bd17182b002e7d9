"""The pieces of ``benchmarks/decode_divergence.py`` on a tiny Llama: the per-selection cut
gaps it records and the per-step hidden states it compares."""

from __future__ import annotations

import pytest
import torch
from decode_divergence import cut_gaps, hidden_states
from hf_models import HF_MODELS

from qsparse_compile.config import topk_count

pytestmark = pytest.mark.hf


def test_cut_gaps_and_hidden_states():
    model = HF_MODELS["llama"].build(layers=2)
    prompt, feed = torch.tensor([[3, 5, 7]]), torch.tensor([9, 11])
    gaps, rounding, handles = cut_gaps(model, 0.5, "int8")
    seen = {}
    layer = model.model.layers[1]
    hook = layer.mlp.down_proj.register_forward_pre_hook(
        lambda module, args: seen.setdefault("down", []).append(args[0][0, -1].clone()))
    states = hidden_states(model.forward, model, prompt, feed, steps=2, cache_len=8)
    hook.remove()
    for handle in handles:
        handle.remove()
    assert sorted(gaps) == sorted(f"{i}.{r}" for i in range(2)
                                  for r in ("q/k/v", "o", "gate/up", "down"))
    assert all(len(v) == 3 for v in gaps.values())  # the prefill and two steps
    x = seen["down"][1].abs().double()
    k = topk_count(x.numel(), 0.5)
    top = x.sort(descending=True).values
    assert gaps["1.down"][1] == pytest.approx(float((top[k - 1] - top[k]) / top[k - 1]))
    q = 127.0 * seen["down"][1].double()[x >= top[k - 1]] / top[0]
    assert rounding["1.down"][1] == pytest.approx(float((q - q.floor() - 0.5).abs().min()))
    assert 0.0 <= min(min(v) for v in rounding.values()) <= 0.5
    assert len(states) == 2 and states[0].shape == (3, model.config.hidden_size)
    with torch.no_grad():
        again = hidden_states(model.forward, model, prompt, feed, steps=2, cache_len=8)
    assert all(torch.equal(a, b) for a, b in zip(states, again, strict=True))
