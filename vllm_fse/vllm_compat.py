"""``vllm-fse check-vllm``: does a vLLM release still have everything the plugin touches?

Reads a vLLM source tree without importing it (a release that cannot run here, e.g. a CUDA
wheel, can still be checked): an unpacked wheel or checkout, a ``.whl`` file, or the installed
vLLM. It checks

- every name the plugin imports from ``vllm`` (found by parsing the plugin's own source, so the
  list cannot fall behind the code), and
- every target of :data:`vllm_fse.patches.PATCHES` with the parameters the plugin relies on
  (a callable must still take them, or ``**kwargs``); targets newer than the release
  (``since_vllm``) must be absent or present, either is fine.

Names are resolved the way Python would: definitions, assignments and re-exports
(``from x import y``) at module level, class attributes through the class's bases. Prints one
line per name and exits 1 if any is missing or lost a parameter.

To check a new release before users do::

    pip download vllm==X.Y.Z --no-deps -d /tmp/vllm-X.Y.Z      # no install, no GPU needed
    vllm-fse check-vllm /tmp/vllm-X.Y.Z/vllm-X.Y.Z-*.whl
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from packaging.version import InvalidVersion, Version

PLUGIN_DIR = Path(__file__).resolve().parent


class SourceTree:
    """Python files of a vLLM release, by module name: a directory holding ``vllm/`` or a wheel."""

    def __init__(self, location: Path) -> None:
        self.location = location
        self._zip = zipfile.ZipFile(location) if location.suffix == ".whl" else None
        self._trees: dict[str, ast.Module | None] = {}

    @classmethod
    def installed(cls) -> SourceTree:
        spec = importlib.util.find_spec("vllm")  # locates the package without importing it
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("vllm-fse check-vllm: no vllm installed; give a source tree or a wheel")
        return cls(Path(next(iter(spec.submodule_search_locations))).parent)

    def _read(self, relative: str) -> str | None:
        if self._zip is not None:
            try:
                return self._zip.read(relative).decode()
            except KeyError:
                return None
        path = self.location / relative
        return path.read_text() if path.is_file() else None

    def module(self, name: str) -> tuple[ast.Module, bool] | None:
        """The parsed module and whether it is a package (``__init__``)."""
        base = name.replace(".", "/")
        for relative, is_pkg in ((f"{base}.py", False), (f"{base}/__init__.py", True)):
            if relative not in self._trees:
                text = self._read(relative)
                self._trees[relative] = None if text is None else ast.parse(text, relative)
            if self._trees[relative] is not None:
                return self._trees[relative], is_pkg
        return None

    def version(self) -> str:
        found = self.module("vllm._version")
        if found:
            for node in found[0].body:
                if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "__version__" for t in node.targets):
                    return ast.literal_eval(node.value) if isinstance(node.value, ast.Constant) else "?"
        if self._zip is not None:
            match = re.search(r"vllm-([^-]+)-", self.location.name)
            if match:
                return match[1]
        return "?"


@dataclass
class Found:
    node: ast.AST | None  # def / class / assignment; None for a module or a plain import
    module: str


def _absolute(module: str, is_pkg: bool, level: int, target: str | None) -> str:
    if level == 0:
        return target or ""
    parts = module.split(".")[: None if is_pkg else -1]
    parts = parts[: len(parts) - (level - 1)]
    return ".".join(parts + ([target] if target else []))


def _defined_in(body: list[ast.stmt], name: str) -> ast.AST | None:
    hit = None
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            hit = node
        elif isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            hit = node
        elif isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == name:
            hit = node
        elif isinstance(node, (ast.If, ast.Try)):  # e.g. version- or platform-dependent definitions
            inner = _defined_in(node.body + getattr(node, "orelse", []), name)
            hit = inner or hit
    return hit


def resolve(tree: SourceTree, module: str, name: str, depth: int = 0) -> Found | None:
    """A module-level ``name`` of ``module``, following re-exports; a submodule also counts."""
    if depth > 10:
        return None
    found = tree.module(module)
    if found is None:
        return None
    mod, is_pkg = found
    node = _defined_in(mod.body, name)
    if node is not None:
        return Found(node, module)
    for stmt in ast.walk(mod):
        if isinstance(stmt, ast.ImportFrom):
            if stmt.names[0].name == "*":
                hit = resolve(tree, _absolute(module, is_pkg, stmt.level, stmt.module), name, depth + 1)
                if hit is not None:
                    return hit
                continue
            for alias in stmt.names:
                if (alias.asname or alias.name) == name:
                    source = _absolute(module, is_pkg, stmt.level, stmt.module)
                    return resolve(tree, source, alias.name, depth + 1) or (
                        Found(None, f"{source}.{alias.name}") if tree.module(f"{source}.{alias.name}") else None
                    )
    if tree.module(f"{module}.{name}"):
        return Found(None, f"{module}.{name}")
    return None


def resolve_attribute(tree: SourceTree, cls: Found, attr: str, depth: int = 0) -> Found | None:
    """``attr`` of a class (its body, then its bases, resolved in the class's module)."""
    if depth > 10 or not isinstance(cls.node, ast.ClassDef):
        return None
    node = _defined_in(cls.node.body, attr)
    if node is not None:
        return Found(node, cls.module)
    for base in cls.node.bases:
        base_name = base.id if isinstance(base, ast.Name) else base.attr if isinstance(base, ast.Attribute) else None
        if base_name:
            base_cls = resolve(tree, cls.module, base_name)
            if base_cls is not None:
                hit = resolve_attribute(tree, base_cls, attr, depth + 1)
                if hit is not None:
                    return hit
    return None


def lookup(tree: SourceTree, module: str, dotted: str) -> Found | None:
    first, *rest = dotted.split(".")
    found = resolve(tree, module, first)
    for attr in rest:
        if found is None:
            return None
        if found.node is None and tree.module(found.module):  # a submodule
            found = resolve(tree, found.module, attr)
        elif isinstance(found.node, ast.Assign) and isinstance(found.node.value, ast.Call):
            # ``x = SomeClass(...)``: the attribute is the class's
            callee = found.node.value.func
            cls_name = callee.id if isinstance(callee, ast.Name) else None
            found = resolve_attribute(tree, resolve(tree, found.module, cls_name), attr) if cls_name else None
        else:
            found = resolve_attribute(tree, found, attr)
    return found


def parameters(node: ast.AST | None) -> tuple[set[str], bool] | None:
    """(parameter names, takes **kwargs) of a def, or of a class's ``__init__``; None if neither."""
    if isinstance(node, ast.ClassDef):
        node = _defined_in(node.body, "__init__")
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return None
    a = node.args
    names = {p.arg for p in a.posonlyargs + a.args + a.kwonlyargs}
    return names, a.kwarg is not None


# -- what the plugin uses ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Use:
    module: str
    name: str  # "Class.attr" for an attribute
    where: str
    params: tuple[str, ...] = ()
    since_vllm: str = ""
    optional: bool = False  # imported under ``except ImportError``: the plugin copes without it


def plugin_imports() -> list[Use]:
    """Every ``from vllm... import name`` in the plugin's source (vllm_fse/ and its tools)."""
    uses = []
    for path in sorted(PLUGIN_DIR.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        optional = {
            id(inner)
            for node in ast.walk(tree)
            if isinstance(node, ast.Try)
            and any("ImportError" in ast.unparse(h.type or ast.Name("")) for h in node.handlers)
            for inner in ast.walk(ast.Module(body=node.body, type_ignores=[]))
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "vllm":
                where = f"{path.relative_to(PLUGIN_DIR.parent)}:{node.lineno}"
                uses += [Use(node.module, a.name, where, optional=id(node) in optional) for a in node.names]
    return uses


def patch_targets() -> list[Use]:
    from vllm_fse.patches import PATCHES

    return [
        Use(p.module, p.name, "vllm_fse/patches.py", p.params, p.since_vllm)
        for p in PATCHES
        if p.module.split(".")[0] == "vllm"
    ]


def older_than(version: str, since: str) -> bool:
    """Whether release ``version`` predates ``since`` (an unreadable version does not)."""
    try:
        return Version(version) < Version(since)
    except InvalidVersion:
        return False


def check(tree: SourceTree) -> list[tuple[Use, str, bool]]:
    """(use, problem or "", found) for every use; a problem is "missing" or the parameters lost.
    An optional import, or a target newer than the release, may be absent without a problem."""
    results = []
    version = tree.version()
    seen = set()
    for use in patch_targets() + plugin_imports():
        key = (use.module, use.name, use.params)
        if key in seen:
            continue
        seen.add(key)
        found = lookup(tree, use.module, use.name)
        if found is None:
            new = use.since_vllm and older_than(version, use.since_vllm)
            results.append((use, "" if new or use.optional else "missing", False))
            continue
        problem = ""
        if use.params:
            sig = parameters(found.node)
            if sig is not None:
                names, var_kw = sig
                lost = [p for p in use.params if p not in names and not var_kw]
                problem = f"lost parameters {lost}" if lost else ""
        results.append((use, problem, True))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vllm-fse check-vllm", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", nargs="?", help="vLLM source dir (holding vllm/) or .whl; default: installed")
    args = parser.parse_args(argv)
    tree = SourceTree(Path(args.source)) if args.source else SourceTree.installed()
    results = check(tree)
    bad = [problem for _, problem, _ in results if problem]
    print(f"vLLM {tree.version()} at {tree.location}: {len(results)} names the plugin uses, {len(bad)} problems")
    for use, problem, found in results:
        status = "FAIL" if problem else "ok  " if found else "n/a "
        print(f"  {status} {use.module}.{use.name}  ({use.where}){'  ' + problem if problem else ''}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
