"""Code hashes derived from the import graph, used as Snakemake ``params`` so that editing a stage's code reruns it.

Snakemake notices changes to a rule's ``shell:`` text and ``params:``, not to the package a command imports
(CLUSTER.md, Reruns). So each rule carries ``code=stage_code(<subcommand>)``: a hash over the transitive closure of
the package modules the stage can import, found by reading the sources with :mod:`ast` (imports inside functions
included; relative imports resolved; a string constant naming a package module counts as an import, which covers
registries loaded through ``importlib``). A module imported tomorrow is covered the day it is imported, with no list
to keep up to date.

What is hashed is each module's syntax tree without docstrings (``ast.dump``), so an edit of a comment, a docstring
or the layout reruns nothing, while any change of a statement reruns every stage that can import the module.
The command dispatcher (``morphfuse.cli``) names every stage module in its table, and the package's ``__init__``
names the modules of its lazy API: their strings are not followed, else every stage would depend on every other.
"""
from __future__ import annotations

import ast
import functools
import hashlib
from pathlib import Path

PACKAGE = "morphfuse"
PACKAGE_ROOT = Path(__file__).resolve().parent
# Modules whose string constants name other stages' modules without importing them: the command table, and the
# package's lazy Python API (``morphfuse.Detector`` imports morphfuse.detect on first use, PEP 562; the package is
# the parent of every module, so following its strings would make every stage depend on detect's code).
DISPATCHERS = frozenset({f"{PACKAGE}.cli", f"{PACKAGE}.commands", PACKAGE})
# Every stage process starts here (``python -m morphfuse <stage>``).
ENTRY = (f"{PACKAGE}.__main__", f"{PACKAGE}.cli")


@functools.lru_cache(maxsize=None)
def _modules(root: str) -> dict[str, Path]:
    """Module name → source file, for every module of the package under ``root``."""
    base = Path(root)
    out: dict[str, Path] = {}
    for f in sorted(base.rglob("*.py")):
        rel = f.relative_to(base).with_suffix("")
        parts = [PACKAGE, *rel.parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


@functools.lru_cache(maxsize=None)
def _parsed(path: Path, mtime_ns: int) -> ast.Module:
    """The module's syntax tree without docstrings, parsed once for both the import graph and the digest (a
    planning run parses every module of the package)."""
    return _StripDocstrings().visit(ast.parse(path.read_bytes(), filename=str(path)))


def _tree(path: Path) -> ast.Module:
    return _parsed(path, path.stat().st_mtime_ns)


def _is_package(name: str, modules: dict[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def _resolve_from(module: str, node: ast.ImportFrom, modules: dict[str, Path]) -> str | None:
    """The absolute module an ``ImportFrom`` names (``from ..x import y`` in ``a.b.c`` → ``a.x``)."""
    if node.level == 0:
        return node.module
    pkg = module if _is_package(module, modules) else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        pkg = pkg.rpartition(".")[0]
    return f"{pkg}.{node.module}" if node.module else pkg


def direct_imports(module: str, root: Path = PACKAGE_ROOT) -> frozenset[str]:
    """The package modules ``module`` imports anywhere in its source (or names as a string constant)."""
    modules = _modules(str(root))
    path = modules[module]
    return _direct_imports(module, str(root), path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=None)
def _direct_imports(module: str, root: str, mtime_ns: int) -> frozenset[str]:
    modules = _modules(root)
    tree = _tree(modules[module])
    found: set[str] = set()

    def add(name: str | None) -> None:
        # "a.b.c" imports a, a.b and a.b.c; keep the ones that are modules of this package.
        while name:
            if name in modules:
                found.add(name)
            name = name.rpartition(".")[0]

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_from(module, node, modules)
            add(base)
            for alias in node.names:  # `from . import dct` imports the submodule dct
                if base and f"{base}.{alias.name}" in modules:
                    add(f"{base}.{alias.name}")
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str) and module not in DISPATCHERS
              and node.value.startswith(PACKAGE + ".") and node.value in modules):
            add(node.value)
    found.discard(module)
    return frozenset(found)


def closure(*entries: str, root: Path = PACKAGE_ROOT) -> frozenset[str]:
    """Every package module reachable from ``entries`` through imports (parent packages included)."""
    modules = _modules(str(root))
    todo = [e for e in entries]
    seen: set[str] = set()
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        if m not in modules:
            raise KeyError(f"{m} is not a module of {root}")
        seen.add(m)
        parent = m.rpartition(".")[0]
        if parent:
            todo.append(parent)
        todo.extend(direct_imports(m, root) - seen)
    return frozenset(seen)


class _StripDocstrings(ast.NodeTransformer):
    def _strip(self, node):
        self.generic_visit(node)
        body = getattr(node, "body", None)
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
        return node

    visit_Module = visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _strip


@functools.lru_cache(maxsize=None)
def _digest(path: Path, mtime_ns: int) -> str:
    tree = _parsed(path, mtime_ns)
    return hashlib.sha256(ast.dump(tree, annotate_fields=True, include_attributes=False).encode()).hexdigest()


def module_digest(module: str, root: Path = PACKAGE_ROOT) -> str:
    """SHA-256 of the module's syntax tree without docstrings: comments and layout do not count."""
    path = _modules(str(root))[module]
    return _digest(path, path.stat().st_mtime_ns)


def code_hash_of(modules, root: Path = PACKAGE_ROOT) -> str:
    """One hash (16 hex digits) over the given modules' digests."""
    h = hashlib.sha256()
    for m in sorted(modules):
        h.update(f"{m}\t{module_digest(m, root)}\n".encode())
    return h.hexdigest()[:16]


def stage_module(command: str) -> str:
    """The module that implements ``morphfuse <command>`` (from the CLI's table)."""
    from .commands import COMMANDS

    for name, module, _help in COMMANDS:
        if name == command:
            return module
    raise KeyError(f"morphfuse has no subcommand {command!r}")


def stage_closure(command: str, root: Path = PACKAGE_ROOT) -> frozenset[str]:
    """The package modules a ``morphfuse <command>`` process can load."""
    return closure(*ENTRY, stage_module(command), root=root)


def stage_code(command: str, root: Path = PACKAGE_ROOT) -> str:
    """The code parameter of the rules that run ``morphfuse <command>``."""
    return code_hash_of(stage_closure(command, root), root)
