"""``vllm-fse check-vllm``: does a vLLM release still have everything the plugin touches?

Reads a vLLM source tree without importing it (a release that cannot run here, e.g. a CUDA
wheel, can still be checked): an unpacked wheel or checkout, a ``.whl`` file, or the installed
vLLM. It checks

- every name the plugin imports from ``vllm`` (found by parsing the plugin's own source, so the
  list cannot fall behind the code), and
- every target of :data:`vllm_fse.patches.PATCHES` with the parameters the plugin relies on
  (a callable must still take them, or ``**kwargs``); targets newer than the release
  (``since_vllm``) must be absent or present, either is fine;
- every function the plugin wraps: no parameter the wrapper would drop, and no module that
  imports it by name (``from ... import f`` keeps the original) beyond those the plugin binds too;
- every architecture the plugin replaces: vLLM's registry table must resolve it to the class
  the plugin's class subclasses (or the plugin's class must follow the registry).

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

    def where_is_vllm(self) -> str | None:
        """None if this tree holds ``vllm/``; else what is wrong, saying where ``vllm/`` is."""
        if self._zip is not None:
            return None if "vllm/__init__.py" in self._zip.namelist() else f"{self.location} has no vllm/ package"
        if (self.location / "vllm" / "__init__.py").is_file():
            return None
        if self.location.name == "vllm" and (self.location / "__init__.py").is_file():
            return f"{self.location} is the vllm package itself: give the folder that holds it, {self.location.parent}"
        below = sorted(p.parent.parent for p in self.location.glob("*/vllm/__init__.py"))
        if below:
            return f"{self.location} holds no vllm/ package; it is under {below[0]}: give that folder"
        return f"{self.location} holds no vllm/ package (an unpacked wheel, a checkout, or a .whl)"

    def module_names(self) -> list[str]:
        """Every Python module of the tree, by dotted name."""
        if self._zip is not None:
            files = [n for n in self._zip.namelist() if n.startswith("vllm/") and n.endswith(".py")]
        else:
            files = [p.relative_to(self.location).as_posix() for p in (self.location / "vllm").rglob("*.py")]
        return sorted(f.removesuffix(".py").removesuffix("/__init__").replace("/", ".") for f in files)

    def text(self, module: str) -> str | None:
        base = module.replace(".", "/")
        return self._read(f"{base}.py") or self._read(f"{base}/__init__.py")

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


def wrapped_function_problems(tree: SourceTree, patch, found: Found) -> list[str]:
    """A wrapped function's parameters the wrapper does not take, and the modules that import it
    by name but are not among those the plugin binds the wrapper in."""
    problems = []
    sig = parameters(found.node)
    if sig is not None:
        new = sorted(sig[0] - set(patch.params) - set(patch.wrapper_params))
        if new:
            problems.append(f"new parameters {new} the wrapper would drop")
    importers = []
    for module in tree.module_names():
        if module == patch.module:
            continue
        text = tree.text(module)
        if text is None or patch.name not in text:
            continue
        found_mod = tree.module(module)
        for node in ast.walk(found_mod[0]):
            if isinstance(node, ast.ImportFrom) and any(a.name == patch.name for a in node.names):
                if _absolute(module, found_mod[1], node.level, node.module) == patch.module:
                    importers.append(module)
                    break
    unbound = [m for m in importers if m not in patch.imported_by]
    if unbound:
        problems.append(f"imported by name in {unbound}, where the wrapper is not bound")
    return problems


REGISTRY_MODULE = "vllm.model_executor.models.registry"


def registry_table(tree: SourceTree) -> dict[str, tuple[str, str]]:
    """Architecture -> (module, class) as vLLM's registry table resolves it (its
    ``_resolve_module_name``: names relative to ``vllm.model_executor.models`` unless absolute)."""
    found = tree.module(REGISTRY_MODULE)
    table = {}
    for node in ast.walk(found[0]) if found else ():
        if not isinstance(node, ast.Dict):
            continue
        for key, value in zip(node.keys, node.values):
            if (isinstance(key, ast.Constant) and isinstance(key.value, str) and isinstance(value, ast.Tuple)
                    and len(value.elts) == 2 and all(isinstance(e, ast.Constant) and isinstance(e.value, str)
                                                     for e in value.elts)):  # fmt: skip
                module, cls = (e.value for e in value.elts)
                table[key.value] = (module if module.startswith("vllm.") else f"vllm.model_executor.models.{module}", cls)
    return table


def plugin_upstream_base(target: str) -> tuple[str, ...] | None:
    """What the plugin's class ``module:Class`` subclasses upstream, read from its source:
    ``("import", module, class)`` for ``from vllm... import Class as X``, ``("registry", arch)`` for
    ``X = vllm_model_class(arch)``; None if neither is found."""
    module, cls = target.split(":")
    path = PLUGIN_DIR.parent / (module.replace(".", "/") + ".py")
    tree = ast.parse(path.read_text(), str(path))
    names: dict[str, tuple] = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vllm."):
            for alias in node.names:
                names[alias.asname or alias.name] = ("import", node.module, alias.name)
        elif (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
              and getattr(node.value.func, "id", "") == "vllm_model_class" and node.value.args):  # fmt: skip
            for target_name in node.targets:
                names[getattr(target_name, "id", "")] = ("registry", ast.literal_eval(node.value.args[0]))
        elif isinstance(node, ast.ClassDef):
            names[node.name] = ("class", [getattr(b, "id", "") for b in node.bases])

    def walk(name: str, depth: int = 0):
        origin = names.get(name)
        if origin is None or depth > 5:
            return None
        if origin[0] != "class":
            return origin
        return next((hit for base in origin[1] if (hit := walk(base, depth + 1))), None)

    return walk(cls)


def registry_problems(tree: SourceTree) -> list[tuple[Use, str, bool]]:
    """For every architecture the plugin replaces: does vLLM's registry resolve it to the class
    the plugin's class subclasses?"""
    from vllm_fse import MODEL_OVERRIDES

    table = registry_table(tree)
    results = []
    for arch, target in MODEL_OVERRIDES.items():
        use = Use(REGISTRY_MODULE, arch, target.split(":")[0].replace(".", "/") + ".py")
        entry = table.get(arch)
        base = plugin_upstream_base(target)
        if entry is None:
            results.append((use, "not in vLLM's registry table", False))
        elif base is None:
            results.append((use, f"no upstream base class found in {target}", True))
        elif base[0] == "registry":
            results.append((use, "" if base[1] == arch else f"follows the registry entry of {base[1]}", True))
        else:
            _, module, cls = base
            same = (module, cls) == entry
            if not same:
                ours, theirs = lookup(tree, module, cls), lookup(tree, *entry)
                same = ours is not None and theirs is not None and ours.node is theirs.node
            problem = "" if same else (
                f"vLLM resolves it to {entry[0]}:{entry[1]}, the plugin's class subclasses {module}:{cls}"
            )
            results.append((use, problem, True))
    return results


