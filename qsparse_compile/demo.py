"""The main job: sparsify a small Llama-style model with the ``qsparse`` backend, offline.

Builds :class:`TinyLlama`, compiles it with ``torch.compile(backend="qsparse")``, prints the
per-projection report, checks the compiled logits against the eager reference model and prints
the fraction of projection weights a token activates.
"""

from __future__ import annotations

import time

import torch

from .config import QSparseConfig
from .reference import reference_model
from .report import report


def run_demo(sparsity: float = 0.4, inner: str = "inductor", seq_len: int = 32,
             seed: int = 0) -> dict:
    """Run the demo and return its figures (also printed)."""
    from .research.models import TinyLlama, TinyLlamaConfig

    config = QSparseConfig(sparsity=sparsity)
    torch.manual_seed(seed)
    model = TinyLlama(TinyLlamaConfig()).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, seq_len))
    print(f"model: TinyLlama, {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{model.config.num_layers} layers; input {tuple(ids.shape)}")
    print(f"compiling with backend='qsparse', sparsity={sparsity}, inner={inner!r} ...")

    compiled = torch.compile(model, backend="qsparse",
                             options={**config.to_dict(), "inner": inner})
    start = time.perf_counter()
    with torch.no_grad():
        logits = compiled(ids)
    print(f"compiled and ran in {time.perf_counter() - start:.1f} s\n")
    rep = report(compiled)
    print(rep)

    with torch.no_grad(), reference_model(model, config):
        expected = model(ids)
    with torch.no_grad():
        dense = model(ids)
    err = (logits - expected).abs().max().item()
    moved = (dense - expected).abs().max().item()
    ok = torch.allclose(logits, expected, atol=1e-4, rtol=1e-4)
    print(f"\ncompiled vs eager reference: max |diff| = {err:.2e} "
          f"({'OK' if ok else 'MISMATCH'}); sparse vs dense logits differ by up to {moved:.3f}")
    fraction = rep.totals["activated_fraction"]
    print(f"activated projection parameters per token: {100 * fraction:.1f}% "
          f"({rep.totals['activated_params']:,} of {rep.totals['params']:,})")
    if not ok:
        raise SystemExit("demo: the compiled model does not match the eager reference")
    return {"max_abs_diff": err, "activated_fraction": fraction, "report": rep.to_dict()}
