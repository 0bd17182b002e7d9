"""Normalise a graph to a few ATen ops before the passes read it.

Dynamo hands a backend its torch-level graph, where one product has many spellings
(``F.linear``, ``x @ W.t()``, ``torch.matmul(x, W.T)``, ``einsum``, methods and operators) and
every op several names (``operator.mul``, ``torch.mul``, ``"mul"``). The passes never look at
that graph. They read its **pre-dispatch ATen** form, traced with ``make_fx(pre_dispatch=True)``
on the graph's fake inputs: the level ``torch.export`` programs are at, above autograd (so the
``qsparse`` ops inserted there are differentiated through their own straight-through
formulas) and with in-place ops kept as they are (a static KV cache's ``index_copy_``).

On top of that trace, the composite ops that spell products, casts and reshapes are
decomposed (:data:`DECOMPOSED`), so that every projection is one of ``mm``, ``addmm`` or
``bmm`` on operands reached through view-like ops (``t``, ``transpose``, ``permute``,
``view``, ``_unsafe_view``, ``expand``, ``unsqueeze``, ...), and every cast is ``_to_copy``.
Norms (``rms_norm``, ``layer_norm``) and attention (``scaled_dot_product_attention``) stay
whole: later passes match the former, and decomposing the latter would cost speed.

The bodies of higher-order ops (an activation-checkpointed layer's subgraph) are traced to
the same ATen, and stay bodies of the same ops (:mod:`.subgraphs`).

``torch.export`` programs go through the same trace (:func:`normalise_exported`), so one set
of matchers and patterns serves both entry points.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import warnings
from collections.abc import Sequence

import torch
import torch.fx

from .subgraphs import checkpoint_policies_for_tracing

__all__ = ["CASTS", "DECOMPOSED", "dedupe_views", "has_autocast_region", "normalise",
           "normalise_exported", "output_specs", "trace_normalised"]

aten = torch.ops.aten


#: Composite ops traced through to the ATen ops they are made of (every overload that has a
#: composite implementation).
DECOMPOSED = ("linear", "matmul", "einsum", "bilinear", "tensordot", "to", "type_as", "reshape",
              "flatten", "contiguous", "numpy_T", "mT", "mH", "matrix_H", "adjoint",
              "swapaxes", "swapdims", "movedim")


#: Casts: decomposed to ``_to_copy`` (or nothing, when the dtype is already right) everywhere
#: but in graphs with an autocast region, see :func:`has_autocast_region`.
CASTS = ("to", "type_as")


@functools.cache
def _decomposition_table(keep_casts: bool = False) -> dict[torch._ops.OpOverload, object]:
    table = {}
    composite = torch._C.DispatchKey.CompositeImplicitAutograd
    for name in DECOMPOSED:
        if keep_casts and name in CASTS:
            continue
        packet = getattr(aten, name)
        for overload in packet.overloads():
            op = getattr(packet, overload)
            try:
                if op.has_kernel_for_dispatch_key(composite):
                    table[op] = op.decompose
            except RuntimeError:  # an overload only Python knows (e.g. einsum.sublist)
                continue
    return table


def has_autocast_region(gm: torch.fx.GraphModule, enabled_only: bool = True) -> bool:
    """Whether ``gm`` enters autocast itself (``with torch.autocast(...)`` inside the compiled
    code; Dynamo records the entry as a call of ``torch.amp.autocast_mode._enter_autocast``,
    the only spelling it has).

    In such a region the trace's fake values are those without autocast (its casts happen
    when the graph runs), so a cast like ``y.float()`` of a value autocast makes bf16 would
    look like a no-op and vanish if decomposed at trace time: those graphs keep every cast
    (as ``_to_copy``, :func:`casts_as_copies`). ``enabled_only``: count only regions that turn
    autocast on.
    """
    enter = getattr(torch.amp.autocast_mode, "_enter_autocast", None)
    return enter is not None and any(
        node.op == "call_function" and node.target is enter
        and (not enabled_only or _region_enabled(node))
        for module in gm.modules() if isinstance(module, torch.fx.GraphModule)
        for node in module.graph.nodes)


def _region_enabled(enter: torch.fx.Node) -> bool:
    """Whether an ``_enter_autocast(device, dtype, enabled, cache)`` turns autocast on (a
    region that turns it off, to keep one op in fp32, casts nothing)."""
    enabled = enter.args[2] if len(enter.args) > 2 else enter.kwargs.get("enabled", True)
    return enabled is not False


def trace_normalised(fn, args: Sequence[object], *, keep_casts: bool = False, **_: object
                     ) -> torch.fx.GraphModule:
    """``fn`` traced on ``args`` (fake tensors, or real ones) to normalised pre-dispatch ATen.

    Also the tracer of the fusion patterns (:mod:`.fuse_norm`), so they are written in the
    same dialect as the graphs they match (extra keyword arguments, which some versions of
    the pattern matcher pass, are ignored).
    """
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.traceback import preserve_node_meta

    with preserve_node_meta():
        return make_fx(fn, decomposition_table=_decomposition_table(keep_casts),
                       pre_dispatch=True)(*args)


#: Ops whose result aliases their input: two calls with equal arguments are the same tensor,
#: whatever happens in between (a mutation of the base shows through both).
_ALIASING = (aten.view.default, aten._unsafe_view.default, aten.t.default, aten.transpose.int,
             aten.permute.default, aten.expand.default, aten.unsqueeze.default,
             aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.alias.default,
             aten.slice.Tensor, aten.select.int)


def dedupe_views(graph: torch.fx.Graph) -> int:
    """Merge view nodes that repeat one another (same op, same arguments); return how many.

    A decomposed ``linear`` views its input once per projection, so q, k and v each make
    ``view(h, [B*T, D])``; merged, they read one node, as the module code did.
    """
    from .node_args import freeze

    seen: dict[tuple, torch.fx.Node] = {}
    merged = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _ALIASING:
            continue
        key = (node.target, freeze(node.args), freeze(node.kwargs))
        try:
            hash(key)
        except TypeError:
            continue
        if key in seen:
            node.replace_all_uses_with(seen[key])
            graph.erase_node(node)
            merged += 1
        else:
            seen[key] = node
    return merged


def _fake_inputs(gm: torch.fx.GraphModule, example_inputs: Sequence[object]) -> list[object]:
    """The fake value of each input, in the tracing context's fake mode.

    A real example input is converted with that mode, which returns the fake Dynamo already
    made for it (with its symbolic sizes); a symbolic int keeps the placeholder's value.
    """
    from torch._guards import detect_fake_mode

    fake_mode = detect_fake_mode(example_inputs)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    out = []
    for node, example in zip(placeholders, example_inputs, strict=True):
        if isinstance(example, torch.Tensor) and fake_mode is not None:
            out.append(fake_mode.from_tensor(example))
        else:
            out.append(node.meta.get("example_value", node.meta.get("val", example)))
    return out


def normalise(gm: torch.fx.GraphModule, example_inputs: Sequence[object]
              ) -> torch.fx.GraphModule:
    """The Dynamo graph ``gm`` as normalised pre-dispatch ATen, taking the same inputs.

    The result's placeholders are ``gm``'s, in order; its nodes carry fake values
    (``meta["val"]``) in the tracing context's fake mode.
    """
    from torch._guards import detect_fake_mode

    fakes = _fake_inputs(gm, example_inputs)
    fake_mode = detect_fake_mode([f for f in fakes if isinstance(f, torch.Tensor)])
    with warnings.catch_warnings(), checkpoint_policies_for_tracing(gm) as traced_graphs:
        warnings.simplefilter("ignore", FutureWarning)
        with fake_mode if fake_mode is not None else contextlib.nullcontext():
            # through an interpreter, so every new node keeps its source node's metadata
            # (stack trace, module stack)
            keep_casts = has_autocast_region(gm, enabled_only=False)
            traced = trace_normalised(torch.fx.Interpreter(gm).run, fakes,
                                      keep_casts=keep_casts)
        traced_graphs.append(traced)
    for module in traced.modules():  # the bodies of higher-order ops are traced too
        if isinstance(module, torch.fx.GraphModule):
            if keep_casts:
                casts_as_copies(module.graph)
            dedupe_views(module.graph)
            module.recompile()
    return traced


def casts_as_copies(graph: torch.fx.Graph) -> int:
    """Every kept ``aten.to`` with an explicit dtype becomes ``_to_copy``, the one spelling of a
    cast the passes read (a weight cast ``W.to(x.dtype)`` stays a projection's cast); a copy
    where ``to`` would have returned its input is the same value. Returns how many."""
    from .node_args import arguments

    targets = (aten.to.dtype, aten.to.dtype_layout)
    changed = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in targets:
            continue
        args = arguments(node)
        kwargs = {name: args[name] for name in ("dtype", "layout", "device")
                  if args.get(name) is not None}
        with graph.inserting_before(node):
            copy_node = graph.call_function(aten._to_copy.default, (args["self"],), kwargs)
        copy_node.meta = dict(node.meta)
        node.replace_all_uses_with(copy_node)
        graph.erase_node(node)
        changed += 1
    return changed


def output_specs(gm: torch.fx.GraphModule, specs: list) -> list:
    """``specs`` (a program's output specs) naming ``gm``'s output nodes, by position: passes
    replace nodes, and a program's outputs must name the nodes its graph returns."""
    from torch.export.graph_signature import OutputSpec, TensorArgument

    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    results = torch.utils._pytree.tree_leaves(output.args[0])
    out = []
    for spec, value in zip(specs, results, strict=True):
        arg = spec.arg
        if isinstance(arg, TensorArgument) and isinstance(value, torch.fx.Node):
            arg = TensorArgument(name=value.name)
        out.append(OutputSpec(kind=spec.kind, arg=arg, target=spec.target))
    return out


def normalise_exported(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """A copy of ``ep`` whose graph is traced to the same normalised ATen as :func:`normalise`.

    The signature is kept: placeholders keep their names, and outputs are renamed by position.
    Export's dtype assertions on intermediate values (``_assert_tensor_metadata``) are
    dropped: they check the dtypes of casts the normalised graph spells as ``_to_copy``.
    """
    from torch._guards import detect_fake_mode
    from torch.export.graph_signature import (
        ExportGraphSignature,
        InputSpec,
        TensorArgument,
    )

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ep = copy.deepcopy(ep)
    gm = ep.graph_module
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is aten._assert_tensor_metadata.default:
            gm.graph.erase_node(node)
    gm.recompile()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    fakes = [n.meta.get("val") for n in placeholders]
    fake_mode = detect_fake_mode([f for f in fakes if isinstance(f, torch.Tensor)])
    with fake_mode if fake_mode is not None else contextlib.nullcontext():
        traced = trace_normalised(torch.fx.Interpreter(gm).run, fakes)
    for node in list(traced.graph.nodes):  # the retrace may emit them again for its casts
        if node.op == "call_function" and node.target is aten._assert_tensor_metadata.default:
            traced.graph.erase_node(node)
    dedupe_views(traced.graph)
    new_placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
    for old, new in zip(placeholders, new_placeholders, strict=True):
        new._rename(old.name)  # the namespace picks another name if this one is taken
        new.target = new.name
    traced.recompile()
    specs = output_specs(traced, ep.graph_signature.output_specs)
    inputs = []
    # the placeholders are the input specs, in order
    for spec, node in zip(ep.graph_signature.input_specs, new_placeholders, strict=True):
        arg = TensorArgument(name=node.name) if isinstance(spec.arg, TensorArgument) else spec.arg
        inputs.append(InputSpec(kind=spec.kind, arg=arg, target=spec.target,
                                persistent=spec.persistent))
    signature = ExportGraphSignature(input_specs=inputs, output_specs=specs)
    return torch.export.ExportedProgram(
        root=traced, graph=traced.graph, graph_signature=signature,
        state_dict=ep.state_dict, range_constraints=ep.range_constraints,
        module_call_graph=ep.module_call_graph, example_inputs=ep.example_inputs,
        constants=ep.constants, verifiers=ep.verifiers)
