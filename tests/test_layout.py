"""The package's shape holds: the recommender and the exports import no heavy library, nothing in the package imports
the app, imports point one way (front ends -> runs / train -> export -> recommender), and there is no import cycle,
lazy imports inside functions included (accelerate keeps a test like the first for its CLI)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "finetune_helper"
HEAVY = ("torch", "transformers", "gradio", "datasets", "trl", "peft", "accelerate", "bitsandbytes", "pandas")
#: where each part of the package sits: a module may import its own part and the parts below it
LAYERS = {"shared": 0, "recommender": 1, "export": 2, "train": 3, "runs": 4, "measure": 4, "commands": 5, "cli": 6,
          "__main__": 7, "__init__": 7}
#: modules every part may use (the error type, units, defaults, name patterns)
SHARED = ("errors", "units", "defaults", "names")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, at module level?) for every import in ``path``, relative ones resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    top = set(map(id, tree.body))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if node.level and not node.module:  # from . import x: x is a module
                found += [(f"{module}.{alias.name}", id(node) in top) for alias in node.names]
            else:
                found.append((module, id(node) in top))
    return found


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _part(module: str) -> str:
    parts = module.split(".")
    part = parts[1] if len(parts) > 1 else "__init__"
    return "shared" if part in SHARED else part


def _internal(module: str) -> str | None:
    """The package module ``module`` names (a module, or a name inside one), or None for outside imports."""
    while module and module not in MODULES:
        module = module.rpartition(".")[0]
    return module or None


def test_recommend_and_export_import_no_heavy_library_at_module_level():
    offenders = [(name, imported) for name, path in MODULES.items() if _part(name) in ("recommender", "export", "shared")
                 for imported, top in _imports(path) if top and imported.split(".")[0] in HEAVY]
    assert offenders == []


def test_importing_every_recommend_and_export_module_loads_no_heavy_library():
    names = [name for name in MODULES if _part(name) in ("recommender", "export", "shared")]
    code = ("import importlib, sys\n"
            f"for name in {names!r}:\n    importlib.import_module(name)\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_nothing_in_the_package_imports_the_app():
    offenders = [(name, imported) for name, path in MODULES.items() for imported, _ in _imports(path)
                 if imported.split(".")[0] == "finetune_helper_app"]
    assert offenders == []


def test_imports_point_one_way():
    """Each part imports only its own part and the parts below it (lazy imports included)."""
    wrong = []
    for name, path in MODULES.items():
        for imported, _ in _imports(path):
            target = _internal(imported)
            if target is None or target == "finetune_helper":
                continue
            a, b = _part(name), _part(target)
            if b != a and LAYERS[b] >= LAYERS[a]:
                wrong.append(f"{name} -> {target}")
    assert wrong == []


def test_no_import_cycles_lazy_ones_included():
    graph = {name: {t for imported, _ in _imports(path) if (t := _internal(imported)) and t != name
                    and t != "finetune_helper"} for name, path in MODULES.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


@pytest.mark.parametrize("part", ["recommender", "export", "train", "runs", "measure", "commands"])
def test_every_part_is_a_documented_subpackage(part):
    init = PACKAGE / part / "__init__.py"
    assert ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
