"""The package's layers, read from the source with `ast` (nothing is imported):

* no import cycle among the modules of vmd/, counting every import: at the
  top, inside functions, and under `if TYPE_CHECKING:` (a type-only cycle is
  still two modules that cannot be read, tested or split apart alone);
* the engine reaches neither pyfuse3 nor the admin socket, directly or through
  another vmd module: FUSE and the socket are adapters over the Volume API;
* no method is replaced on an instance at run time: rules that change how a
  volume answers are a layer it asks (`Volume.access`), not a patched method.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

VMD = Path(__file__).resolve().parent.parent / "vmd"

# The engine: volumes, plexes, their logs and maps, resync, snapshots, the
# Remote Copy machinery (sender, link, receiver, protocol), and the I/O
# backends. The adapters (fusefs, admin, cli, daemon) and the admin verbs
# (commands, *_verbs) sit above them.
ENGINE = ("volume", "plex", "sidecar", "drl", "regionmap", "rangelock", "resync", "snapshot",
          "iopool", "uring", "manager", "access", "config", "errors", "exclusive", "faults",
          "rcopy", "rcopy_link", "rcopy_proto", "rcopy_recv", "resize", "nbdlink", "nbdplex")
FORBIDDEN = ("pyfuse3", "vmd.admin")


@cache
def _modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(), str(p)) for p in sorted(VMD.glob("*.py"))}


def _imports(name: str, tree: ast.Module) -> set[str]:
    """Every module `name` imports anywhere in its file, as dotted names
    (vmd's own as "vmd.X")."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                out.add(node.module or "")
                if node.module == "vmd":
                    out.update(f"vmd.{a.name}" for a in node.names)
            elif node.level == 1:
                if node.module:  # from .x import y
                    out.add(f"vmd.{node.module}")
                else:  # from . import x, y
                    out.update(f"vmd.{a.name}" for a in node.names)
            else:
                raise AssertionError(f"vmd/{name}.py: relative import beyond the package")
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: {i.removeprefix("vmd.") for i in _imports(name, tree)
                   if i.startswith("vmd.") and i.removeprefix("vmd.") in mods}
            for name, tree in mods.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the path of modules around it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        path.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return path[path.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        path.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_cycle_finder_finds_a_type_only_cycle() -> None:
    """The check itself: a cycle through `if TYPE_CHECKING:` and a function-level import."""
    a = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import B\n")
    b = ast.parse("def f():\n    from . import a\n")
    graph = {"a": {i.removeprefix("vmd.") for i in _imports("a", a)} & {"b"},
             "b": {i.removeprefix("vmd.") for i in _imports("b", b)} & {"a"}}
    assert _cycle(graph) == ["a", "b", "a"]


def test_no_import_cycles() -> None:
    cycle = _cycle(_graph())
    assert cycle is None, f"import cycle among vmd modules: {' -> '.join(cycle)}"


@pytest.mark.parametrize("engine", ENGINE)
def test_engine_reaches_no_adapter(engine: str) -> None:
    """Transitively: an engine module importing a verbs module that imports
    admin would pull the socket into the engine all the same."""
    mods = _modules()
    assert engine in mods, f"vmd/{engine}.py is listed as engine but does not exist"
    graph = _graph()
    seen: dict[str, str] = {engine: ""}  # module → the module that imported it
    todo = [engine]
    while todo:
        n = todo.pop()
        for bad in FORBIDDEN:
            if bad in _imports(n, mods[n]):
                chain = [n]
                while seen[chain[-1]]:
                    chain.append(seen[chain[-1]])
                raise AssertionError(f"engine module vmd/{engine}.py reaches {bad} through "
                                     f"{' <- '.join(chain)}")
        for m in graph[n]:
            if m not in seen:
                seen[m] = n
                todo.append(m)


def _methods(tree: ast.Module, cls: str) -> set[str]:
    """The methods of class `cls` (not its properties: a property is data)."""
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == cls:
            return {f.name for f in node.body
                    if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                    and not any(isinstance(d, ast.Name) and d.id == "property"
                                for d in f.decorator_list)}
    raise AssertionError(f"no class {cls}")


def _assigned_attributes(node: ast.AST) -> list[ast.Attribute]:
    """The attributes a statement assigns or deletes, except `self.x` (an
    object setting up its own fields, which may share a name with a method of
    another class)."""
    targets: list[ast.expr] = []
    if isinstance(node, (ast.Assign, ast.Delete)):
        targets = list(node.targets)
    elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
        targets = [node.target]
    return [sub for t in targets for sub in ast.walk(t) if isinstance(sub, ast.Attribute)
            and not (isinstance(sub.value, ast.Name) and sub.value.id == "self")]


def _method_replacements(trees: dict[str, ast.Module], methods: set[str]) -> list[str]:
    """Where an attribute named like one of `methods` is assigned on another
    object (x.m = ..., x.m += ..., setattr(x, "m", ...)) or dropped from an
    instance's __dict__."""
    found: list[str] = []
    for name, tree in trees.items():
        for node in ast.walk(tree):
            for sub in _assigned_attributes(node):
                if sub.attr in methods:
                    found.append(f"vmd/{name}.py:{sub.lineno}: .{sub.attr} assigned")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                    and node.func.id in ("setattr", "delattr") and len(node.args) >= 2 \
                    and isinstance(node.args[1], ast.Constant) and node.args[1].value in methods:
                found.append(f"vmd/{name}.py:{node.lineno}: {node.func.id} of "
                             f"{node.args[1].value!r}")
            # vol.__dict__.pop("pread", None): undoing such a replacement
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and isinstance(node.func.value, ast.Attribute) \
                    and node.func.value.attr == "__dict__" and node.args \
                    and isinstance(node.args[0], ast.Constant) and node.args[0].value in methods:
                found.append(f"vmd/{name}.py:{node.lineno}: __dict__ {node.func.attr} of "
                             f"{node.args[0].value!r}")
    return found


def _fields_of_other_classes(trees: dict[str, ast.Module], cls: str) -> set[str]:
    """Data attributes that classes other than `cls` declare for themselves
    (`self.x = ...` in their methods, `x: T` in their bodies): `h.released =
    Event()` on a rangelock hold is that object's field, not Volume.released."""
    out: set[str] = set()
    for tree in trees.values():
        for c in ast.walk(tree):
            if not isinstance(c, ast.ClassDef) or c.name == cls:
                continue
            for node in ast.walk(c):
                if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                    out.add(node.target.id)
                for t in getattr(node, "targets", [getattr(node, "target", None)]):
                    if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) \
                            and t.value.id == "self":
                        out.add(t.attr)
    return out


def test_no_method_replaced_on_an_instance() -> None:
    trees = _modules()
    methods = _methods(trees["volume"], "Volume") - _fields_of_other_classes(trees, "Volume")
    assert {"pread", "pwrite", "flush"} <= methods
    found = _method_replacements(trees, methods)
    assert not found, "methods replaced on instances at run time:\n" + "\n".join(found)


def test_replacement_finder_sees_the_old_guard() -> None:
    """The check itself, on the pattern rcopy_recv.guard used to have."""
    old = ast.parse("def guard(vol):\n    vol.__dict__.pop('pread', None)\n"
                    "    vol.pwrite = pwrite\n    setattr(vol, 'flush', f)\n")
    found = _method_replacements({"old": old}, {"pread", "pwrite", "flush"})
    assert len(found) == 3, found
