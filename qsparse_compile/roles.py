"""The role of a projection (q, k, v, o, gate, up, down, head, router, ...).

One function decides a projection's role given the model: :func:`projection_roles` reads the
model's structure once and returns a :class:`ProjectionRoles`, whose :meth:`~ProjectionRoles.role`
every tool asks (the compiler's records, the reference, ``report``, sparsity measurement,
calibration). In order:

1. **router**: a projection scoring the experts of a mixture-of-experts block
   (:func:`qsparse_compile.modules.moe_blocks`: owned by the block or one of its children other
   than the experts, ``num_experts`` outputs, or 1 for a shared expert's gate);
2. an **expert weight** (3-D, one matrix per expert): its role from its name
   (``gate_up_proj`` -> ``gate_up``, ``down_proj`` -> ``down``);
3. **head**: the model's output embeddings (``get_output_embeddings()`` of any module of the
   tree that has it), or a projection whose weight is the weight of an ``nn.Embedding`` (tied);
4. otherwise the role is read off the last components of the path (:func:`role_of`), using
   the naming conventions of the common model families (``lm_head`` is a head by name too);
   a path no convention covers has the role ``other``.

Where no module is known (a ``torch.export`` program) the structure comes from the
parameters' qualified names and shapes (:func:`roles_from_parameters`), and the compiler adds
one rule of the graph: the projection producing the graph's output (up to views, casts and
scaling) with as many outputs as an embedding the graph looks up has rows is the head.

Roles are descriptive (reports, per-role statistics) and decide one thing: the configuration's
``dense_roles`` (default ``("head", "router")``) leaves those projections dense.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence

from torch import nn

from .modules import moe_blocks, projection_layout

__all__ = ["NAMES_ONLY", "ExpertCount", "ProjectionRoles", "ROLES", "ROLE_NAMES",
           "projection_roles", "role_of", "roles_from_parameters"]

#: Last path component -> role, for the naming conventions of common model families.
ROLES: dict[str, tuple[str, ...]] = {
    "q": ("q_proj", "query", "wq", "q", "to_q"),
    "k": ("k_proj", "key", "wk", "k", "to_k"),
    "v": ("v_proj", "value", "wv", "v", "to_v"),
    "qkv": ("c_attn", "qkv_proj", "query_key_value", "wqkv", "qkv", "Wqkv"),
    "o": ("o_proj", "out_proj", "wo", "to_out", "attn_out"),
    "gate": ("gate_proj", "w1", "gate"),
    "up": ("up_proj", "w3", "c_fc", "fc1", "fc_in", "up"),
    "gate_up": ("gate_up_proj",),
    "down": ("down_proj", "w2", "fc2", "fc_out", "down"),
    "head": ("lm_head", "embed_out", "output_layer"),
}
#: Every role a projection can have (structural ones included).
ROLE_NAMES = (*ROLES, "router", "other")

_ROLE_OF = {name: role for role, names in ROLES.items() for name in names}
_ATTENTION_PARENTS = ("attn", "attention", "self_attn", "self_attention", "attn_layer")


def role_of(path: str) -> str:
    """The role read off the path's names alone: q / k / v / qkv / o / gate / up / gate_up /
    down / head when recognisable, else ``other`` (the fallback of :class:`ProjectionRoles`)."""
    parts = path.split(".")
    leaf = parts[-1]
    parent = parts[-2] if len(parts) > 1 else ""
    if leaf in ("c_proj", "dense", "proj"):
        # GPT-2 / BERT reuse one name for attention-out and MLP-down: the parent decides
        # (BERT: attention.output.dense is attention-out, intermediate.dense is MLP-up).
        grandparent = parts[-3] if len(parts) > 2 else ""
        if parent in _ATTENTION_PARENTS or (
                parent == "output" and grandparent in _ATTENTION_PARENTS):
            return "o"
        if parent == "intermediate":
            return "up"
        if parent in ("mlp", "ffn", "feed_forward", "output"):
            return "down"
        return "other"
    return _ROLE_OF.get(leaf, "other")


@dataclasses.dataclass(frozen=True)
class ExpertCount:
    """An expert weight holds ``num_experts`` matrices ``[out_features, in_features]`` each;
    each token reads ``experts_per_token`` of them (None: the model does not say). ``block``
    is the path of its mixture-of-experts block."""

    num_experts: int
    experts_per_token: int | None
    block: str = ""
    in_features: int = 0
    out_features: int = 0


class ProjectionRoles:
    """The roles of a model's projections: structural ones by path, names as the fallback.

    ``routers`` maps each router's path to its block's; ``structural`` says whether a module
    tree was read (False for roles from parameter names and shapes only, where the compiler
    adds the graph's rule for the head).
    """

    def __init__(self, heads: Iterable[str] = (), routers: Mapping[str, str] | None = None,
                 experts: Mapping[str, ExpertCount] | None = None, structural: bool = True):
        self.heads = frozenset(heads)
        self.routers = dict(routers or {})
        self.experts = dict(experts or {})
        self.structural = structural

    def role(self, path: str) -> str:
        """The role of the projection at ``path`` (see the module docstring for the order)."""
        if path in self.routers:
            return "router"
        if path in self.experts:
            return role_of(path)
        if path in self.heads:
            return "head"
        return role_of(path)

    def expert_count(self, path: str) -> ExpertCount | None:
        """How many experts the weight at ``path`` holds, None for an ordinary projection."""
        return self.experts.get(path)

    def block_experts(self, block: str) -> dict[str, ExpertCount]:
        """The expert weights of the block at path ``block``, by path."""
        return {p: c for p, c in self.experts.items() if c.block == block}

    @classmethod
    def merged(cls, parts: Sequence[ProjectionRoles]) -> ProjectionRoles:
        """The roles of several roots together (a compiled function reading several modules)."""
        return cls(heads=[h for p in parts for h in p.heads],
                   routers={k: v for p in parts for k, v in p.routers.items()},
                   experts={k: v for p in parts for k, v in p.experts.items()},
                   structural=any(p.structural for p in parts) if parts else False)

    def __repr__(self) -> str:
        return (f"ProjectionRoles(heads={sorted(self.heads)}, routers={sorted(self.routers)}, "
                f"experts={sorted(self.experts)})")


#: Roles of an unknown model: names only.
NAMES_ONLY = ProjectionRoles(structural=False)


def _join(prefix: str, path: str) -> str:
    return f"{prefix}.{path}" if prefix and path else prefix or path


def _module_paths(root: nn.Module) -> dict[int, list[str]]:
    """Every path of every module (a module shared at several paths has several)."""
    paths: dict[int, list[str]] = {}
    for path, module in root.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(path)
    return paths


def _head_paths(root: nn.Module) -> set[str]:
    """The output embeddings of every module that declares them, and projections tied to an
    ``nn.Embedding``'s weight."""
    paths = _module_paths(root)
    heads: set[str] = set()
    for module in root.modules():
        getter = getattr(module, "get_output_embeddings", None)
        if not callable(getter):
            continue
        try:
            out = getter()
        except (AttributeError, NotImplementedError, TypeError):
            continue  # a model class that declares the method without a head
        if isinstance(out, nn.Module):
            heads.update(paths.get(id(out), ()))
    embedded = {id(m.weight) for m in root.modules() if isinstance(m, nn.Embedding)}
    for path, module in root.named_modules(remove_duplicate=False):
        if projection_layout(module) is not None and id(module.weight) in embedded:
            heads.add(path)
    return heads


def projection_roles(root: nn.Module | None, prefix: str = "") -> ProjectionRoles:
    """The roles of every projection under ``root`` (paths relative to it, after ``prefix``).

    None: no module is known, the roles are read off names (:func:`role_of`).
    """
    if root is None:
        return NAMES_ONLY
    routers: dict[str, str] = {}
    experts: dict[str, ExpertCount] = {}
    for block in moe_blocks(root):
        at = _join(prefix, block.path)
        routers.update({_join(prefix, r.path): at for r in block.routers})
        for weight in block.weights:
            experts[_join(prefix, weight.path)] = ExpertCount(
                block.num_experts, block.experts_per_token, at, weight.in_features,
                weight.out_features)
    heads = {_join(prefix, p) for p in _head_paths(root)}
    return ProjectionRoles(heads, routers, experts)


def roles_from_parameters(shapes: Mapping[str, Sequence[int]],
                          experts_per_token: int | None = None) -> ProjectionRoles:
    """The roles parameter names and shapes alone tell (a ``torch.export`` program's state
    dict), by the rules of :func:`qsparse_compile.modules.moe_blocks`: a 3-D parameter
    ``<block>.<experts>.<name>`` ``[E, a, b]`` is an expert weight when ``<block>`` (or a
    child of it) also holds a 2-D ``weight`` with ``E`` rows: the router."""
    owners: dict[str, dict[str, Sequence[int]]] = {}
    for name, shape in shapes.items():
        owner, _, attr = name.rpartition(".")
        owners.setdefault(owner, {})[attr] = tuple(shape)
    routers: dict[str, str] = {}
    experts: dict[str, ExpertCount] = {}
    for owner, params in owners.items():
        three = {a: s for a, s in params.items() if len(s) == 3}
        if not three or len({s[0] for s in three.values()}) != 1 or next(
                iter(three.values()))[0] < 2 or not owner:
            continue
        num_experts = next(iter(three.values()))[0]
        block = owner.rpartition(".")[0]
        candidates = []
        for other, other_params in owners.items():
            weight = other_params.get("weight")
            if other == owner or weight is None or len(weight) != 2:
                continue
            if other.rpartition(".")[0] == block and weight[0] in (num_experts, 1):
                candidates.append((other, weight[0]))
        if not any(rows == num_experts for _, rows in candidates):
            continue
        routers.update({path: block for path, _ in candidates})
        # [E, out, in]: Hugging Face's default layout (names and shapes cannot tell more)
        experts.update({_join(owner, a): ExpertCount(num_experts, experts_per_token, block,
                                                     s[2], s[1]) for a, s in three.items()})
    return ProjectionRoles((), routers, experts, structural=False)