def check(tree: SourceTree) -> list[tuple[Use, str, bool]]:
    """(use, problem or "", found) for every use; a problem is "missing" or the parameters lost.
    An optional import, or a target newer than the release, may be absent without a problem."""
    from vllm_fse.patches import PATCHES

    wrapped = {(p.module, p.name): p for p in PATCHES if p.kind == "wrap"}
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
        if not problem and (use.module, use.name) in wrapped:
            problem = "; ".join(wrapped_function_problems(tree, wrapped[(use.module, use.name)], found))
        results.append((use, problem, True))
    return results + registry_problems(tree)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vllm-fse check-vllm", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", nargs="?", help="vLLM source dir (holding vllm/) or .whl; default: installed")
    args = parser.parse_args(argv)
    tree = SourceTree(Path(args.source)) if args.source else SourceTree.installed()
    wrong_folder = tree.where_is_vllm()
    if wrong_folder:
        print(f"vllm-fse check-vllm: {wrong_folder}", file=sys.stderr)
        return 2
    results = check(tree)
    bad = [problem for _, problem, _ in results if problem]
    print(f"vLLM {tree.version()} at {tree.location}: {len(results)} names the plugin uses, {len(bad)} problems")
    for use, problem, found in results:
        status = "FAIL" if problem else "ok  " if found else "n/a "
        print(f"  {status} {use.module}.{use.name}  ({use.where}){'  ' + problem if problem else ''}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
