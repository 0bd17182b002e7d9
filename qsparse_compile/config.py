"""The user-facing configuration: which projections are sparsified, and how.

`QSparseConfig` is validated on construction, so a bad option fails where it is given (in
`torch.compile(..., options=...)` that is at compile time) with a message that names the option,
the value given and what is allowed. The same options are accepted as a plain dict
(`QSparseConfig.from_options`), because that is what `torch.compile` hands a backend.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Mapping
from typing import Any

METHODS = ("topk", "block", "relu")
RESCALES = ("none", "l2")
QUANTS = (None, "int8", "bitnet")
#: Weight formats at inference (DESIGN.md point 10); None keeps the model's own dtype.
WEIGHT_FORMATS = (None, "int8", "int4")
#: Top-K of a row-parallel projection, whose input is sharded across ranks (DESIGN.md point 11).
TENSOR_PARALLEL_MODES = ("exact", "per_shard")

#: Globs excluded by default: none. The output head stays dense by default (DESIGN.md point 8)
#: through its role (:data:`DEFAULT_DENSE_ROLES`), found by what it is rather than by its name;
#: the name is kept importable for the tools that compare against it.
DEFAULT_EXCLUDE: tuple[str, ...] = ()

#: Roles left untouched by default: the output head and MoE routers (:mod:`qsparse_compile.roles`).
DEFAULT_DENSE_ROLES = ("head", "router")

_WILDCARDS = frozenset("*?[")


def check_sparsity(value: Any, where: str) -> float:
    """Validate one sparsity value: a real number in ``[0, 1)``; return it as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"{where}: sparsity must be a number in [0, 1) (or None for dense), "
            f"got {value!r} of type {type(value).__name__}"
        )
    s = float(value)
    if not (0.0 <= s < 1.0) or math.isnan(s):
        raise ValueError(
            f"{where}: sparsity must be in [0, 1) (the fraction of activations zeroed; "
            f"0 leaves the projection dense), got {value!r}"
        )
    return s


def check_block(value: Any, where: str) -> tuple[int, int]:
    """Validate an N:M block pattern: two integers with ``1 <= n <= m``."""
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise TypeError(f"{where}: block must be a pair of integers (n, m), got {value!r}")
    n, m = value
    if not 1 <= n <= m:
        raise ValueError(
            f"{where}: block (n, m) must satisfy 1 <= n <= m (keep n of every m), got ({n}, {m})"
        )
    return (n, m)


def topk_count(dim: int, sparsity: float) -> int:
    """Number of entries kept per row: ``max(1, round((1 - s) * D))`` (DESIGN.md point 1)."""
    return max(1, round((1.0 - sparsity) * dim))


@dataclasses.dataclass(frozen=True)
class ProjectionPlan:
    """What happens to one projection's input, after globs and exclusions are resolved.

    ``method`` is ``None`` when the input is not sparsified; ``sparsity`` is the requested
    fraction (top-K) or ``1 - n/m`` (block). ``quant`` is the quantization applied to this
    projection (``None``, ``"int8"`` or ``"bitnet"``): it is independent of the sparsity, so a
    projection at sparsity 0 is still quantized; only an exclusion leaves it untouched.
    ``weights`` is the weight format (``None``, ``"int8"``, ``"int4"``): the product reads the
    format's dequantised values (DESIGN.md point 10), whatever the sparsity.
    """

    method: str | None
    sparsity: float | None
    block: tuple[int, int] | None
    quant: str | None = None
    weights: str | None = None

    @property
    def sparse(self) -> bool:
        """Whether the input is sparsified (top-K, N:M or ReLU)."""
        return self.method is not None

    @property
    def dense(self) -> bool:
        """Whether the projection is left exactly as it was: no sparsity, no quantization,
        no weight format."""
        return self.method is None and self.quant is None and self.weights is None

    def without_sparsity(self) -> ProjectionPlan:
        """The same plan with the sparsity dropped (its quantization and weights kept)."""
        return ProjectionPlan(None, None, None, self.quant, self.weights)


