"""Writing a benchmark's measurements: one JSON file per run, beside its log."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_json(path: Path, record: Any) -> None:
    """Write ``record`` to ``path`` as indented JSON (creating its folder) and say so."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
    print(f"wrote {path}")
