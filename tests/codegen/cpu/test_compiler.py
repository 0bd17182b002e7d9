"""The CPU kernel builder: a clear error without a compiler, and atomic builds under races."""

from __future__ import annotations

import threading

import pytest

from qsparse_compile.codegen.cpu import compiler as cpu_compiler


def test_missing_compiler_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("CC", "no-such-compiler-xyz")
    with pytest.raises(cpu_compiler.CompilerNotFoundError, match="no-such-compiler-xyz"):
        cpu_compiler.find_compiler()
    monkeypatch.delenv("CC")
    monkeypatch.setenv("PATH", "")
    with pytest.raises(cpu_compiler.CompilerNotFoundError, match="install gcc"):
        cpu_compiler.find_compiler()


def test_concurrent_builds_leave_one_complete_library(tmp_path, monkeypatch):
    """Racing builders each rename a finished file into place; no partial file survives."""
    monkeypatch.setenv("QSPARSE_CACHE_DIR", str(tmp_path))
    source = "int qs_race_probe(void) { return 42; }\n"
    paths, errors = [], []

    def build():
        try:
            paths.append(cpu_compiler.build_library("qs_race_probe", source))
        except Exception as error:  # surfaced by the assertion below
            errors.append(error)

    workers = [threading.Thread(target=build) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors and len(set(paths)) == 1
    built = sorted(p.name for p in (tmp_path / "cpu").iterdir())
    assert [n for n in built if n.startswith(".")] == []  # no temporaries left behind
    import ctypes

    assert ctypes.CDLL(str(paths[0])).qs_race_probe() == 42
