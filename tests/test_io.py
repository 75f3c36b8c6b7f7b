"""stages.common.io: atomic writes on every kind of filesystem, the one JSON rule, torch checkpoints."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch

from stages.common import io as sio


class Boom(RuntimeError):
    pass


def memory_fs():
    """A pyarrow view of fsspec's in-memory filesystem (one store per process: use unique paths)."""
    fsspec = pytest.importorskip("fsspec")
    return pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem("memory")))


def read(fs, path) -> bytes:
    if fs is None:
        with open(path, "rb") as f:
            return f.read()
    with fs.open_input_stream(path, compression=None) as f:
        return f.read()


def listing(fs, directory) -> list[str]:
    if fs is None:
        return sorted(os.listdir(directory))
    return sorted(info.base_name for info in fs.get_file_info(pafs.FileSelector(directory)))


@pytest.fixture(params=["local_path", "local_filesystem", "renaming_filesystem", "object_store"])
def target(request, tmp_path, monkeypatch):
    """(filesystem, directory) for each branch of atomic_write; the object store is a memory
    filesystem that atomic_write is told to treat as one."""
    if request.param == "local_path":
        return None, str(tmp_path)
    if request.param == "local_filesystem":
        return pafs.LocalFileSystem(), str(tmp_path)
    fs = memory_fs()
    if request.param == "object_store":
        monkeypatch.setattr(sio, "OBJECT_STORES", sio.OBJECT_STORES | {fs.type_name})
    return fs, f"/{tmp_path.name}/dir"


def test_atomic_write_bytes_and_writer(target):
    fs, directory = target
    path = f"{directory}/sub/out.bin"  # the parent directory is created
    sio.atomic_write(path, b"first", filesystem=fs)
    assert read(fs, path) == b"first"
    sio.atomic_write(path, lambda f: [f.write(b"second, "), f.write(b"streamed")], filesystem=fs)
    assert read(fs, path) == b"second, streamed"
    assert listing(fs, f"{directory}/sub") == ["out.bin"]


def test_failing_writer_keeps_the_old_file_and_leaves_no_temporary(target):
    fs, directory = target
    path = f"{directory}/out.bin"
    sio.atomic_write(path, b"old", filesystem=fs)

    def fail_halfway(f):
        f.write(b"partial new content")
        raise Boom

    with pytest.raises(Boom):
        sio.atomic_write(path, fail_halfway, filesystem=fs)
    assert read(fs, path) == b"old"
    assert listing(fs, directory) == ["out.bin"]


def test_local_file_gets_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        sio.atomic_write(tmp_path / "a.txt", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600


def test_json_safe_nulls_nan_and_both_infinities_recursively():
    obj = {"a": math.nan, "b": [1.0, math.inf, (-math.inf, 2)], "c": {"d": np.float64("nan"), "e": "nan"}, "f": None, "g": 3}
    assert sio.json_safe(obj) == {"a": None, "b": [1.0, None, [None, 2]], "c": {"d": None, "e": "nan"}, "f": None, "g": 3}
    assert sio.json_safe(1e308) == 1e308 and sio.json_safe(-0.0) == 0.0


def test_write_json(tmp_path):
    path = tmp_path / "m.json"
    sio.write_json(path, {"b": math.inf, "a": [math.nan, 0.5], "name": "Zürich"}, indent=2, sort_keys=True)
    text = path.read_bytes().decode("utf-8")
    assert "Zürich" in text and text.index('"a"') < text.index('"b"') and "\n  " in text
    assert json.loads(text, parse_constant=pytest.fail) == {"a": [None, 0.5], "b": None, "name": "Zürich"}


def test_write_json_on_a_pyarrow_local_filesystem(tmp_path):
    path = str(tmp_path / "x" / "m.json")
    sio.write_json(path, {"v": -math.inf}, filesystem=pafs.LocalFileSystem())
    assert json.loads(open(path, encoding="utf-8").read()) == {"v": None}


@pytest.mark.parametrize("on_memory_fs", [False, True])
def test_save_torch_round_trip(tmp_path, on_memory_fs):
    state = {"model": {"w": torch.randn(3, 4), "b": torch.arange(4)}, "epoch": 2, "history": [{"loss": 0.5}]}
    fs, path = (memory_fs(), f"/{tmp_path.name}/model.pt") if on_memory_fs else (None, str(tmp_path / "model.pt"))
    sio.save_torch(state, path, filesystem=fs)
    local = path if fs is None else tmp_path / "copy.pt"
    if fs is not None:
        local.write_bytes(read(fs, path))
    loaded = torch.load(local, weights_only=True)
    assert loaded["epoch"] == 2 and loaded["history"] == [{"loss": 0.5}]
    torch.testing.assert_close(loaded["model"]["w"], state["model"]["w"])
    torch.testing.assert_close(loaded["model"]["b"], state["model"]["b"])
