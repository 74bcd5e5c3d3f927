"""The package's import graph has no cycle: every `lora_jax` module is read with `ast` (imports at
module level, inside functions and under `if TYPE_CHECKING`, `import lora_jax.x` and
`from lora_jax.x import y` alike, relative imports resolved), and the graph must be acyclic, so a
module can be read, tested and moved without dragging in the modules that use it."""

import ast
import os

import pytest

from tests.helpers import REPO

PACKAGE = "lora_jax"
ROOT = os.path.join(REPO, PACKAGE)


def _modules() -> dict[str, str]:
    """{dotted module name: file path} of every module of the package."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__pycache__")))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, name), os.path.dirname(ROOT))
            parts = rel[:-3].split(os.sep)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = os.path.join(dirpath, name)
    return found


def _imported(tree: ast.AST, module: str, is_package: bool, modules) -> set[str]:
    """The package's modules that `module` imports anywhere in its source."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package holding `module`
                parts = module.split(".")
                anchor = parts if is_package else parts[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from a.b import c` imports a.b, and a.b.c when c is a module
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        # a name that is not a module is an attribute, or a namespace package (no __init__.py:
        # nothing runs when it is imported)
        out.update(name for name in names if name in modules and name != module)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=path)
        graph[name] = _imported(tree, name, path.endswith("__init__.py"), modules)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None when it is acyclic (iterative DFS)."""
    WHITE, GREY, BLACK = 0, 1, 2
    color = {node: WHITE for node in graph}
    for start in sorted(graph):
        if color[start] != WHITE:
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        color[start] = GREY
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                color[path.pop()] = BLACK
                stack.pop()
            elif color.get(nxt, BLACK) == GREY:
                return path[path.index(nxt) :] + [nxt]
            elif color.get(nxt) == WHITE:
                color[nxt] = GREY
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_find_cycle_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_import_graph_reads_every_kind_of_import():
    tree = ast.parse(
        "import numpy\nimport lora_jax.a\nfrom lora_jax import b\nfrom . import c\n"
        "from lora_jax.ns import mod as alias\n"
        "def f():\n    from lora_jax.d import name\n"
        "if TYPE_CHECKING:\n    from .. import e\n"
    )
    modules = {
        "lora_jax",
        "lora_jax.a",
        "lora_jax.b",
        "lora_jax.pkg",
        "lora_jax.pkg.c",
        "lora_jax.pkg.m",
        "lora_jax.d",
        "lora_jax.e",
        "lora_jax.ns.mod",
    }  # lora_jax.ns: a namespace
    assert _imported(tree, "lora_jax.pkg.m", False, modules) == {
        "lora_jax.a",
        "lora_jax",
        "lora_jax.b",
        "lora_jax.pkg",
        "lora_jax.pkg.c",
        "lora_jax.ns.mod",
        "lora_jax.d",
        "lora_jax.e",
    }


def test_the_real_graph_is_read():
    graph = import_graph()
    assert "lora_jax.cli" in graph and "lora_jax.train.loop" in graph
    assert sum(len(v) for v in graph.values()) > 20  # the walk found the package's imports


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    if cycle is not None:
        pytest.fail(
            "import cycle among lora_jax modules (function-level imports count): "
            + " -> ".join(cycle)
            + "; move what both sides need into a lower module"
        )
