"""Projection paths do not depend on how a model is compiled (or on the library's version).

For every way of compiling a model — ``torch.compile(model)``, ``torch.compile(model.forward)``,
a compiled function or a method that calls the model, a wrapper module holding it, a model
wrapped by ``DistributedDataParallel`` (either order with ``torch.compile``) and
``sparsify_exported`` — overrides anchored at the root (``"model.layers.0.*": None``) and one
exact path at 0.8 must give the outputs of the reference model under the same plan, and the
report must name the projections as ``named_modules()`` does. Paths come from parameter
identity, never from Dynamo's source names (which transformers 5.24 changed: ``L['args'][0]``).
"""

from __future__ import annotations

import contextlib
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
from hf_models import HF_MODELS, Logits, token_ids
from torch.nn.parallel import DistributedDataParallel

import qsparse_compile as qc
from qsparse_compile.modules import projection_modules
from qsparse_compile.reference import reference_model

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

MODELS = ["llama", "gpt2", "qwen2"]
FIRST_LAYER = {"llama": "model.layers.0", "qwen2": "model.layers.0", "gpt2": "transformer.h.0"}
EXACT = {"llama": "model.layers.1.mlp.down_proj", "qwen2": "model.layers.1.self_attn.q_proj",
         "gpt2": "transformer.h.1.mlp.c_fc"}


def _options(name: str, prefix: str = "") -> dict:
    return {"sparsity": 0.4, "overrides": {f"{prefix}{FIRST_LAYER[name]}.*": None,
                                           f"{prefix}{EXACT[name]}": 0.8}}


class Runner:
    """Not a module: its method calls the model."""

    def __init__(self, model):
        self.model = model

    def logits(self, ids):
        return self.model(ids, use_cache=False).logits


@contextlib.contextmanager
def _process_group():
    """A one-rank gloo group on 127.0.0.1 (DDP needs one; 2-rank runs are issue 16's)."""
    if dist.is_initialized():
        yield
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                            world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _compiled_logits(way: str, model, ids, options):
    """(logits, report) of ``model`` compiled the way ``way`` says; paths are the model's
    except for the wrapper ways, whose root is the wrapper."""
    opts = {**options, "inner": "eager"}
    if way == "module":
        compiled = torch.compile(model, backend="qsparse", options=opts)
        return compiled(ids, use_cache=False).logits, qc.report(compiled)
    if way == "forward":
        compiled = torch.compile(model.forward, backend="qsparse", options=opts)
        return compiled(ids, use_cache=False).logits, qc.report(compiled)
    if way == "function":
        compiled = torch.compile(lambda t: model(t, use_cache=False).logits,
                                 backend="qsparse", options=opts)
        return compiled(ids), qc.report(compiled)
    if way == "method":
        compiled = torch.compile(Runner(model).logits, backend="qsparse", options=opts)
        return compiled(ids), qc.report(compiled)
    if way == "wrapper":
        compiled = torch.compile(Logits(model), backend="qsparse", options=opts)
        return compiled(ids), qc.report(compiled)
    if way == "ddp-then-compile":
        ddp = DistributedDataParallel(model)
        compiled = torch.compile(ddp, backend="qsparse", options=opts)
        return compiled(ids, use_cache=False).logits, qc.report(compiled)
    if way == "compile-then-ddp":
        inner = torch.compile(model, backend="qsparse", options=opts)
        ddp = DistributedDataParallel(inner)
        return ddp(ids, use_cache=False).logits, qc.report(inner)
    if way == "export":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ep = torch.export.export(Logits(model), (ids,), strict=False)
        options = {k: v for k, v in opts.items() if k != "inner"}
        return qc.sparsify_exported(ep, **options).module()(ids), qc.report(ep, **options)
    raise AssertionError(way)


WAYS = ["module", "forward", "function", "method", "wrapper", "ddp-then-compile",
        "compile-then-ddp", "export"]
WRAPPED = {"wrapper", "export"}  # the root is Logits(model): paths start with "inner."


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("name", MODELS)
def test_anchored_overrides_apply_however_the_model_is_compiled(name, way):
    model = HF_MODELS[name].build()
    ids = token_ids()
    prefix = "inner." if way in WRAPPED else ""
    options = _options(name, prefix)
    root = Logits(model) if way in WRAPPED else model
    group = _process_group() if "ddp" in way else contextlib.nullcontext()
    with group, torch.no_grad():
        out, rep = _compiled_logits(way, model, ids, options)
        with reference_model(root, **options):
            expected = model(ids, use_cache=False).logits
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # the comparison is not vacuous: the first layer dense, the exact path at 0.8
    paths = [p.path for p in projection_modules(root)]
    assert [r["path"] for r in rep] == paths
    by_path = {r["path"]: r for r in rep}
    for path in paths:
        if path.startswith(prefix + FIRST_LAYER[name] + "."):
            assert by_path[path]["method"] == "dense"
    assert by_path[prefix + EXACT[name]]["sparsity"] == 0.8
    assert by_path[prefix + ("lm_head")]["method"] == "dense"
    assert rep.totals["sparsified"] == len(paths) - 1 - HF_MODELS[name].per_layer
