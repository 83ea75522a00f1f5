"""The package's structure: imports run one way (no cycles), no private name is imported across modules, and the
paths the README shows import."""

from __future__ import annotations

import ast
import importlib
import re

import pytest

from .conftest import REPO

PACKAGE = REPO / "esft_lightning"


def _module_name(path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, list[tuple[str, list[str]]]]:
    """Every module's imports of the package's own modules (function-local ones included): (module, names)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    found: dict[str, list[tuple[str, list[str]]]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = []
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                names = [a.name for a in node.names]
                if target in modules:
                    submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
                    edges += [(s, []) for s in submodules]
                    edges.append((target, [n for n in names if f"{target}.{n}" not in modules]))
            elif isinstance(node, ast.Import):
                edges += [(a.name, []) for a in node.names if a.name in modules]
        found[name] = [(t, n) for t, n in edges if t != name]
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_imports_run_one_way():
    imports = _imports()
    # A package's __init__ re-exports its modules (the public surface): edges into it from its own modules are
    # the modules' business, so only edges between modules (and from outside into the package) count.
    graph = {
        name: {t for t, _ in edges if not (t.startswith(name + ".") and name.count(".") < t.count("."))}
        for name, edges in imports.items()
    }
    graph = {k: {t for t in v if not k.startswith(t + ".")} for k, v in graph.items()}  # a module -> its package
    assert _cycles(graph) == []


def test_subpackages_depend_one_way():
    """observe -> decide -> apply and the rest: no two rooms of the package (subpackages and top-level modules)
    import each other, directly or around a loop."""

    def room(module: str) -> str:
        return ".".join(module.split(".")[:2])

    graph: dict[str, set[str]] = {}
    for name, edges in _imports().items():
        for target, _ in edges:
            if room(target) != room(name) and target != "esft_lightning":
                graph.setdefault(room(name), set()).add(room(target))
    assert _cycles(graph) == []


def test_the_state_attribute_name_models_repeats_is_the_experts_one():
    from esft_lightning.experts.state import STATE_ATTR

    assert f'vars(self.experts).get("{STATE_ATTR}")' in (PACKAGE / "models" / "base.py").read_text()


def test_no_package_exports_a_name_that_hides_one_of_its_modules():
    """``from pkg import mod`` must give the module: a function re-exported under the module's name would hide it."""
    import pkgutil

    import esft_lightning

    hidden = []
    for info in pkgutil.walk_packages(esft_lightning.__path__, "esft_lightning."):
        if info.ispkg:
            package = importlib.import_module(info.name)
            for sub in pkgutil.iter_modules(package.__path__):
                value = getattr(package, sub.name, None)
                if value is not None and not isinstance(value, type(esft_lightning)):
                    hidden.append(f"{info.name}.{sub.name}")
    assert hidden == []


def test_no_private_name_is_imported_across_modules():
    private = [
        f"{name} imports {target}.{n}"
        for name, edges in _imports().items()
        for target, names in edges
        for n in names
        if n.startswith("_") and not n.startswith("__")
    ]
    assert private == []


def test_every_import_the_readme_shows_works():
    text = (REPO / "README.md").read_text()
    statements = set(re.findall(r"^\s*from (esft_lightning[\w.]*) import ([\w, ]+)", text, re.MULTILINE))
    assert len(statements) >= 5, statements
    for module, names in statements:
        imported = importlib.import_module(module)
        for name in (n.strip() for n in names.split(",")):
            assert hasattr(imported, name), f"README: from {module} import {name}"


@pytest.mark.parametrize(
    "path",
    [
        "esft_lightning.distributed.FSDP2Strategy",
        "esft_lightning.checkpoint_io.AtomicCheckpointIO",
        "esft_lightning.run_paths.RunLogger",
        "esft_lightning.cli.main",
    ],
)
def test_yaml_class_paths_and_the_entry_point_resolve(path):
    module, _, name = path.rpartition(".")
    assert callable(getattr(importlib.import_module(module), name))
