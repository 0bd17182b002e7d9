"""Module paths of projections (as ``named_modules`` spells them) and their roles."""

from __future__ import annotations

import re

import torch.fx

# Dynamo names the compiled root ``L['self']``, or ``L['fn']`` when the root is a torch.nn
# module such as ``nn.Sequential`` (it traces the module's ``__call__``).
_PREFIXES = ("L['self'].", "L['self']", "L['fn'].", "L['fn']", "L__self__.", "L__self___",
             "self.")
_INDEX = re.compile(r"\[['\"]?([^'\"\]]+)['\"]?\]")

#: Last path component -> role, for the naming conventions of common model families.
_ROLES = {
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
_ROLE_OF = {name: role for role, names in _ROLES.items() for name in names}
_ATTENTION_PARENTS = ("attn", "attention", "self_attn", "self_attention", "attn_layer")


def normalise_path(raw: str) -> str:
    """``L['self'].model.layers[0].q_proj`` or ``model.layers.0.q_proj`` -> the latter."""
    path = raw
    for prefix in _PREFIXES:
        if path.startswith(prefix):
            path = path[len(prefix):]
            break
    path = _INDEX.sub(lambda m: "." + m.group(1), path)
    return path.strip(".").replace("..", ".")


def stack_path(node: torch.fx.Node) -> str | None:
    """The innermost module that called ``node``, from the trace's ``nn_module_stack``."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    raw, _module_type = list(stack.values())[-1]
    return normalise_path(str(raw))


def projection_path(node: torch.fx.Node, weight_name: str | None) -> str:
    """The path globs are matched against.

    The calling module's path comes first: a tied head (``lm_head`` reading the embedding's
    weight) must still be called ``lm_head``. A bare parameter used by a custom module
    (``self.w1`` in ``blocks.0``) is named by the parameter (``blocks.0.w1``), so two
    projections in one module stay distinguishable.
    """
    module = stack_path(node)
    weight = normalise_path(weight_name) if weight_name else None
    if module is None:
        if weight is None:
            return node.name
        return weight[: -len(".weight")] if weight.endswith(".weight") else weight
    # the root module has path "" (export records it; Dynamo leaves it out of the stack)
    inside = weight is not None and (module == "" or weight.startswith(module + "."))
    if inside and weight != (f"{module}.weight" if module else "weight"):
        return weight
    return module


def role_of(path: str) -> str:
    """q / k / v / qkv / o / gate / up / gate_up / down / head when recognisable, else ``other``."""
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