@dataclasses.dataclass(frozen=True)
class QSparseConfig:
    """How to sparsify the inputs of a model's linear projections.

    Args:
        sparsity: fraction of each projection input zeroed, in ``[0, 1)``; 0 leaves it dense.
            With ``method="block"`` the fraction is ``1 - n/m``; giving a different explicit
            value is an error (it would be silently ignored otherwise).
        overrides: per-projection sparsity by glob over module paths, e.g.
            ``{"*.mlp.down_proj": 0.6, "*.layers.0.*": None}``; ``None`` leaves it dense.
            The last matching glob wins.
        method: ``"topk"`` (per-row top-K by magnitude), ``"block"`` (N:M inside groups), or
            ``"relu"``: the ReLU-sparsity baseline the paper compares against (``relu(x)``;
            its sparsity depends on the data, so no sparsity value may be given).
        block: ``(n, m)`` for ``method="block"``: keep ``n`` of every ``m`` consecutive entries.
        rescale: ``"none"`` or ``"l2"`` (keep each row's L2 norm after masking).
        quant: ``None``, ``"int8"`` (per-row absmax activations) or ``"bitnet"`` (int8
            activations and ternary absmean weights). Applies to every projection that is not
            excluded, whatever its sparsity (0 included): ``sparsity=0, quant="bitnet"`` is
            dense BitNet b1.58.
        weights: weight format at inference, ``None`` (the model's dtype), ``"int8"`` (one
            scale per output channel) or ``"int4"`` (a scale and a minimum per output channel
            and group of 32 input features, GGUF Q4_1's grouping), DESIGN.md point 10. Applies
            to every projection the configuration governs, whatever its sparsity; the products
            read the dequantised values, and the CPU decode kernels read the packed weights.
            Not with ``quant="bitnet"``, whose weights are ternary (stored packed at inference).
        head_weights: the weight format of the output head (role ``"head"``), which
            ``dense_roles`` otherwise leaves untouched: its input stays dense, its weight takes
            this format; a head the configuration sparsifies (``dense_roles=()``, or an
            override naming it) takes this format instead of ``weights``. Default None.
        ste: straight-through gradient (True) or the masked-gradient ablation (False).
        exclude: globs of module paths left untouched (neither sparsified nor quantized);
            default: none. Exclusion wins over everything else.
        dense_roles: roles (:mod:`qsparse_compile.roles`) whose projections are left untouched
            like exclusions; default ``("head", "router")``: the output head (the model's
            output embeddings, a projection tied to an embedding, or the projection producing
            the graph's output) and MoE routers stay dense. ``()`` treats them like every
            other projection. An ``overrides`` key that names a projection's path literally
            (no ``*``, ``?`` or ``[``) wins over its role, e.g. ``{"lm_head": 0.3}``; a
            wildcard glob such as ``"*": 0.5`` does not reach a dense role.
        strict: raise instead of warning when a projection cannot take the configuration
            (for example an input width that is not a multiple of ``m``).
        relu2_glu: replace the gate activation of GLU feed-forwards (``act(gate(x)) * up(x)``
            with SiLU/GELU) by the squared ReLU, ``relu(gate(x))**2`` (DESIGN.md point 9):
            for training from scratch; pretrained models keep their activation.
        tensor_parallel: top-K of a row-parallel projection under tensor parallelism, whose
            input row is sharded across the ranks (DESIGN.md point 11): ``"exact"`` (default)
            keeps the row's global top-K, the ranks agreeing on the k-th magnitude with one
            all-gather per row, so results equal one device's; ``"per_shard"`` keeps
            ``max(1, round(k * D_shard / D))`` of each shard with no communication, which is
            another model. No effect without tensor parallelism.
    """

    sparsity: float | None = None
    overrides: Mapping[str, float | None] = dataclasses.field(default_factory=dict)
    method: str = "topk"
    block: tuple[int, int] | None = None
    rescale: str = "none"
    quant: str | None = None
    weights: str | None = None
    head_weights: str | None = None
    ste: bool = True
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    dense_roles: tuple[str, ...] = DEFAULT_DENSE_ROLES
    strict: bool = False
    relu2_glu: bool = False
    tensor_parallel: str = "exact"

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen dataclass: normalise fields once, here
        if self.method not in METHODS:
            raise ValueError(
                f"option 'method': got {self.method!r}, allowed: {', '.join(map(repr, METHODS))}"
            )
        if self.rescale not in RESCALES:
            raise ValueError(
                f"option 'rescale': got {self.rescale!r}, allowed: "
                f"{', '.join(map(repr, RESCALES))}"
            )
        if self.quant not in QUANTS:
            raise ValueError(
                f"option 'quant': got {self.quant!r}, allowed: {', '.join(map(repr, QUANTS))}"
            )
        if self.tensor_parallel not in TENSOR_PARALLEL_MODES:
            raise ValueError(
                f"option 'tensor_parallel': got {self.tensor_parallel!r}, allowed: "
                f"{', '.join(map(repr, TENSOR_PARALLEL_MODES))}"
            )
        for name in ("weights", "head_weights"):
            if getattr(self, name) not in WEIGHT_FORMATS:
                raise ValueError(
                    f"option {name!r}: got {getattr(self, name)!r}, allowed: "
                    f"{', '.join(map(repr, WEIGHT_FORMATS))}"
                )
        if self.weights is not None and self.quant == "bitnet":
            raise ValueError(
                f"option 'weights': got {self.weights!r} with quant='bitnet', whose weights are "
                f"ternary already (stored packed at inference); leave 'weights' out"
            )
        for name in ("ste", "strict", "relu2_glu"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(
                    f"option {name!r}: must be True or False, got {getattr(self, name)!r}"
                )
        if self.method == "block":
            block = check_block(
                self.block if self.block is not None else (16, 32), "option 'block'"
            )
            set_(self, "block", block)
            implied = 1.0 - block[0] / block[1]
            if self.sparsity is not None:
                given = check_sparsity(self.sparsity, "option 'sparsity'")
                if given != 0.0 and not math.isclose(given, implied, abs_tol=1e-9):
                    raise ValueError(
                        f"option 'sparsity': got {self.sparsity!r} with method='block' and "
                        f"block={block}, which zeroes {implied:g}; give sparsity={implied:g}, "
                        f"0 (dense), or leave it out"
                    )
                set_(self, "sparsity", given)
            else:
                set_(self, "sparsity", implied)
        elif self.method == "relu":
            if self.block is not None or self.sparsity not in (None, 0, 0.0):
                raise ValueError(
                    f"option 'sparsity'/'block': got sparsity={self.sparsity!r}, "
                    f"block={self.block!r} with method='relu', whose sparsity is whatever "
                    f"the data gives; leave both out (or sparsity=0 for dense)"
                )
            if self.sparsity is not None:
                set_(self, "sparsity", 0.0)
        else:
            if self.block is not None:
                raise ValueError(
                    f"option 'block': got {self.block!r} with method='topk'; "
                    f"block applies only with method='block'"
                )
            sparsity = 0.5 if self.sparsity is None else self.sparsity
            set_(self, "sparsity", check_sparsity(sparsity, "option 'sparsity'"))
        if not isinstance(self.overrides, Mapping):
            raise TypeError(
                f"option 'overrides': must be a mapping of module-path glob -> sparsity "
                f"(or None), got {self.overrides!r}"
            )
        overrides: dict[str, float | None] = {}
        for glob, value in self.overrides.items():
            if not isinstance(glob, str):
                raise TypeError(f"option 'overrides': keys must be glob strings, got {glob!r}")
            where = f"option 'overrides'[{glob!r}]"
            if value is None:
                overrides[glob] = None
                continue
            if self.method == "relu" and value != 0:
                raise ValueError(f"{where}: got {value!r} with method='relu'; allowed: "
                                 f"0 or None (dense)")
            s = check_sparsity(value, where)
            if self.method == "block" and s != 0.0:
                implied = 1.0 - self.block[0] / self.block[1]
                if not math.isclose(s, implied, abs_tol=1e-9):
                    raise ValueError(
                        f"{where}: got {value!r} with method='block' and block={self.block}; "
                        f"allowed: {implied:g}, 0 or None (dense)"
                    )
            overrides[glob] = s
        set_(self, "overrides", overrides)
        exclude = (self.exclude,) if isinstance(self.exclude, str) else self.exclude
        if not all(isinstance(g, str) for g in exclude):
            raise TypeError(f"option 'exclude': must be glob strings, got {self.exclude!r}")
        set_(self, "exclude", tuple(exclude))
        set_(self, "dense_roles", _checked_roles(self.dense_roles))

    @classmethod
    def from_options(cls, options: QSparseConfig | Mapping[str, Any] | None = None,
                     **kwargs: Any) -> QSparseConfig:
        """Build a config from a config, a plain dict (as ``torch.compile`` passes), or kwargs.

        Unknown option names raise ``ValueError`` listing the allowed ones.
        """
        if isinstance(options, QSparseConfig):
            if kwargs:
                return dataclasses.replace(options, **_checked_names(kwargs))
            return options
        merged: dict[str, Any] = dict(options or {})
        merged.update(kwargs)
        return cls(**_checked_names(merged))

    def plan_for(self, path: str, role: str | None = None) -> ProjectionPlan:
        """Resolve the configuration for the projection at module path ``path``.

        ``role`` is the projection's role as :func:`qsparse_compile.roles.projection_roles`
        decides it from the model's structure; None reads it off the path's name
        (:func:`qsparse_compile.roles.role_of`), so ``lm_head`` is a head either way.
        Precedence: ``exclude``, then an override naming ``path`` literally, then
        ``dense_roles``, then the last matching override glob, then ``sparsity``.
        """
        if self.excludes(path):
            return ProjectionPlan(None, None, None)  # excluded: untouched, not even quantized
        if self.dense_role(path, role):
            # a dense role: untouched, like exclusion; the head may still take a weight format
            head = self.head_weights if self._role(path, role) == "head" else None
            return ProjectionPlan(None, None, None, None, head)
        q, w = self.quant, self.weights
        if self.head_weights is not None and self._role(path, role) == "head":
            w = self.head_weights  # the head's own format, sparsified or not
        matched = [v for glob, v in self.overrides.items() if fnmatch.fnmatchcase(path, glob)]
        sparsity = matched[-1] if matched else self.sparsity  # the last matching glob wins
        if self.method == "relu":
            # no sparsity value to resolve: on unless the global option or an override is 0/None
            off = (matched and not matched[-1]) or (not matched and self.sparsity == 0.0)
            return ProjectionPlan(None, None, None, q, w) if off else ProjectionPlan(
                "relu", None, None, q, w)
        if sparsity is None or sparsity == 0.0:
            return ProjectionPlan(None, None, None, q, w)
        if self.method == "block":
            n, m = self.block
            return ProjectionPlan("block", 1.0 - n / m, self.block, q, w)
        return ProjectionPlan("topk", sparsity, None, q, w)

    def excludes(self, path: str) -> bool:
        """Whether an ``exclude`` glob matches ``path``."""
        return any(fnmatch.fnmatchcase(path, glob) for glob in self.exclude)

    def dense_role(self, path: str, role: str | None = None) -> bool:
        """Whether ``path`` stays dense for its role (``dense_roles``), no override naming it
        literally. ``role`` None: read off the name, as in :meth:`plan_for`."""
        if not self.dense_roles:
            return False
        if self._role(path, role) not in self.dense_roles:
            return False
        return not any(glob == path and not _WILDCARDS & set(glob) for glob in self.overrides)

    @staticmethod
    def _role(path: str, role: str | None) -> str:
        """``role``, or (None) the role read off the path's name."""
        if role is not None:
            return role
        from .roles import role_of  # same layer; imported here to keep config importable alone

        return role_of(path)

    def governs(self, path: str, role: str | None = None) -> bool:
        """Whether the configuration acts on ``path`` at all (not excluded, not a dense role):
        what sparsity statistics average over."""
        return not self.excludes(path) and not self.dense_role(path, role)

    def to_dict(self) -> dict[str, Any]:
        """The options as a plain, JSON-serialisable dict (round-trips through from_options)."""
        d = dataclasses.asdict(self)
        d["overrides"] = dict(self.overrides)
        d["exclude"] = list(self.exclude)
        d["dense_roles"] = list(self.dense_roles)
        d["block"] = list(self.block) if self.block is not None else None
        return d


OPTION_NAMES = tuple(f.name for f in dataclasses.fields(QSparseConfig))


def _checked_roles(value: Any) -> tuple[str, ...]:
    """``dense_roles``: role names (a string is one role), each one :data:`roles.ROLE_NAMES` has."""
    from .roles import ROLE_NAMES

    roles = (value,) if isinstance(value, str) else value
    if not isinstance(roles, (tuple, list)) or not all(isinstance(r, str) for r in roles):
        raise TypeError(f"option 'dense_roles': must be a tuple of role names, got {value!r}")
    unknown = [r for r in roles if r not in ROLE_NAMES]
    if unknown:
        raise ValueError(f"option 'dense_roles': unknown role(s) {', '.join(map(repr, unknown))}; "
                         f"allowed: {', '.join(ROLE_NAMES)}")
    return tuple(dict.fromkeys(roles))


def _checked_names(options: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(OPTION_NAMES)}"
        )
    return dict(options)
