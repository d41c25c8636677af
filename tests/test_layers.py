"""The package's import graph: layers that only point down, and no cycle.

Read from the source (no import runs): every `import` and `from ... import` of every module, at module level or
inside a function, and every string-named module (`importlib.import_module("...")`, the values of a module-level
dict of dotted `prefix_kernels.` names or of relative names `".x"`, as the lazy registries use), resolved to the
package's own modules. The layers, bottom to top:

    core, version  <-  backends  <-  attention  <-  hf  <-  prefix  <-  cli  <-  the package __init__, __main__

A module may import its own layer and the ones below; never one above. The package's `__init__` is the public API
on top (its lazy names point down); a subpackage's `__init__` belongs to its layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "prefix_kernels"
LAYERS = {"core": 0, "version": 0, "backends": 1, "attention": 2, "hf": 3, "prefix": 4, "cli": 5, "__init__": 6,
          "__main__": 7}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(importer: str, is_package: bool, level: int, name: str | None) -> str:
    if level == 0:
        return name or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules `name` imports, explicitly or by a string, anywhere in its source."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def add(target: str) -> None:
        # `from a.b import c` imports the module `a.b.c` when there is one, else `a.b`.
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target.startswith("prefix_kernels"):
            found.add(target)

    def add_string(text: str) -> None:
        if text.startswith("prefix_kernels."):
            add(text)
        elif text.startswith(".") and text.strip(".").replace(".", "").replace("_", "").isalnum():
            level = len(text) - len(text.lstrip("."))
            add(_resolve(name, is_package, level, text.lstrip(".")))

    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(name, is_package, node.level, node.module)
            for alias in node.names:
                add(f"{base}.{alias.name}")
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                add_string(node.args[0].value)
            elif node.args and isinstance(node.args[0], ast.JoinedStr):
                head = node.args[0].values[0]
                if isinstance(head, ast.Constant) and isinstance(head.value, str):
                    add_string(head.value)
    for node in tree.body:  # module-level registries: {"key": "prefix_kernels.x.y"} or {"key": "x.y"} (relative)
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Dict):
            for value in node.value.values:
                if isinstance(value, ast.Constant) and isinstance(value.value, str):
                    text = value.value
                    if text.startswith("prefix_kernels.") or (name == "prefix_kernels" and text.replace(".", "")
                                                               .replace("_", "").isalnum() and "." in text):
                        add_string(text if text.startswith("prefix_kernels.") else "." + text)
    found.discard(name)
    return found


def _layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return LAYERS["__init__"]
    return LAYERS[parts[1]]


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_every_module_has_a_layer():
    for name in _modules():
        assert name == "prefix_kernels" or name.split(".")[1] in LAYERS, f"{name}: no layer (add it to LAYERS)"


def test_no_module_imports_a_layer_above_it():
    upward = [f"{a} ({_layer(a)}) imports {b} ({_layer(b)})"
              for a, targets in _graph().items() for b in targets if _layer(b) > _layer(a)]
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_graph_is_read():
    """The reader sees what the package is known to import, so an empty graph cannot pass the two tests above."""
    graph = _graph()
    assert "prefix_kernels.core.checks" in graph["prefix_kernels.attention"]
    assert "prefix_kernels.backends.triton" in graph["prefix_kernels.attention"]  # the lazy registry
    assert "prefix_kernels.hf.patching" in graph["prefix_kernels"]  # the lazy public names
    assert "prefix_kernels.core.masks" in graph["prefix_kernels.backends.cpu"]
