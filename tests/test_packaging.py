"""The declared dependency ranges are the tested ones."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parent.parent


def _requirement(name: str) -> Requirement:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    every = project["dependencies"] + [r for extra in project["optional-dependencies"].values()
                                       for r in extra]
    return next(Requirement(r) for r in every if Requirement(r).name == name)


def test_the_makefile_tests_the_lower_bound_of_transformers():
    oldest = re.search(r"^OLDEST_TRANSFORMERS := (\S+)$", (ROOT / "Makefile").read_text(),
                       re.M).group(1)
    lower = next(s.version for s in _requirement("transformers").specifier if s.operator == ">=")
    assert Version(oldest) == Version(lower)


def test_installed_versions_are_in_the_declared_ranges():
    for name in ("torch", "transformers"):
        installed = Version(metadata.version(name)).base_version
        assert _requirement(name).specifier.contains(installed, prereleases=True), (
            name, installed, str(_requirement(name).specifier))
