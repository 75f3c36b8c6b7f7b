"""The code part of a node's cache key, derived from the imports of its stage module.

``code_digest("stages.eval_proposals")`` hashes the source of that module and of every project
module it imports, transitively (read with ``ast``, so imports inside functions count too),
plus the ``__init__`` of every package on the way (Python runs them on import), plus the
versions of the third-party distributions those modules import (torch, pycocotools, ...).
The standard library is left out. So an edit to any module a stage can execute re-keys that
stage's nodes, and nothing else; no list of modules is kept by hand.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import sys
from functools import cache, lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = ("pipeline", "stages", "ga_models")


def module_file(name: str, root: Path = ROOT) -> Path | None:
    """The source file of project module ``name`` under ``root``, or None if there is none."""
    base = root.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imports(name: str, path: Path) -> tuple[frozenset[str], frozenset[str]]:
    """(project module names, third-party top-level names) that module ``name`` imports."""
    return _source_imports(name, path.name == "__init__.py", path.read_bytes(), str(path))


@lru_cache(maxsize=4096)
def _source_imports(name: str, is_package: bool, source: bytes, filename: str) -> tuple[frozenset[str], frozenset[str]]:
    """``_imports`` of one module's source, parsed once per process and content (a plan keys every
    node, and each node's closure walks mostly the same modules)."""
    tree = ast.parse(source, filename=filename)
    package = name if is_package else name.rpartition(".")[0]
    candidates: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            candidates.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            candidates.add(base)
            candidates.update(f"{base}.{alias.name}" for alias in node.names)  # names may be submodules
    project = frozenset(c for c in candidates if c.split(".")[0] in PROJECT_PACKAGES)
    third_party = {c.split(".")[0] for c in candidates if c and c.split(".")[0] not in PROJECT_PACKAGES}
    return project, frozenset(t for t in third_party if t not in sys.stdlib_module_names)


def import_closure(name: str, root: Path = ROOT) -> tuple[dict[str, Path], set[str]]:
    """``({module name: source file}, third-party top-level names)`` of everything importing
    ``name`` executes: the module, its packages' ``__init__`` files, and transitively whatever
    they import from the project."""
    files: dict[str, Path] = {}
    third_party: set[str] = set()
    todo = [name]
    while todo:
        current = todo.pop()
        if current in files:
            continue
        path = module_file(current, root)
        if path is None:  # an imported name that is not a module (a function, a class)
            continue
        files[current] = path
        parts = current.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # parent packages run first
        project, external = _imports(current, path)
        todo.extend(project)
        third_party |= external
    return files, third_party


@cache
def _distribution_versions() -> dict[str, str]:
    """Top-level import name -> "dist==version" of the installed distributions providing it."""
    out: dict[str, str] = {}
    for top, dists in importlib.metadata.packages_distributions().items():
        versions = []
        for dist in sorted(set(dists)):
            try:
                versions.append(f"{dist}=={importlib.metadata.version(dist)}")
            except importlib.metadata.PackageNotFoundError:
                continue
        out[top] = ",".join(versions)
    return out


def code_digest(name: str, root: Path = ROOT) -> str:
    """sha256 of the sources of ``import_closure(name)`` and the versions of its third-party imports."""
    files, third_party = import_closure(name, root)
    versions = _distribution_versions()
    digest = hashlib.sha256()
    for module in sorted(files):
        digest.update(f"{module}\n".encode())
        digest.update(files[module].read_bytes())
    for top in sorted(third_party):
        digest.update(f"{top}={versions.get(top, '?')}\n".encode())
    return digest.hexdigest()
