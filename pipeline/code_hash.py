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
from functools import cache
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


def _imports(name: str, path: Path) -> tuple[set[str], set[str]]:
    """(project module names, third-party top-level names) that module ``name`` imports."""
    tree = ast.parse(path.read_bytes(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
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
    project = {c for c in candidates if c.split(".")[0] in PROJECT_PACKAGES}
    third_party = {c.split(".")[0] for c in candidates if c and c.split(".")[0] not in PROJECT_PACKAGES}
    return project, {t for t in third_party if t not in sys.stdlib_module_names}


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
