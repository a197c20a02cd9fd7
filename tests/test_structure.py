"""The package's import graph, read from the source with ``ast`` (nothing is imported):

- no import cycle between modules of ``ann_kernels``, counting every import statement wherever it
  stands (inside functions and methods too, which defer a cycle to run time but do not remove it)
  and ``importlib.import_module`` of a module named by a string literal;
- no private name (``_x``) taken from another sub-package: a helper that two sub-packages share gets
  a public name in the module that owns it. Modules of one sub-package (``ann_kernels.inference.*``)
  may share private names; the root's private modules (``ann_kernels._C``, ``_compat``, ``_ext``) are
  the package-wide internals and may be imported anywhere (a private *name* inside them may not).

An edge goes to the module an import names (``from ann_kernels.ops import f`` -> ``ann_kernels.ops``,
i.e. its ``__init__``; ``from ann_kernels.ops import multi_exit_ce`` -> that module), not to the
parents Python also initialises on the way (every module would otherwise sit in a cycle with its
package's ``__init__``).
"""

from __future__ import annotations

import ast
import re
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "ann_kernels"

@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name
    target: str  # dotted module name of the module the statement imports
    name: str | None  # the attribute taken from ``target`` (None: the module itself)
    line: int


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def subpackage(module: str, package: str) -> str:
    """``ann_kernels.inference.engine`` -> ``ann_kernels.inference``; a root module -> the root."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 else package


def find_modules(src_root: Path, package: str) -> dict[str, tuple[Path | None, bool]]:
    """Dotted name -> (source path or None for a compiled extension, is a package ``__init__``)."""
    modules: dict[str, tuple[Path | None, bool]] = {}
    for path in sorted((src_root / package).rglob("*.py")):
        parts = list(path.relative_to(src_root).with_suffix("").parts)
        is_init = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_init else parts)] = (path, is_init)
    for path in sorted((src_root / package).rglob("*.so")):  # ann_kernels/_C.cpython-311-....so
        parts = list(path.relative_to(src_root).parts)
        parts[-1] = parts[-1].split(".")[0]
        modules.setdefault(".".join(parts), (None, False))
    return modules


def _absolute(module: str, is_init: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_init else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _module_of(dotted: str, modules) -> str | None:
    """The longest prefix of ``dotted`` that is one of ``modules``."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in modules:
            return ".".join(parts[:n])
    return None


def find_imports(src_root: Path, package: str = PACKAGE) -> tuple[set[str], list[Import]]:
    """Every import of a module of ``package`` by a module of ``package``: the module names and the
    import list (steps: 1. ``import a.b`` / ``import a.b as x``; 2. ``from a import b``, relative
    too, ``b`` a module or a name; 3. ``importlib.import_module("a.b")`` and, in a module calling
    ``import_module``, each string literal naming a module; 4. ``x._name`` on a module alias ``x``)."""
    modules = find_modules(src_root, package)
    imports: list[Import] = []
    for module, (path, is_init) in modules.items():
        if path is None:
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        aliases: dict[str, str] = {}  # local name bound to a module of the package -> that module
        calls_import_module = False
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):  # 1.
                for alias in node.names:
                    target = _module_of(alias.name, modules)
                    if target is None:
                        continue
                    imports.append(Import(module, target, None, node.lineno))
                    if alias.asname:
                        aliases[alias.asname] = target
            elif isinstance(node, ast.ImportFrom):  # 2.
                base = _absolute(module, is_init, node)
                if _module_of(base, modules) is None:
                    continue
                for alias in node.names:
                    if f"{base}.{alias.name}" in modules:
                        imports.append(Import(module, f"{base}.{alias.name}", None, node.lineno))
                        aliases[alias.asname or alias.name] = f"{base}.{alias.name}"
                    else:
                        imports.append(Import(module, _module_of(base, modules), alias.name, node.lineno))
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) \
                    == "import_module":  # 3.
                calls_import_module = True
        for node in ast.walk(tree):
            if calls_import_module and isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and node.value in modules:
                imports.append(Import(module, node.value, None, node.lineno))
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id in aliases and is_private(node.attr):  # 4.
                imports.append(Import(module, aliases[node.value.id], node.attr, node.lineno))
    return set(modules), imports


