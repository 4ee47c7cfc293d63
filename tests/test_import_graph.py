"""The drawing of ``nnunet_mmssl``'s imports has no circle (issue 24, "the house").

Each module of the package is parsed (``ast``, nothing is imported) and every ``import`` / ``from ... import`` of a
``nnunet_mmssl`` module becomes an edge importer -> imported. The rules:

- **Lazy imports count.** An import inside a function or method is an edge like a module-level one: it is a
  dependency all the same, and a function-level import is the usual way a circle gets hidden (the memory planner
  importing the trainers that import it). Only imports under ``if TYPE_CHECKING:`` are left out (never executed).
- **Relative imports** are resolved against the importing module's package.
- **``from pkg import name``** is an edge to the submodule ``pkg.name`` when ``pkg/name.py`` (or ``pkg/name/``)
  exists, else to the package's ``__init__`` (``pkg``), which is an ordinary node with its own edges (its
  re-exports). ``from pkg.mod import name`` is an edge to ``pkg.mod`` only.
- **Parent packages are not implied.** Python runs ``pkg/__init__`` before ``pkg.mod``, but counting that would make
  every package whose ``__init__`` re-exports a submodule a circle with that submodule; only written imports count.

The check fails on any strongly connected component of more than one module and prints one circle through each.
"""

from __future__ import annotations

import ast
from pathlib import Path

import nnunet_mmssl

PACKAGE_ROOT = Path(nnunet_mmssl.__file__).resolve().parent


def module_files(root: Path, package: str) -> dict[str, Path]:
    """Module name -> file for every ``.py`` under ``root`` (``pkg/__init__.py`` is the module ``pkg``)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join([package, *parts])] = path
    return modules


def _is_type_checking_guard(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def _import_nodes(tree: ast.AST):
    """Every Import/ImportFrom at any depth (functions, methods, try blocks), skipping ``if TYPE_CHECKING:`` bodies."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        children = list(ast.iter_child_nodes(node))
        if _is_type_checking_guard(node):
            children = list(node.orelse)
        stack.extend(children)


def import_edges(modules: dict[str, Path], package: str) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (see the module docstring for the rules)."""
    edges: dict[str, set[str]] = {name: set() for name in modules}

    def nearest_module(dotted: str) -> str | None:
        # ``import pkg.mod.Class`` is not valid Python, but ``from pkg.mod import x`` names pkg.mod; walk up to a module
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        own_package = name if is_package else name.rpartition(".")[0]
        for node in _import_nodes(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base_parts = own_package.split(".")
                    base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                    base = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                for alias in node.names:
                    submodule = f"{base}.{alias.name}"
                    targets.append(submodule if submodule in modules else base)
            for target in targets:
                if target != package and not target.startswith(package + "."):
                    continue
                resolved = nearest_module(target)
                if resolved is not None and resolved != name:
                    edges[name].add(resolved)
    return edges


def strongly_connected_components(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative); components of more than one node, each sorted, largest first."""
    index, low, on_stack, stack, counter, components = {}, {}, set(), [], [0], []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            advanced = False
            for succ in successors:
                if succ not in index:
                    index[succ] = low[succ] = counter[0]
                    counter[0] += 1
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(edges[succ]))))
                    advanced = True
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return sorted(components, key=lambda c: (-len(c), c))


def one_cycle(edges: dict[str, set[str]], component: list[str]) -> list[str]:
    """A shortest circle through the component's first module (breadth-first inside the component)."""
    members = set(component)
    start = component[0]
    parent = {start: None}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for succ in sorted(edges[node] & members):
                if succ == start:
                    path = [node]
                    while parent[path[-1]] is not None:
                        path.append(parent[path[-1]])
                    return [*reversed(path), start]
                if succ not in parent:
                    parent[succ] = node
                    nxt.append(succ)
        frontier = nxt
    raise AssertionError(f"no circle through {start}")  # unreachable for a component of more than one node


def describe_cycles(edges: dict[str, set[str]]) -> list[str]:
    return [f"{len(c)} modules: {', '.join(c)}\n    e.g. " + " -> ".join(one_cycle(edges, c))
            for c in strongly_connected_components(edges)]


def test_nnunet_mmssl_imports_have_no_circle():
    modules = module_files(PACKAGE_ROOT, "nnunet_mmssl")
    edges = import_edges(modules, "nnunet_mmssl")
    # the walk sees the package (the trainers' __init__ re-exports DBDC)
    assert "nnunet_mmssl.trainers.dbdc" in edges["nnunet_mmssl.trainers"]
    assert len(modules) > 80
    cycles = describe_cycles(edges)
    assert not cycles, "import circles in nnunet_mmssl:\n" + "\n".join(cycles)


def _write_package(root: Path, files: dict[str, str]) -> dict[str, Path]:
    for rel, text in files.items():
        path = root / "pkg" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return module_files(root / "pkg", "pkg")


def test_graph_rules_on_a_small_package(tmp_path):
    modules = _write_package(tmp_path, {
        "__init__.py": "from pkg.sub import thing\n",
        "sub/__init__.py": "from .leaf import thing\n",
        "sub/leaf.py": "thing = 1\ndef f():\n    from .. import other\n",  # lazy + relative + submodule name
        "other.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.sub.leaf import thing\n"
                    "else:\n    import pkg.sub\n",
        "solo.py": "import os\nfrom pkg import sub as s\nfrom pkg.sub.leaf import thing\n",
    })
    edges = import_edges(modules, "pkg")
    assert edges == {
        "pkg": {"pkg.sub"},
        "pkg.sub": {"pkg.sub.leaf"},
        "pkg.sub.leaf": {"pkg.other"},  # `from .. import other` is the submodule, not pkg/__init__
        "pkg.other": {"pkg.sub"},  # the TYPE_CHECKING import is left out, its else branch counts
        "pkg.solo": {"pkg.sub", "pkg.sub.leaf"},
    }
    # leaf -> other -> sub -> leaf is a circle (found although leaf's import is lazy); pkg and solo are not in it
    assert strongly_connected_components(edges) == [["pkg.other", "pkg.sub", "pkg.sub.leaf"]]
    assert one_cycle(edges, ["pkg.other", "pkg.sub", "pkg.sub.leaf"]) == [
        "pkg.other", "pkg.sub", "pkg.sub.leaf", "pkg.other"]
    edges["pkg.sub.leaf"].clear()
    assert describe_cycles(edges) == []
