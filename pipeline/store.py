"""Artifact store: node outputs under ``<root>/<stage>/<key>/``, complete only once
``manifest.json`` has been written, last and atomically.

``root`` is a local path or a URI that ``pyarrow.fs.FileSystem.from_uri`` accepts
(``s3://bucket/prefix``, ``gs://...``) so that a cluster's workers share one store.

``manifest.json``::

    {"stage": "train", "variant": "rpn", "key": "<cache key>",
     "files": [{"path": "model.pt", "bytes": 123, "sha256": "...", "mtime_ns": ...}, ...],  # every other file
     "metrics": {...}, "outputs": {...}, "config": {...},                 # node-specific
     "run_id": "<MLflow run that produced it>", "created": <unix time>, "seconds": <duration>}

A node directory without a manifest is partial (its producer died) and is cleared before the
node runs again; a manifest whose files do not match the listing (missing, wrong size, or wrong
checksum) marks the node damaged, so it is rebuilt rather than used. The checksum is computed
only for a file whose modification time is not the one recorded at commit (a same-size
corruption, a copy, a restore), so checking a whole store costs a listing, not a read.
The manifest is the one integrity layer: formats inside a node (e.g. the Parquet proposal
cache) keep no checksums of their own.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow.fs as pafs

from stages.common.io import filesystem_for, json_safe, write_json

MANIFEST = "manifest.json"
_CHUNK = 1 << 20


class StoreError(ValueError):
    """The store root is unusable or a manifest is malformed; the message names it."""


class ArtifactStore:
    def __init__(self, root: str | os.PathLike, local_cache: str | os.PathLike | None = None) -> None:
        root = os.fspath(root)
        try:
            self.fs, self._base = filesystem_for(root)
        except (ValueError, OSError) as e:  # pyarrow's ArrowInvalid is a ValueError
            raise StoreError(f"storage root {root!r}: {e}") from None
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)
        if self.is_local and os.path.exists(self._base) and not os.path.isdir(self._base):
            raise StoreError(f"storage root {root}: exists and is not a directory")
        self.root = root.rstrip("/") if "://" in root else self._base
        self._local_cache = Path(local_cache or Path(tempfile.gettempdir(), "ga-pipeline-cache"))

    def __reduce__(self):
        return (ArtifactStore, (self.root, self._local_cache))

    # ---- locations -------------------------------------------------------------------------

    def path(self, *parts: str) -> str:
        """A path inside the store's filesystem."""
        return "/".join([self._base, *parts])

    def uri(self, *parts: str) -> str:
        """A path (local root) or URI (remote root) that pyarrow and Ray accept."""
        return "/".join([self.root, *parts])

    def local_dir(self, stage: str, key: str) -> Path:
        """Where a consumer reads node files locally: the node directory itself for a local root,
        else a download into the local cache, each file's sha256 checked against the manifest.

        The local copy is named by the store, the key and a digest of the manifest's file list, so
        a node rebuilt under the same key (``--force``) is fetched again, and tasks on one machine
        fetching the same node at once never remove a copy another one reads."""
        if self.is_local:
            return Path(self.path(stage, key))
        manifest = self.read_manifest(stage, key)
        if manifest is None:
            raise StoreError(f"{self.uri(stage, key)}: no manifest, the node is not complete")
        digest = hashlib.sha256(json.dumps([self.root, manifest["files"]], sort_keys=True).encode()).hexdigest()[:16]
        dest = self._local_cache / stage / f"{key}-{digest}"
        if (dest / MANIFEST).exists():
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{key}."))
        try:
            for entry in manifest["files"]:
                self._download(self.path(stage, key, entry["path"]), tmp / entry["path"], entry)
            write_json(tmp / MANIFEST, manifest)
            try:
                os.rename(tmp, dest)
            except OSError:
                if not (dest / MANIFEST).exists():
                    raise
                shutil.rmtree(tmp)  # another task on this machine fetched the same files first
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return dest

    # ---- node state ------------------------------------------------------------------------

    def read_manifest(self, stage: str, key: str) -> dict | None:
        """The node's manifest, or None when there is none (or it is unreadable)."""
        try:
            with self.fs.open_input_stream(self.path(stage, key, MANIFEST), compression=None) as f:
                manifest = json.loads(f.read())
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        except OSError as e:
            if "not found" in str(e).lower() or "no such file" in str(e).lower():
                return None
            raise
        return manifest if isinstance(manifest, dict) and "files" in manifest else None

    def check(self, stage: str, key: str) -> tuple[dict | None, str]:
        """``(manifest, "")`` for a complete, intact node; ``(None, why)`` otherwise: every listed
        file present with its size, and its sha256 unless its mtime is the one recorded at commit."""
        manifest = self.read_manifest(stage, key)
        if manifest is None:
            exists = self.fs.get_file_info(self.path(stage, key)).type == pafs.FileType.Directory
            return None, "partial output (no manifest)" if exists else "no output yet"
        files = self._listing(stage, key)
        for entry in manifest["files"]:
            info = files.get(entry["path"])
            if info is None:
                return None, f"damaged output: {entry['path']} is missing"
            if info.size != entry["bytes"]:
                return None, f"damaged output: {entry['path']} is {info.size} bytes, manifest says {entry['bytes']}"
            if (entry.get("mtime_ns") is None or info.mtime_ns != entry["mtime_ns"]) and \
                    self._sha256(self.path(stage, key, entry["path"])) != entry["sha256"]:
                return None, f"damaged output: {entry['path']} differs from the manifest's sha256"
        return manifest, ""

    def clear(self, stage: str, key: str) -> None:
        """Delete a node directory (partial or to be rebuilt)."""
        path = self.path(stage, key)
        if self.fs.get_file_info(path).type == pafs.FileType.Directory:
            self.fs.delete_dir(path)

    def prepare(self, stage: str, key: str) -> Path:
        """An empty local directory for the node's producer to write into: the node directory
        itself for a local root, else a staging directory that ``upload`` copies to the store."""
        self.clear(stage, key)
        if self.is_local:
            path = Path(self.path(stage, key))
            path.mkdir(parents=True)
            return path
        staging = self._local_cache / "staging" / stage / key
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        return staging

    def upload(self, stage: str, key: str, staging: Path) -> None:
        """Copy what a producer wrote into ``staging`` (from ``prepare``) to the node directory
        and remove ``staging`` (nothing to do for a local root, where it is the node directory)."""
        if self.is_local:
            return
        for path in sorted(p for p in staging.rglob("*") if p.is_file()):
            rel = path.relative_to(staging).as_posix()
            self.fs.create_dir(self.path(stage, key, *rel.split("/")[:-1]), recursive=True)
            with open(path, "rb") as src, self.fs.open_output_stream(self.path(stage, key, rel), compression=None) as dst:
                shutil.copyfileobj(src, dst, _CHUNK)
        shutil.rmtree(staging)

    def commit(self, stage: str, key: str, record: dict) -> dict:
        """Write the manifest listing every file now in the node directory with its size and
        sha256, plus ``record`` (metrics, outputs, config, run_id, ...): the node is complete.
        Returns the manifest."""
        files = [{"path": rel, "bytes": info.size, "sha256": self._sha256(self.path(stage, key, rel)),
                  "mtime_ns": info.mtime_ns} for rel, info in sorted(self._listing(stage, key).items())]
        manifest = json_safe({"stage": stage, "key": key, "files": files, "created": time.time(), **record})
        write_json(self.path(stage, key, MANIFEST), manifest, indent=1, filesystem=self.fs)  # atomic, written last
        return manifest

    # ---- internals -------------------------------------------------------------------------

    def _listing(self, stage: str, key: str) -> dict[str, pafs.FileInfo]:
        """``{relative path: file info}`` of the node's files, manifest and temporaries excluded."""
        base = self.path(stage, key)
        selector = pafs.FileSelector(base, recursive=True, allow_not_found=True)
        out = {}
        for info in self.fs.get_file_info(selector):
            if info.type != pafs.FileType.File:
                continue
            rel = info.path[len(base.rstrip("/")) + 1:]
            name = rel.rsplit("/", 1)[-1]
            if rel == MANIFEST or name.startswith("."):
                continue
            out[rel] = info
        return out

    def _sha256(self, path: str) -> str:
        digest = hashlib.sha256()
        with self.fs.open_input_stream(path, compression=None) as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
        return digest.hexdigest()

    def _download(self, src: str, dest: Path, entry: dict) -> None:
        """Copy one node file to ``dest``, checking its size and sha256 against the manifest entry."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        digest, size = hashlib.sha256(), 0
        with self.fs.open_input_stream(src, compression=None) as f, open(dest, "wb") as out:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
                out.write(chunk)
        if size != entry["bytes"] or digest.hexdigest() != entry["sha256"]:
            raise StoreError(f"{self.root}/{src.removeprefix(self._base + '/')}: downloaded {size} bytes with sha256 "
                             f"{digest.hexdigest()[:12]}..., the manifest says {entry['bytes']} bytes, {entry['sha256'][:12]}...")
