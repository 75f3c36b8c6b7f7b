"""The project's file-writing helpers: one atomic write, one JSON rule, one checkpoint writer.

``atomic_write`` leaves a reader either the old file or the complete new one, never a partial
write, on local paths and on ``pyarrow.fs`` filesystems (how depends on the filesystem; see its
docstring). Temporary files are named ``.<name>.<uuid>.tmp`` beside the target: the leading dot
makes the artifact store's listing and the proposal cache's reader skip one a crash left behind.

Every JSON file goes through ``write_json``, so every JSON file follows one rule: NaN, +inf and
-inf become ``null`` (JSON has none of them).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import uuid
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO

import pyarrow.fs as pafs
import torch

# ``FileSystem.type_name`` of object stores: a PUT (an upload completed on close) is atomic there,
# while a "rename" is a copy plus a delete.
OBJECT_STORES = frozenset({"s3", "gcs", "abfs"})

Payload = bytes | bytearray | memoryview  # or anything with the buffer protocol, e.g. a pyarrow.Buffer
Writer = Callable[[BinaryIO], object]  # writes the content into the binary file object it is given


def atomic_write(path: str | os.PathLike, data: Payload | Writer, *, filesystem: pafs.FileSystem | None = None) -> None:
    """Write ``data`` to ``path`` atomically, creating missing parent directories.

    ``data`` is the content, or a callback that streams it into the binary file object it is
    passed (``lambda f: torch.save(state, f)``), so a large object is never built in memory.
    ``path`` is a local path when ``filesystem`` is None, else a path inside ``filesystem``.
    The filesystem's type decides how:

    - local (None or ``pyarrow.fs.LocalFileSystem``): a temporary file in the target's
      directory, flushed and fsynced, then ``os.replace``; the file gets the usual permissions
      (umask), not ``mkstemp``'s 0600.
    - object stores (``OBJECT_STORES``: S3, GCS, Azure): a direct write, since an object appears
      whole when its upload completes. An upload cannot be aborted through pyarrow (closing it
      completes it), so a callback's output is first spooled to a local temporary file and
      uploaded only once the callback has returned.
    - any other filesystem (HDFS, fsspec via ``PyFileSystem``, ``SubTreeFileSystem``): a unique
      temporary name in the target's directory, then ``filesystem.move`` over the target.

    On any failure the target is left as it was and the temporary file is removed.
    """
    if filesystem is None or filesystem.type_name == "local":
        _write_local(os.fspath(path), data)
    elif filesystem.type_name in OBJECT_STORES:
        _write_object(filesystem, os.fspath(path), data)
    else:
        _write_renamed(filesystem, os.fspath(path), data)


def filesystem_for(root: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path inside it)`` of a local path (made absolute) or of a URI that
    ``pyarrow.fs.FileSystem.from_uri`` accepts (``s3://bucket/prefix``); no trailing slash.
    Raises pyarrow's error (a ``ValueError`` or ``OSError``) for an unusable URI."""
    root = os.fspath(root)
    if "://" in root:
        fs, path = pafs.FileSystem.from_uri(root)
        return fs, path.rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(root)


def json_safe(obj: Any) -> Any:
    """``obj`` with every NaN, +inf and -inf float replaced by None, recursively through mappings
    (into dicts), lists and tuples (into lists); anything else is returned as is."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(
    path: str | os.PathLike,
    obj: Any,
    *,
    indent: int | None = None,
    sort_keys: bool = False,
    filesystem: pafs.FileSystem | None = None,
) -> None:
    """Write ``json_safe(obj)`` as UTF-8 JSON (non-ASCII characters kept as is) with ``atomic_write``."""
    text = json.dumps(json_safe(obj), indent=indent, sort_keys=sort_keys, ensure_ascii=False, allow_nan=False)
    atomic_write(path, text.encode("utf-8"), filesystem=filesystem)


def save_torch(state: Any, path: str | os.PathLike, *, filesystem: pafs.FileSystem | None = None) -> None:
    """``torch.save(state, ...)`` streamed into ``path`` with ``atomic_write``. Keep ``state`` to
    tensors, numbers, strings and containers of them so that ``torch.load(weights_only=True)``
    reads it back."""
    atomic_write(path, lambda f: torch.save(state, f), filesystem=filesystem)


class ArtifactError(ValueError):
    """A stored file that does not read back as what it should be; the message names it."""


def load_torch(path: str | os.PathLike) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``; a file that does not load
    raises ArtifactError naming it (instead of torch's advice to retry with ``weights_only=False``,
    which is unsafe, and wrong for a damaged file)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ArtifactError(f"{path}: does not load as a checkpoint, it is damaged or not one of ours "
                            f"({type(e).__name__}: {detail[:200]}); the next run rebuilds a damaged node, or "
                            "re-run it with --force") from None


def _write_to(f: BinaryIO, data: Payload | Writer) -> None:
    if callable(data):
        data(f)
    else:
        f.write(data)


def _temp_path(path: str) -> str:
    """A unique temporary name beside ``path`` (same directory, so a rename stays within it)."""
    directory, sep, name = path.rpartition("/")
    return f"{directory}{sep}.{name}.{uuid.uuid4().hex}.tmp"


def _write_local(path: str, data: Payload | Writer) -> None:
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = _temp_path(path)
    try:
        with open(tmp, "xb") as f:
            _write_to(f, data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _write_object(fs: pafs.FileSystem, path: str, data: Payload | Writer) -> None:
    if not callable(data):
        with fs.open_output_stream(path, compression=None) as f:
            f.write(data)
        return
    with tempfile.TemporaryFile() as spool:
        data(spool)
        spool.seek(0)
        with fs.open_output_stream(path, compression=None) as f:
            f.upload(spool)


def _write_renamed(fs: pafs.FileSystem, path: str, data: Payload | Writer) -> None:
    directory = path.rpartition("/")[0]
    if directory:
        fs.create_dir(directory, recursive=True)
    tmp = _temp_path(path)
    try:
        with fs.open_output_stream(tmp, compression=None) as f:
            _write_to(f, data)
        fs.move(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # the temporary may not exist; the original error is the one to raise
            fs.delete_file(tmp)
        raise
