"""The layers point one way, and importing the compiler stays light.

config -> ops -> kernels (registered onto ops) -> passes -> backend / export / report: a module
may import its own layer and the ones below, never one above; the research tools beside the
compiler (``qsparse_compile.research``) build on config and ops only, and the compiler reaches
them only from its top layer, inside functions (on demand). Checked on every module's source
(imports at module level and inside functions), with the import graph's cycles found by
networkx; no module imports another module's private names.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import networkx as nx
import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "qsparse_compile"

#: Layer of each part of the package, bottom first.
LAYERS = {
    0: ("config", "options", "roles", "modules", "plan", "rotations", "glob_check"),
    1: ("ops", "reference", "functional"),
    2: ("codegen",),
    3: ("passes",),
    4: ("backend", "export", "report", "compile_records", "compile_model", "demo", "cli",
        "__main__", ""),
}
RESEARCH = "research"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _part(module: str) -> str:
    """``qsparse_compile.passes.rewrite`` -> ``passes``; the package itself -> ``""``."""
    rest = module.split(".")[1:]
    return rest[0] if rest else ""


def _layer(module: str) -> int | None:
    part = _part(module)
    return next((layer for layer, parts in LAYERS.items() if part in parts), None)


def _imports(path: Path) -> list[tuple[str, list[str], bool]]:
    """(imported module, names imported from it, at module level?) of a source file."""
    tree = ast.parse(path.read_text())
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append((alias.name, [], id(node) in top_level))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [a.name for a in node.names]
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in _SOURCES]
            if len(submodules) < len(names):  # names defined in the module itself
                found.append((target, names, id(node) in top_level))
            # "from . import ops" imports the module qsparse_compile.ops
            found += [(sub, [], id(node) in top_level) for sub in submodules]
    return found


def _sources() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


_SOURCES = _sources()


def _is_module(name: str, modules: dict[str, Path]) -> bool:
    return name in modules


def test_every_module_is_in_a_layer():
    for module in _sources():
        assert _part(module) == RESEARCH or _layer(module) is not None, module


def test_no_module_imports_a_higher_layer():
    modules = _sources()
    violations = []
    for module, path in modules.items():
        for target, _, top in _imports(path):
            if not target.startswith("qsparse_compile") or not _is_module(target, modules):
                continue
            if _part(module) == RESEARCH:
                if _part(target) != RESEARCH and (_layer(target) or 0) > 1:
                    violations.append(f"{module} (research) imports {target}")
                continue
            if _part(target) == RESEARCH:
                if _layer(module) != max(LAYERS) or top:
                    violations.append(f"{module} imports {target} (research) "
                                      f"{'at module level' if top else 'below the top'}")
                continue
            if _layer(target) > _layer(module):
                violations.append(f"{module} (layer {_layer(module)}) imports {target} "
                                  f"(layer {_layer(target)})")
    assert violations == []


def test_no_import_cycle_and_no_private_names():
    modules = _sources()
    graph = nx.DiGraph()
    private = []
    for module, path in modules.items():
        graph.add_node(module)
        for target, names, top in _imports(path):
            if not _is_module(target, modules) or target == module:
                continue
            if top and not target == module.rpartition(".")[0]:
                graph.add_edge(module, target)
            private += [f"{module} imports {target}.{n}" for n in names
                        if n.startswith("_") and not n.startswith("__")]
    # a package importing its own submodules (for re-export) is not a cycle with them
    graph.remove_edges_from([(a, b) for a, b in graph.edges if b.startswith(a + ".")])
    assert list(nx.simple_cycles(graph)) == []
    assert private == []


_IMPORT_PROBE = textwrap.dedent("""
    import sys
    import qsparse_compile
    heavy = sorted(m for m in sys.modules
                   if m.split(".")[0] == "triton" or m.startswith("torch._inductor")
                   or m.startswith("qsparse_compile.research"))
    print(heavy)
""")


def test_importing_the_compiler_imports_neither_inductor_nor_triton(tmp_path):
    result = subprocess.run([sys.executable, "-c", _IMPORT_PROBE], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_research_tools_are_reached_on_demand():
    import qsparse_compile as qc

    assert qc.calibrate.__module__ == "qsparse_compile.research.calibrate"
    assert qc.Calibration.__module__ == "qsparse_compile.research.calibration"
    with pytest.raises(AttributeError, match="no attribute 'calibrat'"):
        qc.calibrat  # noqa: B018
