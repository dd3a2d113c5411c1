"""The package's shape: an acyclic import graph, no private names across modules, small
modules, nothing read from outside the package, one of each shared mechanism.

Everything here reads the source with ``ast``; nothing is imported.
"""
import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "bayes_transfer"

#: Modules allowed over MAX_LINES, each with its one reason.
LONG_MODULES = {
    "bayes_transfer.interop.torch_reader":
        "the restricted unpickler for .pt files: one security boundary, read as a whole",
}
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


MODULES = _modules()
TREES = {name: ast.parse(path.read_text(), str(path)) for name, path in MODULES.items()}


def _owner(name: str) -> str | None:
    """The package module that ``name`` (a dotted import target) lives in."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(name: str):
    """(imported module, imported name or None) for every import in module ``name``."""
    is_package = MODULES[name].name == "__init__.py"
    for node in ast.walk(TREES[name]):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base if is_package else base[:-1]
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                full = f"{target}.{alias.name}"
                yield (full, None) if full in MODULES else (target, alias.name)


def _graph() -> dict[str, set[str]]:
    graph = {name: set() for name in MODULES}
    for name in MODULES:
        for target, _ in _imports(name):
            owner = _owner(target) if target.startswith("bayes_transfer") else None
            # a module importing its own package's __init__ runs it anyway: not an edge
            if owner and owner != name and not name.startswith(owner + "."):
                graph[name].add(owner)
    return graph


def _cycles(graph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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


def test_the_graph_walker_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_graph_has_no_cycle():
    assert _cycles(_graph()) == []


def test_no_private_name_is_imported_from_another_module():
    found = [f"{name} imports {target}.{imported}"
             for name in MODULES for target, imported in _imports(name)
             if imported and imported.startswith("_") and not imported.startswith("__")
             and target.startswith("bayes_transfer") and _owner(target) != name]
    assert found == []


def test_no_module_is_longer_than_the_limit_without_a_reason():
    long = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
    long = {name: n for name, n in long.items() if n > MAX_LINES}
    assert set(long) <= set(LONG_MODULES), {n: long[n] for n in set(long) - set(LONG_MODULES)}
    assert all(reason.strip() for reason in LONG_MODULES.values())


@pytest.mark.parametrize("pattern", [r"parents\[\d+\]", r"\.\./shared", r"shared/data",
                                     r"\.parent\.parent"])
def test_the_package_reads_nothing_outside_itself(pattern):
    hits = [f"{path.relative_to(PACKAGE.parent)}:{i}"
            for path in MODULES.values()
            for i, line in enumerate(path.read_text().splitlines(), 1)
            if re.search(pattern, line)]
    assert hits == []


def test_demo_is_a_command_not_a_library():
    users = sorted(name for name in MODULES
                   for target, _ in _imports(name) if _owner(target) == "bayes_transfer.demo"
                   and name != "bayes_transfer.demo")
    assert users and all(name.startswith("bayes_transfer.cli") for name in users), users


def _calls(name: str):
    for node in ast.walk(TREES[name]):
        if isinstance(node, ast.Call):
            yield ast.unparse(node.func)


def test_one_atomic_write():
    """Renames and replaces happen in fsutil only, so every write keeps the old or the
    new version in place (fsutil.atomic_write)."""
    renames = {"os.replace", "os.rename", "shutil.move", "os.renames"}
    found = sorted(f"{name}: {call}" for name in MODULES if name != "bayes_transfer.fsutil"
                   for call in _calls(name) if call in renames or call.endswith(".rename"))
    assert found == []


def _reads_architecture(tree) -> bool:
    """Whether code reads ``<x>.metadata["architecture"]`` or ``.metadata.get("architecture")``."""
    for node in ast.walk(tree):
        key = None
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute):
            key = node.slice if node.value.attr == "metadata" else None
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "get" and isinstance(node.func.value, ast.Attribute)
              and node.func.value.attr == "metadata" and node.args):
            key = node.args[0]
        if isinstance(key, ast.Constant) and key.value == "architecture":
            return True
    return False


def test_one_way_from_a_prior_to_a_model():
    """Only models.from_prior turns a prior's architecture into a model."""
    found = sorted(name for name in MODULES if name != "bayes_transfer.models.from_prior"
                   and _reads_architecture(TREES[name])
                   and any(c.endswith("create") or c.endswith("create_segmentation")
                           for c in _calls(name)))
    assert found == []


def test_one_main():
    mains = sorted(name for name, tree in TREES.items() for node in tree.body
                   if isinstance(node, ast.FunctionDef) and node.name == "main")
    # the command line, and the multi-host launcher that starts it (or a script)
    assert mains == ["bayes_transfer.cli", "bayes_transfer.launch"]
