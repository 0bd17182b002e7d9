"""The role of a projection (q, k, v, o, gate, up, down, head, ...) from its module path.

Roles name what a projection does in a transformer block. They are read off the last
components of the ``named_modules()`` path, using the naming conventions of the common model
families; a path no convention covers has the role ``other``. Roles are descriptive (reports,
per-role statistics); which projections are sparsified is decided by the configuration's globs.
"""

from __future__ import annotations

__all__ = ["ROLES", "role_of"]

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
_ROLE_OF = {name: role for role, names in ROLES.items() for name in names}
_ATTENTION_PARENTS = ("attn", "attention", "self_attn", "self_attention", "attn_layer")


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
