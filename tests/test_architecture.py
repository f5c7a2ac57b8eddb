"""The shape of the code, read from the AST of every module of core/, worker/ and producer/.

(a) no import cycles among the modules (function-level and ``TYPE_CHECKING`` imports included);
(b) no module reaches another module's private names (``from x import _y``, ``x._y`` on an
    imported module) nor a private attribute the module does not define itself (an object of
    another module's class);
(c) the producer imports neither torch, ``core`` nor ``worker`` (client teams install it alone).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "worker", "producer")

#: (importing module, imported module, private name): why it is unavoidable
PRIVATE_ALLOWED: dict[tuple[str, str, str], str] = {}
#: (module, expression) of a private attribute read on an object: why it is unavoidable
PRIVATE_ATTRIBUTES_ALLOWED: dict[tuple[str, str], str] = {
    ("worker.fatal", "os._exit"): "the documented way to end a process without clean-up",
    ("worker.transport", "self.connection._deliver"): (
        "kombu's virtual transport delivers a message through its connection's _deliver; the "
        "transport subclass must hand on what it parsed the same way"
    ),
    ("core.extractor_net", "nn.modules.batchnorm._BatchNorm"): (
        "torch has no public base class of its batch-norm layers"
    ),
    ("core.problem", "tensor._version"): (
        "torch's count of in-place changes to a tensor (what autograd checks its saved tensors "
        "by) has no public name; the float32 copy the certificate reads must be unchanged"
    ),
}


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _trees() -> dict[str, ast.Module]:
    return {name: ast.parse(path.read_text(), str(path)) for name, path in MODULES.items()}


TREES = _trees()


def _absolute(module: str, node: ast.ImportFrom) -> str:
    """The absolute module name of a (possibly relative) ``from ... import``."""
    if not node.level:
        return node.module or ""
    is_pkg = MODULES[module].name == "__init__.py"
    base = module.split(".")
    base = base if is_pkg else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str) -> Iterator[tuple[str, ast.AST]]:
    """Every module name ``module`` imports (anywhere in it), with the node."""
    for node in ast.walk(TREES[module]):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, node)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield (sub if sub in MODULES else base), node


def _graph() -> dict[str, set[str]]:
    return {
        m: {target for target, _ in _imports(m) if target in MODULES and target != m}
        for m in MODULES
    }


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as a cycle
    path found in it."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    comps: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_path_in(graph, set(c)) for c in comps]


def _path_in(graph: dict[str, set[str]], comp: set[str]) -> list[str]:
    """One cycle through the first module of a strongly connected component."""
    start = min(comp)
    paths = {start: [start]}
    todo = [start]
    while todo:
        v = todo.pop(0)
        for w in sorted(graph[v] & comp):
            if w == start:
                return paths[v] + [start]
            if w not in paths:
                paths[w] = paths[v] + [w]
                todo.append(w)
    return sorted(comp)


def _cycles_in(prefix: str) -> list[list[str]]:
    return [c for c in _cycles(_graph()) if any(m.split(".")[0] == prefix for m in c)]


def test_the_module_graph_is_read() -> None:
    graph = _graph()
    assert "worker.service" in graph and "core.model" in graph and "producer.client" in graph
    assert "producer.doorbell" in graph["worker.doorbell"]  # function-level imports count too
    assert "worker.integrity" in graph["worker.training"]


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycles(package: str) -> None:
    cycles = _cycles_in(package)
    assert cycles == [], " | ".join(" -> ".join(c) for c in cycles)


def test_a_cycle_would_be_found() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c", "a"]]


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _private_uses(module: str) -> Iterator[tuple[str, str, int]]:
    """``(other module, private name, line)`` for each private name of another internal module
    that ``module`` imports or reads as an attribute of the imported module."""
    tree = TREES[module]
    bound: dict[str, str] = {}  # local name -> internal module it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    bound[alias.asname] = alias.name
                else:
                    bound[alias.name.split(".")[0]] = alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, node)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in MODULES:
                    bound[alias.asname or alias.name] = sub
                elif base in MODULES and base != module and _private(alias.name):
                    yield base, alias.name, node.lineno
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and _private(node.attr)):
            continue
        chain: list[str] = []
        value: ast.expr = node.value
        while isinstance(value, ast.Attribute):
            chain.insert(0, value.attr)
            value = value.value
        if isinstance(value, ast.Name) and value.id in bound:
            target = ".".join([bound[value.id], *chain])
            if target in MODULES and target != module:
                yield target, node.attr, node.lineno


def test_no_module_reaches_another_modules_private_names() -> None:
    found = [
        f"{m}:{line} uses {other}.{name}"
        for m in MODULES
        for other, name, line in _private_uses(m)
        if (m, other, name) not in PRIVATE_ALLOWED
    ]
    assert found == []


def _own_private_names(tree: ast.Module) -> set[str]:
    """Private names a module defines itself: attributes it stores on its own objects
    (``self._x = ``, ``cls._x = ``), annotated attributes, methods and class attributes."""
    own: set[str] = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.ctx, ast.Store)
            and isinstance(node.value, ast.Name)
            and node.value.id in ("self", "cls")
        ):
            own.add(node.attr)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            own.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            own.add(node.id)
    return {name for name in own if _private(name)}


def test_no_private_attribute_of_another_modules_object() -> None:
    """``x._y`` where ``_y`` is not a name the module defines itself: a private attribute of an
    object of another module's class (or of a third-party object)."""
    found = []
    for m, tree in TREES.items():
        own = _own_private_names(tree)
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and _private(node.attr)):
                continue
            if node.attr in own or (
                isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
            ):
                continue
            if (m, ast.unparse(node)) not in PRIVATE_ATTRIBUTES_ALLOWED:
                found.append(f"{m}:{node.lineno} reads {ast.unparse(node)}")
    assert found == []


def test_the_producer_imports_neither_torch_core_nor_worker() -> None:
    found = [
        f"{m}:{node.lineno if isinstance(node, ast.stmt) else '?'} imports {target}"
        for m in MODULES
        if m.split(".")[0] == "producer"
        for target, node in _imports(m)
        if target.split(".")[0] in ("torch", "core", "worker")
    ]
    assert found == []
