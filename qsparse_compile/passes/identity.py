"""The module a compiled graph belongs to, and its parameters' names, found by identity.

A projection's path is the ``named_modules()`` name of the module that owns its weight,
relative to the module being compiled. Dynamo's graphs do not say which module that is in any
stable way (its source names changed with transformers 5.24: ``L['args'][0]`` instead of
``L['self']``), so nothing here reads them. Instead:

1. **The compiled callable.** ``torch.compile(obj)`` wraps ``obj`` in a function that holds
   it; while a compiled call runs, that wrapper's frame is on the Python stack. The wrapper's
   code object and the free variable holding the callable are learnt once from a probe
   (``torch.compile(probe)``), not from names in PyTorch's source, and the outermost such frame
   gives what the user compiled, whatever frame Dynamo is compiling (graph breaks, resumed
   frames, pieces split by DDP).
2. **The root namespace.** A module (``torch.compile(model)``), or a method bound to one
   (``model.forward``, ``model._call_impl`` for ``model.compile()``), is the root. A plain
   function or a method of another object is named by the modules it reads: its closure, the
   globals its code names, its defaults, its object's attributes and its call's arguments. The
   ones that hold the graph's parameters become the root (if one contains the others, that
   one; several unrelated ones keep their variable names as the first path component).
   ``DistributedDataParallel`` (``.module``) and a compiled module (``._orig_mod``) are
   looked through: they add no name.
3. **Names by tensor identity.** Every parameter and buffer reachable from the root is named
   by its path, ``named_parameters()`` style, all aliases kept (a tied weight has two names).
"""

from __future__ import annotations

import builtins
import dataclasses
import functools
import inspect
import types
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..modules import projection_layout

__all__ = ["ParameterNames", "TensorName", "compiled_call", "compiled_module", "real_inputs",
           "roots_for", "unwrap"]


@dataclasses.dataclass(frozen=True)
class TensorName:
    """One name of a parameter or buffer: ``<owner_path>.<attr>`` (``owner`` is None for a
    parameter a compiled function reads directly, named by its variable)."""

    owner: nn.Module | None
    owner_path: str
    attr: str

    @property
    def name(self) -> str:
        return f"{self.owner_path}.{self.attr}" if self.owner_path else self.attr


def unwrap(module: nn.Module) -> nn.Module:
    """``module`` without the wrappers that add no name: DDP's ``module`` and a compiled
    module's original (``torch.compile(model)`` returns a wrapper holding ``model``)."""
    from torch.nn.parallel import DistributedDataParallel

    while True:
        if isinstance(module, DistributedDataParallel):
            module = module.module
            continue
        inner = getattr(module, "_orig_mod", None)
        if isinstance(inner, nn.Module) and _is_compiled_module(module):
            module = inner
            continue
        return module


def _is_compiled_module(module: nn.Module) -> bool:
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except ImportError:  # pragma: no cover - every supported torch has it
        return False
    return isinstance(module, OptimizedModule)


def _walk(module: nn.Module, prefix: str, stack: tuple[int, ...]
          ) -> Iterator[tuple[str, nn.Module]]:
    """``(path, module)`` for ``module`` and every submodule, wrappers looked through,
    modules shared at several paths visited at each (cycles cut)."""
    module = unwrap(module)
    if id(module) in stack:
        return
    yield prefix, module
    for name, child in module.named_children():
        yield from _walk(child, f"{prefix}.{name}" if prefix else name, (*stack, id(module)))


