"""Globs of the configuration that match no projection: found, explained, warned about.

A glob in ``overrides`` or ``exclude`` that matches no module path does nothing, silently: a
typo (``*.down_prj``) or a glob anchored at the root (``layers.0.*`` where the paths are
``model.layers.0....``) leaves the model configured otherwise than the user believes. This
module finds such globs among a model's projection paths, suggests the nearest paths, and warns
(or, with ``strict=True``, raises).

It matches as :meth:`QSparseConfig.plan_for` does (``fnmatch.fnmatchcase``) and depends only on
the configuration and the standard library, so any layer (the backend, the export path, the
command line) can call it with the paths it has.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import warnings
from collections.abc import Iterable, Sequence

from .config import DEFAULT_EXCLUDE, QSparseConfig

__all__ = ["UnmatchedGlob", "UnmatchedGlobWarning", "check_globs", "nearest_paths",
           "unmatched_globs"]

#: How many nearest paths a report names for one glob.
MAX_NEAREST = 3

# difflib's own default: below this similarity a path is no useful suggestion.
_CUTOFF = 0.6


class UnmatchedGlobWarning(UserWarning):
    """A glob of ``overrides`` or ``exclude`` matches none of the model's projection paths."""


@dataclasses.dataclass(frozen=True)
class UnmatchedGlob:
    """One glob that matches no path.

    ``option`` is ``"overrides"`` or ``"exclude"``; ``nearest`` holds up to three paths close to
    the glob, best first (empty when none is close).
    """

    option: str
    glob: str
    nearest: tuple[str, ...]

    def describe(self) -> str:
        """One clause naming the option, the glob and the nearest paths."""
        hint = (f"nearest paths: {', '.join(map(repr, self.nearest))}" if self.nearest
                else "no path is close")
        return f"option {self.option!r} glob {self.glob!r} ({hint})"


def unmatched_globs(config: QSparseConfig, paths: Iterable[str]) -> list[UnmatchedGlob]:
    """Every glob of ``config.overrides`` and ``config.exclude`` that matches none of ``paths``.

    The default exclusion globs (:data:`~qsparse_compile.config.DEFAULT_EXCLUDE`, whatever it
    holds) are never reported, also when the user repeats them beside globs of their own: a
    default written for many model families (the head as ``lm_head`` or ``embed_out``) always
    matches nothing on some model, which is no mistake of the user's. Overrides come first,
    then exclusions, each in the order given.
    """
    paths = list(dict.fromkeys(paths))  # the caller may pass a generator; keep first order
    found = []
    candidates = [("overrides", g) for g in config.overrides]
    candidates += [("exclude", g) for g in config.exclude if g not in DEFAULT_EXCLUDE]
    for option, glob in candidates:
        if not any(fnmatch.fnmatchcase(p, glob) for p in paths):
            found.append(UnmatchedGlob(option, glob, nearest_paths(glob, paths)))
    return found


def nearest_paths(glob: str, paths: Sequence[str], n: int = MAX_NEAREST) -> tuple[str, ...]:
    """Up to ``n`` paths close to ``glob``, best first.

    First the paths that a corrected glob matches, for the usual mistakes: a glob anchored at
    the root that should start with ``*.`` (``layers.0.*`` for ``model.layers.0.mlp.up_proj``),
    and a glob naming a parent module rather than projections (``model.layers.0``, which needs
    ``.*``). Then the paths most similar to the glob as text (difflib), which catches typos.
    """
    out: list[str] = []
    for fixed in _corrected(glob):
        out += [p for p in paths if p not in out and fnmatch.fnmatchcase(p, fixed)][:n - len(out)]
        if len(out) >= n:
            return tuple(out)
    # Sorting on (-score, position) keeps ties (the same projection in every layer) in model
    # order, so the suggestion is layer 0, 1, 2 rather than whatever difflib's heap leaves.
    scored = sorted((-_similarity(glob, p), i) for i, p in enumerate(paths) if p not in out)
    out += [paths[i] for score, i in scored if -score >= _CUTOFF][:n - len(out)]
    return tuple(out)


def check_globs(config: QSparseConfig, paths: Iterable[str], where: str) -> list[UnmatchedGlob]:
    """Warn once (:class:`UnmatchedGlobWarning`) about every glob that matches no path.

    ``where`` names what was configured (a model, a compile call) at the head of the message.
    With ``config.strict`` the same message is raised as ``ValueError`` instead. Returns the
    unmatched globs (empty when every glob matches something).
    """
    paths = list(paths)
    found = unmatched_globs(config, paths)
    if not found:
        return found
    message = (f"{where}: {len(found)} glob(s) match none of the {len(paths)} projection "
               f"paths and change nothing: " + "; ".join(u.describe() for u in found)
               + ". A glob must match a whole named_modules() path (fnmatch)")
    if config.strict:
        raise ValueError(message)
    warnings.warn(message, UnmatchedGlobWarning, stacklevel=2)
    return found


def _corrected(glob: str) -> list[str]:
    """Globs the user probably meant, most likely first (none equal to ``glob`` itself)."""
    fixes = []
    if not glob.startswith("*"):
        fixes.append(f"*.{glob}")
    if not glob.endswith("*"):
        fixes.append(f"{glob}.*")
        if not glob.startswith("*"):
            fixes.append(f"*.{glob}.*")
    return fixes


def _similarity(glob: str, path: str) -> float:
    """How close ``path`` is to ``glob`` as text, in ``[0, 1]``.

    A leading (trailing) ``*`` stands for a prefix (suffix) of any length, so the glob's fixed
    part is also compared with the path's end (start) of the same length: ``*.down_prj`` is
    then close to ``model.layers.0.mlp.down_proj``, which the whole-string ratio misses. With
    ``*`` at both ends the fixed part may sit anywhere: the score is the fraction of its
    characters found, in order, in the path (``*.layer.0.*`` in ``model.layers.0.mlp.up_proj``).
    """
    scores = [difflib.SequenceMatcher(None, glob, path).ratio()]
    body = glob.strip("*")
    if not body:
        return scores[0]
    if glob.startswith("*") and glob.endswith("*"):
        blocks = difflib.SequenceMatcher(None, body, path).get_matching_blocks()
        scores.append(sum(b.size for b in blocks) / len(body))
    elif glob.startswith("*"):
        scores.append(difflib.SequenceMatcher(None, body, path[-len(body):]).ratio())
    elif glob.endswith("*"):
        scores.append(difflib.SequenceMatcher(None, body, path[:len(body)]).ratio())
    return max(scores)