def import_cycles(modules: set[str], imports: list[Import]) -> dict[frozenset[str], list[Import]]:
    """Strongly connected component (the set of modules on a cycle through each other) -> one
    shortest cycle in it, as its import statements."""
    edges: dict[str, dict[str, Import]] = {m: {} for m in modules}
    for imp in imports:
        edges[imp.importer].setdefault(imp.target, imp)

    def reach(start: str) -> set[str]:
        seen, todo = {start}, [start]
        while todo:
            for nxt in edges[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    def shortest_cycle(start: str) -> list[Import] | None:  # breadth first, back to start
        came_by: dict[str, Import | None] = {start: None}
        queue = deque([start])
        while queue:
            here = queue.popleft()
            for there, imp in sorted(edges[here].items()):
                if there == start:
                    path = [imp]
                    while came_by[here] is not None:
                        path.append(came_by[here])
                        here = came_by[here].importer
                    return path[::-1]
                if there not in came_by:
                    came_by[there] = imp
                    queue.append(there)
        return None

    reachable = {m: reach(m) for m in modules}
    cycles: dict[frozenset[str], list[Import]] = {}
    for module in sorted(modules):
        cycle = shortest_cycle(module)
        if cycle:
            component = frozenset(m for m in reachable[module] if module in reachable[m])
            cycles.setdefault(component, cycle)
    return cycles


def private_cross_imports(imports: list[Import], package: str = PACKAGE) -> list[Import]:
    """Imports of a private name, or of a private module, owned by another sub-package."""
    bad = []
    for imp in imports:
        if subpackage(imp.importer, package) == subpackage(imp.target, package):
            continue
        private_module = any(is_private(p) for p in imp.target.split(".")[1:]) and not (
            imp.target.count(".") == 1)  # the root's private modules are package-wide internals
        if (imp.name is not None and is_private(imp.name)) or private_module:
            bad.append(imp)
    return bad


def describe(cycle: list[Import]) -> str:
    return " -> ".join(f"{imp.importer} (line {imp.line})" for imp in cycle) + f" -> {cycle[0].importer}"


# ------------------------------------------------------------------ the package itself


def test_no_import_cycles():
    modules, imports = find_imports(ROOT)
    assert "ann_kernels.inference.engine" in modules and len(imports) > 100, "the walker found too little"
    cycles = [describe(c) for c in import_cycles(modules, imports).values()]
    assert not cycles, "import cycles (imports inside functions count):\n  " + "\n  ".join(cycles)


def test_no_private_names_imported_across_sub_packages():
    _, imports = find_imports(ROOT)
    bad = [f"{i.importer} line {i.line} takes {i.name or i.target.rsplit('.', 1)[1]} from {i.target}"
           for i in private_cross_imports(imports)]
    assert not bad, ("private names imported from another sub-package (give them a public name in the "
                     "module that owns them):\n  " + "\n  ".join(bad))


# ------------------------------------------------------------------ the walker on a made-up package


def _write_package(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / "pkg" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.mark.parametrize("a_text", [
    "from pkg.sub import b\n",  # a module imported from its package
    "def f():\n    from pkg.sub.b import g\n    return g\n",  # deferred inside a function
    "import pkg.sub.b as b\n",
    "from . import b\n",  # relative
    "import importlib\nMODS = ['pkg.sub.b']\ndef f():\n    return [importlib.import_module(m)\n"
    "            for m in MODS]\n",
])
def test_walker_finds_a_cycle_however_it_is_written(tmp_path, a_text):
    b_text = "class C:\n    def m(self):\n        from pkg.sub.a import x\n"  # in a method
    root = _write_package(tmp_path, {"__init__.py": "", "sub/__init__.py": "", "sub/a.py": a_text,
                                     "sub/b.py": b_text, "other.py": "import pkg.sub.a\n"})
    modules, imports = find_imports(root, "pkg")
    cycles = import_cycles(modules, imports)
    assert list(cycles) == [{"pkg.sub.a", "pkg.sub.b"}], cycles
    assert re.fullmatch(r"pkg\.sub\.a \(line \d\) -> pkg\.sub\.b \(line 3\) -> pkg\.sub\.a",
                        describe(cycles[frozenset({"pkg.sub.a", "pkg.sub.b"})]))


def test_walker_sees_no_cycle_through_a_parent_package(tmp_path):
    # pkg/__init__ imports pkg.sub.a, which imports pkg.sub.b: Python initialises pkg first, but no
    # module imports back, so there is no cycle.
    root = _write_package(tmp_path, {"__init__.py": "from pkg.sub.a import x\n", "sub/__init__.py": "",
                                     "sub/a.py": "from pkg.sub.b import y as x\n", "sub/b.py": "y = 1\n"})
    assert import_cycles(*find_imports(root, "pkg")) == {}


def test_walker_flags_private_names_from_another_sub_package_only(tmp_path):
    root = _write_package(tmp_path, {
        "__init__.py": "", "_internal.py": "", "one/__init__.py": "", "two/__init__.py": "",
        "one/a.py": "def _helper(): pass\ndef public(): pass\n",
        "one/b.py": "from pkg.one.a import _helper\n",  # same sub-package: fine
        "two/c.py": "def f():\n    from pkg.one.a import _helper, public\n",  # flagged (inside a function)
        "two/d.py": "import pkg.one.a as a\nx = a._helper\ny = a.public\n",  # flagged (attribute)
        "two/e.py": "from pkg import _internal\nfrom pkg.one import _private_mod\n",  # 2nd flagged
        "one/_private_mod.py": "",
    })
    _, imports = find_imports(root, "pkg")
    flagged = sorted((i.importer, i.target, i.name) for i in private_cross_imports(imports, "pkg"))
    assert flagged == [("pkg.two.c", "pkg.one.a", "_helper"), ("pkg.two.d", "pkg.one.a", "_helper"),
                       ("pkg.two.e", "pkg.one._private_mod", None)]
