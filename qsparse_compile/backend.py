"""The ``qsparse`` torch.compile backend.

``torch.compile(model, backend="qsparse", options={...})`` works without importing this package:
the backend is registered through the ``torch_dynamo_backends`` entry point. For each graph
Dynamo captures, the backend

1. reads the options once (:class:`~qsparse_compile.options.CompileOptions`);
2. finds what was compiled and names its parameters by identity (:mod:`.passes.identity`):
   projection paths are ``named_modules()`` names, never Dynamo's source names;
3. traces the graph to normalised pre-dispatch ATen (:mod:`.passes.normalise`);
4. runs the passes (:class:`~qsparse_compile.passes.PassManager`): rewrite, share, fuse, and on
   inference graphs the device lowerings, whose prepared weights join the graph as extra
   inputs the returned callable supplies (:mod:`.passes.constants`);
5. hands the graph to the inner compiler: Inductor's ``compile_fx`` (AOTAutograd, so training
   works through the ops' straight-through gradients; training graphs on the Triton path get
   a post-grad pass that retargets them to the kernels), or ``inner="eager"`` to run it as is.
   With ``cudagraphs=True`` (or ``mode="reduce-overhead"``) Inductor captures the graph in CUDA
   graphs; the graph's parameters, static buffers (a static KV cache) and prepared weights
   are marked as inputs at fixed addresses, as Dynamo marks them, so the graphs read them in
   place rather than copying them into the graph's memory at every replay.

What each graph's passes did is kept with the compiled object (:mod:`.compile_records`) and
by a :class:`Backend` object when one is passed instead of the name.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.fx

from .compile_records import compiled_key, remember
from .config import QSparseConfig
from .glob_check import check_globs
from .modules import all_projections
from .options import CompileOptions
from .passes import GraphResult, PassManager, WeightTable
from .passes.constants import ExtraInputs
from .passes.identity import (
    ParameterNames,
    compiled_call,
    compiled_module,
    real_inputs,
    roots_for,
)
from .passes.manager import RootProjection
from .passes.normalise import normalise
from .passes.subgraphs import unrewritten_weights
from .passes.tensor_parallel import LocalProgram, dtensor_inputs, localise, row_shards
from .rotations import as_rotations

__all__ = ["Backend", "compile_graph", "qsparse_backend"]


def _unnamed_parameters(example_inputs: list, names: ParameterNames) -> int:
    return sum(isinstance(x, torch.nn.Parameter) and x not in names for x in example_inputs)


def _root_projections(names: ParameterNames) -> list[RootProjection]:
    """Every projection of the compiled root(s), paths as the records name them."""
    out = []
    for prefix, root in names.roots.items():
        if not isinstance(root, torch.nn.Module):
            continue
        for p in all_projections(root):
            path = f"{prefix}.{p.path}" if prefix and p.path else prefix or p.path
            out.append(RootProjection(path, p.in_features, p.out_features, p.experts,
                                      p.experts_per_token))
    return out


def _compiles_a_module(call: Any) -> bool:
    """Whether what was compiled is a module (``torch.compile(module)``, ``module.compile()``)
    or one of its methods (``torch.compile(module.forward)``), not a free function."""
    fn = getattr(call, "callable", None)
    return compiled_module() is not None or isinstance(fn, torch.nn.Module) or isinstance(
        getattr(fn, "__self__", None), torch.nn.Module)


def _check_globs(options: CompileOptions, names: ParameterNames,
                 projections: list[RootProjection]) -> None:
    """Warn (``strict``: raise) about override / exclusion globs no projection of the compiled
    root(s) matches: a setting that silently does not apply."""
    paths = [p.path for p in projections]
    paths += [prefix for prefix, root in names.roots.items() if isinstance(root, torch.Tensor)]
    # a product may read any 2-D parameter or buffer as its weight (a fixed rotation buffer
    # multiplied functionally): its path is one the globs may name too
    paths = list(dict.fromkeys([*paths, *names.matrix_paths()]))
    if paths:
        kinds = sorted({type(r).__name__ for r in names.roots.values()})
        check_globs(options.config, paths, where=f"backend 'qsparse' ({', '.join(kinds)})")


def _warn_unrewritten(graph: torch.fx.GraphModule, weights: WeightTable,
                      names: ParameterNames, result: GraphResult) -> None:
    """Warn about every projection module whose weight the graph reads but no pass saw."""
    found = {p for r in result.records for p in (r.path, *r.projection.aliases)}
    missed = unrewritten_weights(graph, weights, names.is_projection_weight, found)
    if missed:
        warnings.warn(
            f"qsparse: {len(missed)} projection module(s) of the compiled model are read by "
            f"this graph in a form the passes do not rewrite (a higher-order op or product "
            f"they do not take), so they stay dense: {', '.join(missed[:8])}"
            f"{' ...' if len(missed) > 8 else ''}", stacklevel=3)


def _localise_tensor_parallel(gm: torch.fx.GraphModule, example_inputs: list,
                              named_inputs: list, names: ParameterNames,
                              options: CompileOptions) -> tuple[LocalProgram, list, dict]:
    """A tensor-parallel graph (DTensor inputs) over each rank's shards; also the local
    inputs to name its weights by (each shard named as its DTensor) and the row-parallel
    projections. Training graphs and options without semantics here are refused."""
    found = dtensor_inputs(named_inputs)
    named = [names.name(x) for x in found if x in names]
    which = f" ({', '.join(named[:4])}{' ...' if len(named) > 4 else ''})" if named else ""
    from torch.distributed.fsdp import FSDPModule

    if any(isinstance(m, FSDPModule) for root in names.roots.values()
           if isinstance(root, torch.nn.Module) for m in root.modules()):
        raise NotImplementedError(
            f"qsparse: {len(found)} input(s) of this graph are DTensors{which} of a model "
            f"under fully_shard: a model compiled after fully_shard reads its sharded "
            f"parameters, which is not supported; compile each block first, then fully_shard "
            f"(torchtitan's order)")
    if torch.is_grad_enabled():
        raise NotImplementedError(
            f"qsparse: {len(found)} input(s) of this graph are DTensors{which}: "
            f"tensor-parallel training is not supported yet (inference is, under "
            f"torch.no_grad / inference_mode). Data parallelism is: DDP in either order, and "
            f"FSDP2 with each block compiled before fully_shard")
    if options.config.quant == "bitnet" or options.calibration is not None:
        raise NotImplementedError(
            f"qsparse: tensor-parallel program{which}: quant='bitnet' (one scale per whole "
            f"weight) and 'calibration' (rotations of whole rows) are not supported under "
            f"tensor parallelism yet")
    shards = row_shards(named_inputs, names)
    program = localise(gm, example_inputs)
    # each shard is named as its DTensor (and is the tensor the compiled program is first
    # called with, so weights prepared from it are not remade)
    local_named = []
    for x, local in zip(named_inputs, program.inputs, strict=True):
        if x is not local:
            names.alias(local, x)
        local_named.append(local)
    return program, local_named, shards


def compile_graph(gm: torch.fx.GraphModule, example_inputs: list, options: CompileOptions,
                  results: list[GraphResult] | None = None, *,
                  check_globs: bool = True) -> Callable:
    """Rewrite and compile one Dynamo graph under ``options``; the backend's body.

    ``results`` (a :class:`Backend`'s list) also receives the graph's :class:`GraphResult`;
    ``check_globs=False`` skips the unmatched-glob check (made already, before compiling).
    """
    call = compiled_call()
    # the real parameters behind fake stand-ins (DDP's graph pieces): names and prepared
    # weights come from them; Inductor still compiles on the inputs it was given
    named_inputs = real_inputs(call, example_inputs)
    tensors = [x for x in named_inputs if isinstance(x, torch.Tensor)]
    roots = roots_for(call, tensors)
    names = ParameterNames(roots)
    program = shards = None
    if dtensor_inputs(named_inputs):
        program, named_inputs, shards = _localise_tensor_parallel(
            gm, example_inputs, named_inputs, names, options)
        gm, example_inputs = program.graph, program.inputs
    unnamed = _unnamed_parameters(named_inputs, names)
    if unnamed:
        warnings.warn(
            f"qsparse: {unnamed} parameter(s) of this graph belong to no module the compiled "
            f"callable reads (compiled: {type(getattr(call, 'callable', None)).__name__}); the "
            f"projections reading them are left dense, since their paths are unknown",
            stacklevel=2)
    projections = _root_projections(names)
    if check_globs:
        _check_globs(options, names, projections)
    graph = normalise(gm, example_inputs)
    weights = WeightTable.for_dynamo(graph, named_inputs, names, row_shards=shards)
    constants = ExtraInputs(graph, example_inputs)
    inference = not torch.is_grad_enabled()
    rotations = None if options.calibration is None else as_rotations(
        options.calibration, "option 'calibration'")
    result = PassManager(options, rotations).run(graph, weights, constants, inference)
    result.constants = constants.by_name()
    if _compiles_a_module(call):
        # a compiled function may read part of a model only: its other projections are not
        # missing from its graphs
        result.model_projections = tuple(projections)
    _warn_unrewritten(graph, weights, names, result)
    if results is not None:
        results.append(result)
    if call is not None:
        # kept for what torch.compile returned (each compilation its own records) when that
        # is a module, else for the compiled callable
        module = compiled_module()
        # what the passes did, without the graph and the prepared weights: a model's records
        # must not hold copies of its weights
        remember([compiled_key(call.callable) if module is None else module],
                 dataclasses.replace(result, graph=None, constants={}))
    inputs = [*example_inputs, *constants.values]
    if options.cudagraphs:
        _mark_static_inputs(graph, gm, set(constants.names))
    wrap = program.wrap if program is not None else (lambda f: f)
    if options.inner == "eager":
        return wrap(constants.bind(graph.forward))
    from torch._inductor.compile_fx import compile_fx

    # Inductor keeps intermediate values in fp32 where eager rounds them to bf16/fp16; a value
    # that feeds a top-K selection must be the one eager computes, or near-ties at the cut
    # flip (the selection is exact only given equal inputs). Scoped to this graph.
    patches: dict[str, Any] = {"emulate_precision_casts": True}
    if result.triton is not None and not inference:
        from .passes.post_grad import triton_post_grad_pass

        patches["post_grad_custom_post_pass"] = triton_post_grad_pass()
    patches.update(options.inductor_patches())
    return wrap(constants.bind(compile_fx(graph, inputs, config_patches=patches)))


def _mark_static_inputs(graph: torch.fx.GraphModule, gm: torch.fx.GraphModule,
                        constants: set[str]) -> None:
    """Carry Dynamo's input metadata over to the normalised graph, for CUDA graphs.

    AOTAutograd tells Inductor which inputs keep their address between calls (parameters,
    ``mark_static_address``'d buffers such as a static KV cache) from the metadata Dynamo puts
    on its graph and placeholders; the normalised graph is a new module without it, so every
    input, weights included, would be copied into the CUDA graph's memory at each replay (and a
    mutated cache would make Inductor skip the capture). The prepared constants are fixed as
    well: they are remade, at a new address, only when their source weights change, and a new
    address makes the CUDA graph re-record.
    """
    own = [n for n in graph.graph.nodes if n.op == "placeholder" and n.name not in constants]
    extra = [n for n in graph.graph.nodes if n.op == "placeholder" and n.name in constants]
    theirs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    lifted = [*graph.named_parameters(remove_duplicate=False),
              *graph.named_buffers(remove_duplicate=False)]
    if "dynamo_compile_id" not in gm.meta or len(own) != len(theirs) or lifted:
        warnings.warn("qsparse: cudagraphs: this graph's inputs cannot be matched with "
                      "Dynamo's, so CUDA graphs will copy every input (weights included) "
                      "at each replay", stacklevel=3)
        return
    graph.meta["dynamo_compile_id"] = gm.meta["dynamo_compile_id"]
    graph._param_name_to_source = {}
    for ours, dynamo in zip(own, theirs, strict=True):
        ours._dynamo_source = getattr(dynamo, "_dynamo_source", None)
        if "tensor_dict" in dynamo.meta:
            ours.meta["tensor_dict"] = dynamo.meta["tensor_dict"]
    for node in extra:
        node._dynamo_source = None
        node.meta["tensor_dict"] = {"_dynamo_static_input_type": "unguarded"}


#: ``torch.compile`` modes the backend takes (``mode`` and ``options`` exclude each other
#: there): ``"reduce-overhead"`` is the ``cudagraphs`` option.
MODES = ("default", "reduce-overhead")


def _apply_mode(options: CompileOptions, kwargs: Mapping[str, Any]) -> CompileOptions:
    mode = kwargs.get("mode")
    if mode in (None, "default"):
        return options
    if mode == "reduce-overhead":
        return dataclasses.replace(options, cudagraphs=True)
    raise ValueError(f"backend 'qsparse': mode={mode!r} is not supported; allowed: "
                     f"{', '.join(map(repr, MODES))} (CUDA graphs with other settings: "
                     f"options={{'cudagraphs': True, ...}})")


def qsparse_backend(gm: torch.fx.GraphModule, example_inputs: list,
                    options: CompileOptions | QSparseConfig | Mapping[str, Any] | None = None,
                    **kwargs: Any) -> Callable:
    """Dynamo backend: sparsify every projection of ``gm``, then compile it.

    ``torch.compile(..., mode="reduce-overhead")`` (without ``options``: torch refuses both)
    compiles with the default options and ``cudagraphs=True``.
    """
    return compile_graph(gm, example_inputs, _apply_mode(CompileOptions.parse(options), kwargs))


class Backend:
    """The backend as an object that keeps what it did, for ``torch.compile(backend=...)``.

    ``Backend(sparsity=0.4)`` (or ``Backend({...})``, the options of ``backend="qsparse"``)
    validates the options at once; :attr:`results` lists one :class:`GraphResult` per graph
    compiled with it, oldest first::

        backend = qsparse_compile.Backend(sparsity=0.5, inner="eager")
        compiled = torch.compile(model, backend=backend)
        compiled(ids)
        print(qsparse_compile.report(backend))
    """

    def __init__(self, options: CompileOptions | QSparseConfig | Mapping[str, Any] | None = None,
                 **more: Any):
        self.options = CompileOptions.parse(options, **more)
        self.results: list[GraphResult] = []
        #: whether each graph checks the override / exclusion globs against the compiled
        #: model (``compile_model`` checks them once, before compiling, and turns this off)
        self.check_globs = True

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list, **kwargs: Any
                 ) -> Callable:
        return compile_graph(gm, example_inputs, _apply_mode(self.options, kwargs),
                             self.results, check_globs=self.check_globs)

    def __repr__(self) -> str:
        shown = {k: (type(v).__name__ if k == "calibration" and v is not None
                     and not isinstance(v, str) else v)
                 for k, v in self.options.to_dict().items()}
        return f"Backend({shown!r}, graphs={len(self.results)})"