class ParameterNames:
    """Names of the parameters and buffers under a root namespace, by tensor identity.

    ``roots`` maps a path prefix to a module: ``{"": model}`` for one root (paths exactly as
    ``model.named_modules()`` gives them), or several prefixes for a function reading several
    unrelated modules; a prefix may also map to a bare parameter the function reads.
    """

    def __init__(self, roots: Mapping[str, nn.Module | torch.Tensor]):
        self.roots = {prefix: unwrap(m) if isinstance(m, nn.Module) else m
                      for prefix, m in roots.items()}
        self._names: dict[int, list[TensorName]] = {}
        self._tensors: dict[int, torch.Tensor] = {}  # keeps each named tensor, by identity
        self._modules: dict[int, nn.Module] = {}
        for prefix, root in self.roots.items():
            if isinstance(root, torch.Tensor):
                self._names.setdefault(id(root), []).append(TensorName(None, "", prefix))
                self._tensors[id(root)] = root
                continue
            for path, module in _walk(root, prefix, ()):
                self._modules[id(module)] = module
                members = [*module.named_parameters(recurse=False),
                           *module.named_buffers(recurse=False)]
                for attr, tensor in members:
                    if tensor is not None:
                        self._names.setdefault(id(tensor), []).append(
                            TensorName(module, path, attr))
                        self._tensors[id(tensor)] = tensor

    def names_of(self, tensor: object) -> list[TensorName]:
        """Every name of ``tensor`` under the roots (empty: not a parameter or buffer)."""
        return list(self._names.get(id(tensor), ())) if isinstance(tensor, torch.Tensor) \
            else []

    def alias(self, tensor: torch.Tensor, same_as: torch.Tensor) -> None:
        """Name ``tensor`` as ``same_as`` is named: a DTensor parameter's local shard, which
        the localised graph of a tensor-parallel program reads in its place."""
        self._names[id(tensor)] = list(self._names.get(id(same_as), ()))

    def __contains__(self, tensor: object) -> bool:
        return bool(self.names_of(tensor))

    def name(self, tensor: torch.Tensor) -> str:
        """The preferred name: that of a projection module owning it (a tied head's weight is
        ``lm_head.weight``, not the embedding's), else the first in module order."""
        return self._preferred(tensor).name

    def projection_path(self, tensor: torch.Tensor) -> str:
        """The path of the projection whose weight ``tensor`` is: its owner's path when the
        attribute is ``weight`` (an ``nn.Linear``), else the parameter's own name (a bare
        parameter used functionally, e.g. ``blocks.0.w1``)."""
        chosen = self._preferred(tensor)
        if chosen.owner is None:  # a bare parameter a function reads: its variable's name
            return chosen.name
        return chosen.owner_path if chosen.attr == "weight" else chosen.name

    def projection_paths(self, tensor: torch.Tensor) -> list[str]:
        """Every projection path ``tensor`` has: more than one for a weight shared by several
        projection modules (tied), the preferred first."""
        chosen = self.projection_path(tensor)
        others = [n.owner_path for n in self.names_of(tensor)
                  if n.attr == "weight" and n.owner is not None and projection_layout(n.owner)]
        return list(dict.fromkeys([chosen, *others]))

    def matrix_paths(self) -> list[str]:
        """The projection path of every 2-D parameter or buffer under the roots, in module
        order: a product reading one as its weight is a projection of that path, also where no
        projection module owns it (a fixed matrix multiplied functionally, e.g. a rotation
        buffer ``layers.1.basis_change.change``, is named by itself). An embedding's table
        is not among them (it is looked up, not multiplied; a head tied to it is named by the
        head's module)."""
        return list(dict.fromkeys(
            self.projection_path(t) for key, t in self._tensors.items() if t.dim() == 2
            and not all(isinstance(n.owner, nn.Embedding) for n in self._names[key])))

    def is_projection_weight(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` is the weight of a projection module (``nn.Linear``, ``Conv1D``)."""
        return any(n.attr == "weight" and n.owner is not None and projection_layout(n.owner)
                   for n in self.names_of(tensor))

    def _preferred(self, tensor: torch.Tensor) -> TensorName:
        names = self.names_of(tensor)
        if not names:
            raise KeyError("ParameterNames: the tensor is not a parameter or buffer of the "
                           f"compiled root(s) {sorted(self.roots) or ['']}")
        owned = [n for n in names if n.attr == "weight" and n.owner is not None
                 and projection_layout(n.owner)]
        return (owned or names)[0]

    def contains_module(self, module: nn.Module) -> bool:
        return id(unwrap(module)) in self._modules


# --- the compiled callable, from the stack ------------------------------------------------


@functools.cache
def _wrapper_signature() -> tuple[types.CodeType, str] | None:
    """(code object of torch.compile's wrapper, free variable holding the callable), learnt
    from a probe; None if this PyTorch builds its wrapper differently."""
    def probe() -> None:
        return None

    wrapper = torch.compile(probe, backend="eager")
    code = getattr(wrapper, "__code__", None)
    for var, cell in zip(getattr(code, "co_freevars", ()), wrapper.__closure__ or (),
                         strict=False):
        try:
            if cell.cell_contents is probe:
                return code, var
        except ValueError:  # an empty cell
            continue
    return None


@dataclasses.dataclass(frozen=True)
class CompiledCall:
    """The callable passed to ``torch.compile`` and the arguments of the running call."""

    callable: Any
    args: tuple
    kwargs: dict


def compiled_call() -> CompiledCall | None:
    """The outermost ``torch.compile``'d call on the stack, or None outside one."""
    signature = _wrapper_signature()
    if signature is None:
        return None
    code, var = signature
    outer = None
    frame = inspect.currentframe()
    while frame is not None:
        if frame.f_code is code:
            outer = frame
        frame = frame.f_back
    if outer is None:
        return None
    local = outer.f_locals  # a snapshot: free variables and the wrapper's *args / **kwargs
    del outer, frame  # frames are not kept alive past this call
    rest = code.co_varnames[code.co_argcount + code.co_kwonlyargcount:]
    has_args = bool(code.co_flags & inspect.CO_VARARGS)
    has_kwargs = bool(code.co_flags & inspect.CO_VARKEYWORDS)
    args = local.get(rest[0], ()) if has_args and rest else ()
    kw_index = 1 if has_args else 0
    kwargs = local.get(rest[kw_index], {}) if has_kwargs and len(rest) > kw_index else {}
    return CompiledCall(local.get(var), tuple(args), dict(kwargs))


def compiled_module() -> nn.Module | None:
    """The outermost compiled module (what ``torch.compile(module)`` returned) being called on
    the stack, or None: a frame of its ``__call__``, whose first argument is the module."""
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except ImportError:  # pragma: no cover - every supported torch has it
        return None
    codes = {OptimizedModule.__call__.__code__, nn.Module.__call__.__code__}
    outer = None
    frame = inspect.currentframe()
    while frame is not None:
        if frame.f_code in codes and frame.f_code.co_argcount:
            first = frame.f_locals.get(frame.f_code.co_varnames[0])
            if isinstance(first, OptimizedModule):
                outer = first
        frame = frame.f_back
    del frame
    return outer


def _referenced_modules(fn: Any) -> Iterator[tuple[str, Any]]:
    """``(name, value)`` of what a function reads: closure cells, globals named by its code
    (nested code included), defaults."""
    code = getattr(fn, "__code__", None)
    closure = getattr(fn, "__closure__", None) or ()
    if code is not None:
        for var, cell in zip(code.co_freevars, closure, strict=False):
            try:
                yield var, cell.cell_contents
            except ValueError:
                continue
        scope = getattr(fn, "__globals__", {})
        for name in _global_names(code):
            if name in scope:
                yield name, scope[name]
            elif hasattr(builtins, name):
                continue
    for i, value in enumerate(getattr(fn, "__defaults__", None) or ()):
        yield f"default{i}", value
    for name, value in (getattr(fn, "__kwdefaults__", None) or {}).items():
        yield name, value


def _global_names(code: types.CodeType) -> Iterator[str]:
    yield from code.co_names
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _global_names(const)


def _bound_arguments(fn: Any, args: tuple, kwargs: dict) -> Iterator[tuple[str, Any]]:
    try:
        bound = inspect.signature(fn).bind_partial(*args, **kwargs)
    except (TypeError, ValueError):
        yield from ((f"arg{i}", a) for i, a in enumerate(args))
        yield from kwargs.items()
        return
    for name, value in bound.arguments.items():
        if isinstance(value, tuple):
            yield from ((f"{name}{i}", v) for i, v in enumerate(value))
        elif isinstance(value, dict):
            yield from value.items()
        else:
            yield name, value


def _attributes(obj: Any) -> Iterator[tuple[str, Any]]:
    """An object's instance attributes (none for objects without a ``__dict__``)."""
    yield from getattr(obj, "__dict__", {}).items()


def _candidates(fn: Any, args: tuple, kwargs: dict) -> dict[str, nn.Module | nn.Parameter]:
    """Modules (and bare parameters) a non-module callable reads, by the name it reads them
    under."""
    out: dict[str, nn.Module | nn.Parameter] = {}

    def add(items: Iterable[tuple[str, Any]]) -> None:
        for name, value in items:
            if isinstance(value, (nn.Module, nn.Parameter)) and name not in out:
                out[name] = value

    seen: set[int] = set()
    target = fn
    while True:  # look through partials and decorators
        if id(target) in seen:
            break
        seen.add(id(target))
        if isinstance(target, functools.partial):
            add(_bound_arguments(target.func, target.args, target.keywords))
            target = target.func
            continue
        wrapped = getattr(target, "__wrapped__", None)
        if wrapped is not None and not isinstance(target, nn.Module):
            add(_referenced_modules(target))
            target = wrapped
            continue
        break
    if inspect.ismethod(target):
        add(_attributes(target.__self__))
        add(_referenced_modules(target.__func__))
    elif inspect.isfunction(target):
        add(_referenced_modules(target))
    elif callable(target):  # a callable object
        add(_attributes(target))
        add(_referenced_modules(type(target).__call__))
    add(_bound_arguments(target, args, kwargs))
    return out


def _tensors_read(call: CompiledCall) -> Iterator[torch.Tensor]:
    """Every parameter and buffer of what the compiled callable reads (see :func:`roots_for`)."""
    fn = call.callable
    owner = getattr(fn, "__self__", None)
    if isinstance(fn, nn.Module):
        values: list[Any] = [fn]
    elif inspect.ismethod(fn) and isinstance(owner, nn.Module):
        values = [owner]
    else:
        values = list(_candidates(fn, call.args, call.kwargs).values())
    for value in values:
        if isinstance(value, torch.Tensor):
            yield value
        else:
            yield from unwrap(value).parameters()
            yield from unwrap(value).buffers()


def real_inputs(call: CompiledCall | None, example_inputs: Sequence[object]) -> list[object]:
    """``example_inputs`` with each fake tensor that stands for a parameter or buffer of what
    ``call`` reads replaced by that real tensor; other inputs as they are.

    A backend is usually handed the real parameters, but DDP's graph splitting
    (``optimize_ddp``) compiles each piece of a graph on fake copies of its inputs, made with
    the fake tensor mode's ``from_tensor``. That method returns the one fake it made earlier for
    a given real tensor, so asking it for the fake of each parameter finds which input stands for
    which parameter, by identity, with no graph metadata read.
    """
    from torch._subclasses.fake_tensor import FakeTensor

    modes = {id(x.fake_mode): x.fake_mode for x in example_inputs if isinstance(x, FakeTensor)}
    if call is None or not modes:
        return list(example_inputs)
    wanted = {id(x) for x in example_inputs if isinstance(x, FakeTensor)}
    real: dict[int, torch.Tensor] = {}
    for tensor in {id(t): t for t in _tensors_read(call)}.values():
        if isinstance(tensor, FakeTensor):
            continue
        for mode in modes.values():
            fake = mode.from_tensor(tensor, static_shapes=True)
            if id(fake) in wanted:
                real[id(fake)] = tensor
        if len(real) == len(wanted):
            break
    return [real.get(id(x), x) for x in example_inputs]


def roots_for(call: CompiledCall | None, tensors: Iterable[torch.Tensor]
              ) -> dict[str, nn.Module | torch.Tensor]:
    """The root namespace of a graph whose inputs include ``tensors``.

    Empty when there is no compiled call on the stack, or nothing it reads holds them.
    """
    if call is None:
        return {}
    fn = call.callable
    if isinstance(fn, nn.Module):
        return {"": fn}
    owner = getattr(fn, "__self__", None)
    if inspect.ismethod(fn) and isinstance(owner, nn.Module):
        return {"": owner}
    wanted = {id(t) for t in tensors}
    holding: dict[str, tuple[nn.Module, set[int]]] = {}
    loose: dict[str, torch.Tensor] = {}
    for name, value in _candidates(fn, call.args, call.kwargs).items():
        if isinstance(value, torch.Tensor):
            if id(value) in wanted:
                loose[name] = value
            continue
        owned = {id(t) for _, m in _walk(value, "", ()) for t in
                 (*m.parameters(recurse=False), *m.buffers(recurse=False))}
        if owned & wanted:
            holding[name] = (unwrap(value), owned)
    # a candidate inside another one adds nothing: keep the outermost
    outer = {name: (m, owned) for name, (m, owned) in holding.items()
             if not any(other is not m and owned < other_owned
                        for other, other_owned in holding.values())}
    unique: dict[int, tuple[str, nn.Module]] = {}
    for name, (module, _) in outer.items():
        unique.setdefault(id(module), (name, module))
    owned_by_modules = set().union(*(owned for _, owned in outer.values())) if outer else set()
    loose = {name: t for name, t in loose.items() if id(t) not in owned_by_modules}
    if len(unique) == 1 and not loose:
        return {"": next(iter(unique.values()))[1]}
    return {**{name: module for name, module in unique.values()}, **loose}
