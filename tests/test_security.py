"""Nothing the pipeline reads back can execute code: checkpoints load with ``weights_only=True``
(a crafted pickle is refused before it runs), and no project module deserialises with pickle,
marshal or a YAML loader that builds objects."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from stages.common.io import ArtifactError, load_torch

ROOT = Path(__file__).resolve().parents[1]
PROJECT = [p for package in ("pipeline", "stages", "ga_models", "benchmarks") for p in (ROOT / package).rglob("*.py")]
UNSAFE_MODULES = {"pickle", "cPickle", "dill", "marshal", "shelve", "cloudpickle", "joblib"}
UNSAFE_YAML = {"load", "unsafe_load", "full_load", "load_all", "unsafe_load_all", "full_load_all"}


class _Payload:
    """Pickles into a call of ``Path.touch`` on ``target``: loading it would create the file."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def test_a_crafted_pickle_checkpoint_is_refused_before_it_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    torch.save({"state": _Payload(marker)}, path)  # a well-formed checkpoint file with a code-running object
    with pytest.raises(ArtifactError, match=f"{path}: does not load as a checkpoint"):
        load_torch(path)
    assert not marker.exists()


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name):
            yield node, node.func.value.id, node.func.attr


def test_no_project_module_deserialises_executable_data():
    assert len(PROJECT) > 30
    for path in PROJECT:
        tree = ast.parse(path.read_text(), filename=str(path))
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        assert not imported & UNSAFE_MODULES, f"{path}: imports {imported & UNSAFE_MODULES}"
        for call, owner, attr in _calls(tree):
            where = f"{path}:{call.lineno}"
            assert not (owner == "yaml" and attr in UNSAFE_YAML), f"{where}: yaml.{attr} (use yaml.safe_load)"
            if owner == "torch" and attr == "load":
                flags = {k.arg: k.value for k in call.keywords}
                assert isinstance(flags.get("weights_only"), ast.Constant) and flags["weights_only"].value is True, (
                    f"{where}: torch.load without weights_only=True")
