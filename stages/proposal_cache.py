"""Parquet cache of per-image proposals, written in shards by parallel workers.

Layout under ``root`` (a local path or a URI that ``pyarrow.fs.FileSystem.from_uri`` accepts)::

    shards/<shard_id>.parquet   one per write_shard() call, committed by atomic rename
    shards/<shard_id>.json      its sidecar (rows, bytes, sha256, image ids), committed after it
    manifest.json               written last, atomically, by finalize(): without it the cache
                                is incomplete and every read fails

Parquet schema, one row per image (K = proposals of that image, may be 0)::

    image_id  int64                      not null
    boxes     list<float32 not null>     K*4 values: the [K, 4] xyxy array in row-major order,
                                         in the pixels of the image the producer was given
    scores    list<float32 not null>     K
    levels    list<int8 not null>        K, FPN level index the proposal came from (0..127)

Files use zstd compression with the BYTE_STREAM_SPLIT encoding for the float columns (lossless,
about 16 bytes per proposal for float32 boxes + score + level) and row groups of
``rows_per_group`` images, so one image is read by decoding one small row group. The Parquet
schema metadata key ``ga_proposal_cache`` holds ``{"schema_version": 1, "metadata": {...}}``,
where ``metadata`` is the producer's ``str -> str`` mapping (by convention ``model_key``,
``image_size`` (the pixel convention of the boxes) and ``config_hash``).

``manifest.json``::

    {"format": "ga_proposal_cache", "schema_version": 1, "metadata": {...},
     "num_images": N, "num_proposals": P,
     "shards": [{"shard": id, "file": "shards/<id>.parquet", "rows": n, "proposals": p,
                 "bytes": b, "sha256": hex, "rows_per_group": g, "image_ids": [...]}, ...]}

Integrity: opening the cache checks that the shards on disk are exactly those of the manifest,
with the listed sizes; the first read of a shard (and ``verify()``) checks its sha256. Every
failure is a ``ProposalCacheError`` naming the shard, the manifest or the image id. JSON and
Parquet only: nothing is pickled.

Concurrency: distinct shard ids may be written by several processes at once (unique temporary
names, atomic rename; on object stores the manifest alone is the commit point). Writing a shard
id again replaces it. ``finalize()`` runs once, after every writer is done. An instance is not
thread-safe: use one per thread or process.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from collections.abc import Iterable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

SCHEMA_VERSION = 1
FORMAT_NAME = "ga_proposal_cache"
METADATA_KEY = b"ga_proposal_cache"
ROWS_PER_GROUP = 16
MANIFEST = "manifest.json"
SHARDS_DIR = "shards"
TMP_PREFIX = ".tmp-"

SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("boxes", pa.list_(pa.field("item", pa.float32(), nullable=False)), nullable=False),
        pa.field("scores", pa.list_(pa.field("item", pa.float32(), nullable=False)), nullable=False),
        pa.field("levels", pa.list_(pa.field("item", pa.int8(), nullable=False)), nullable=False),
    ]
)
_PARQUET_OPTIONS = dict(
    compression="zstd",
    use_dictionary=["levels.list.element"],
    use_byte_stream_split=["boxes.list.element", "scores.list.element"],
    write_statistics=["image_id"],
)
_SHARD_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")

Proposals = tuple[np.ndarray, np.ndarray, np.ndarray]  # boxes float32[K, 4], scores float32[K], levels int64[K]


class ProposalCacheError(ValueError):
    """A proposal cache is incomplete, inconsistent or damaged, or was given bad input."""


class ProposalCache:
    """A sharded Parquet proposal cache rooted at ``root`` (see the module docstring).

    ``metadata`` (``str -> str``) is stamped into every shard a writer writes; a reader that
    passes it gets an error if the cache was produced with different metadata. ``filesystem``
    overrides the one inferred from ``root`` (``root`` is then a path inside it).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        metadata: Mapping[str, str] | None = None,
        *,
        filesystem: pafs.FileSystem | None = None,
        rows_per_group: int = ROWS_PER_GROUP,
    ):
        self._fs, self._root = _resolve(root, filesystem)
        self._metadata = None if metadata is None else _check_metadata(metadata)
        if rows_per_group < 1:
            raise ProposalCacheError(f"rows_per_group must be >= 1, got {rows_per_group}")
        self._rows_per_group = int(rows_per_group)
        self._manifest: dict | None = None
        self._index: dict[int, tuple[int, int]] = {}  # image id -> (shard position, row)
        self._open: dict[int, pq.ParquetFile] = {}  # shard position -> checksum-verified file

    @property
    def root(self) -> str:
        return self._root

    @property
    def metadata(self) -> dict[str, str]:
        """The manifest's metadata when finalized, else the metadata given to the constructor."""
        if self.is_complete():
            return dict(self._load()["metadata"])
        return dict(self._metadata or {})

    def is_complete(self) -> bool:
        """True when ``finalize()`` has written the manifest."""
        return self._fs.get_file_info(self._path(MANIFEST)).type == pafs.FileType.File

    # ---- writing ---------------------------------------------------------------------------

    def write_shard(self, shard_id: str, items: Iterable[tuple[int, np.ndarray, np.ndarray, np.ndarray]]) -> None:
        """Write one shard atomically.

        ``items``: ``(image_id, boxes [K, 4] float, scores [K] float, levels [K] int)`` per image;
        K may be 0; float arrays are stored as float32. Raises ``ProposalCacheError`` naming the
        image id for bad shapes, non-finite values, levels outside 0..127 or a repeated image id.
        """
        if not isinstance(shard_id, str) or not _SHARD_ID.fullmatch(shard_id):
            raise ProposalCacheError(f"invalid shard id {shard_id!r}: use letters, digits, '_', '-', '.' (max 128)")
        if self.is_complete():
            raise ProposalCacheError(f"{self._path(MANIFEST)}: cache is already finalized; write a new cache instead")
        table = _to_table(shard_id, items, self._metadata or {})
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, row_group_size=self._rows_per_group, **_PARQUET_OPTIONS)
        data = sink.getvalue()  # pa.Buffer
        sidecar = {
            "format": FORMAT_NAME,
            "schema_version": SCHEMA_VERSION,
            "shard": shard_id,
            "file": f"{SHARDS_DIR}/{shard_id}.parquet",
            "rows": table.num_rows,
            "proposals": len(pc.list_flatten(table.column("scores"))),
            "bytes": data.size,
            "sha256": hashlib.sha256(data).hexdigest(),
            "rows_per_group": self._rows_per_group,
            "metadata": self._metadata or {},
            "image_ids": table.column("image_id").to_pylist(),
        }
        self._fs.create_dir(self._path(SHARDS_DIR), recursive=True)
        self._atomic_write(sidecar["file"], data)
        self._atomic_write(f"{SHARDS_DIR}/{shard_id}.json", _json_bytes(sidecar))

    def finalize(self) -> None:
        """Collect the shards' sidecars into ``manifest.json``, written last and atomically.

        Fails, naming the shard, when a shard has no sidecar (still being written, or its writer
        crashed) or vice versa, a shard's size differs from its sidecar, shards disagree on
        metadata, or an image id appears in two shards.
        """
        parquet, sidecars = self._list_shard_dir()
        entries, owner = [], {}
        metadata = self._metadata
        for shard_id in sorted(set(parquet) | set(sidecars)):
            where = self._path(f"{SHARDS_DIR}/{shard_id}.parquet")
            if shard_id not in sidecars:
                raise ProposalCacheError(f"{where}: shard has no sidecar .json (still being written, or its writer crashed)")
            if shard_id not in parquet:
                raise ProposalCacheError(f"{where}: shard file is missing but its sidecar exists")
            side = self._read_json(f"{SHARDS_DIR}/{shard_id}.json")
            if side.get("format") != FORMAT_NAME or side.get("schema_version") != SCHEMA_VERSION:
                raise ProposalCacheError(f"{where}: sidecar has format/schema version {side.get('format')}/{side.get('schema_version')}")
            if parquet[shard_id] != side["bytes"]:
                raise ProposalCacheError(f"{where}: shard is {parquet[shard_id]} bytes but its sidecar says {side['bytes']}")
            if metadata is None:
                metadata = side["metadata"]
            elif side["metadata"] != metadata:
                raise ProposalCacheError(f"{where}: shard metadata {side['metadata']} differs from {metadata}")
            for image_id in side["image_ids"]:
                if image_id in owner:
                    raise ProposalCacheError(f"image id {image_id} is in shards {owner[image_id]!r} and {shard_id!r}")
                owner[image_id] = shard_id
            entries.append({k: side[k] for k in ("shard", "file", "rows", "proposals", "bytes", "sha256", "rows_per_group", "image_ids")})
        manifest = {
            "format": FORMAT_NAME,
            "schema_version": SCHEMA_VERSION,
            "metadata": metadata or {},
            "num_images": len(owner),
            "num_proposals": sum(e["proposals"] for e in entries),
            "shards": entries,
        }
        self._atomic_write(MANIFEST, _json_bytes(manifest))
        self._manifest = None  # re-read (and re-check) on the next access

    # ---- reading ---------------------------------------------------------------------------

    def image_ids(self) -> list[int]:
        """Every cached image id, in shard order."""
        return [i for shard in self._load()["shards"] for i in shard["image_ids"]]

    def __len__(self) -> int:
        return self._load()["num_images"]

    def __contains__(self, image_id: int) -> bool:
        self._load()
        return int(image_id) in self._index

    def get(self, image_id: int) -> Proposals:
        """Proposals of one image: ``(boxes float32[K, 4], scores float32[K], levels int64[K])``."""
        self._load()
        try:
            pos, row = self._index[int(image_id)]
        except KeyError:
            raise ProposalCacheError(f"image id {image_id} is not in the proposal cache at {self._root}") from None
        shard = self._manifest["shards"][pos]
        group = self._shard(pos).read_row_group(row // shard["rows_per_group"], use_threads=False)
        r = row % shard["rows_per_group"]
        boxes, scores, levels = (_list_row(group.column(name), r) for name in ("boxes", "scores", "levels"))
        return boxes.reshape(-1, 4), scores, levels.astype(np.int64)

    def read_all(self) -> dict[int, Proposals]:
        """Every image's proposals, ``{image_id: (boxes [K, 4], scores [K], levels [K])}``."""
        out = {}
        for pos in range(len(self._load()["shards"])):
            table = self._shard(pos).read()
            ids = table.column("image_id").to_numpy()
            boxes = _split(table.column("boxes"))
            scores = _split(table.column("scores"))
            levels = _split(table.column("levels"), dtype=np.int64)
            for i, image_id in enumerate(ids.tolist()):
                out[image_id] = (boxes[i].reshape(-1, 4), scores[i], levels[i])
        return out

    def verify(self) -> None:
        """Re-check everything: shard set and sizes, sha256 of every shard, and each shard's
        schema, metadata, row count and image ids against the manifest."""
        self._manifest = None
        self._open.clear()
        manifest = self._load()
        for pos, shard in enumerate(manifest["shards"]):
            where = self._path(shard["file"])
            pf = self._shard(pos)
            if not pf.schema_arrow.equals(SCHEMA):
                raise ProposalCacheError(f"{where}: schema {pf.schema_arrow} is not the proposal cache schema")
            stamp = json.loads((pf.schema_arrow.metadata or {}).get(METADATA_KEY, b"{}"))
            if stamp.get("metadata") != manifest["metadata"]:
                raise ProposalCacheError(f"{where}: shard metadata {stamp.get('metadata')} differs from the manifest's")
            ids = pf.read(columns=["image_id"]).column("image_id").to_pylist()
            if ids != shard["image_ids"]:
                raise ProposalCacheError(f"{where}: image ids differ from the manifest's")

    # ---- internals -------------------------------------------------------------------------

    def _path(self, rel: str) -> str:
        return f"{self._root}/{rel}"

    def _load(self) -> dict:
        """Read and check the manifest once: shard files on disk == manifest shards, sizes match."""
        if self._manifest is not None:
            return self._manifest
        if not self.is_complete():
            raise ProposalCacheError(f"incomplete proposal cache at {self._root}: no {MANIFEST} (finalize() was not run)")
        manifest = self._read_json(MANIFEST)
        where = self._path(MANIFEST)
        if manifest.get("format") != FORMAT_NAME or manifest.get("schema_version") != SCHEMA_VERSION:
            raise ProposalCacheError(f"{where}: not a {FORMAT_NAME} manifest of schema version {SCHEMA_VERSION}")
        if self._metadata is not None and manifest["metadata"] != self._metadata:
            raise ProposalCacheError(f"{where}: cache metadata {manifest['metadata']} differs from the expected {self._metadata}")
        on_disk, _ = self._list_shard_dir()
        listed = {s["shard"]: s for s in manifest["shards"]}
        extra = sorted(set(on_disk) - set(listed))
        if extra:
            names = ", ".join(self._path(f"{SHARDS_DIR}/{i}.parquet") for i in extra)
            raise ProposalCacheError(f"{names}: shard(s) on disk but not in the manifest {self._path(MANIFEST)}")
        for shard_id, shard in listed.items():
            path = self._path(shard["file"])
            if shard_id not in on_disk:
                raise ProposalCacheError(f"{path}: shard listed in the manifest is missing")
            if on_disk[shard_id] != shard["bytes"]:
                raise ProposalCacheError(f"{path}: shard is {on_disk[shard_id]} bytes, the manifest says {shard['bytes']} (truncated or altered)")
        self._index = {i: (pos, row) for pos, s in enumerate(manifest["shards"]) for row, i in enumerate(s["image_ids"])}
        self._open.clear()
        self._manifest = manifest
        return manifest

    def _shard(self, pos: int) -> pq.ParquetFile:
        """The shard at ``pos``, its sha256 checked on first open."""
        if pos not in self._open:
            shard = self._manifest["shards"][pos]
            path = self._path(shard["file"])
            if isinstance(self._fs, pafs.LocalFileSystem):
                data = pa.memory_map(path).read_buffer()  # zero-copy, shared through the page cache
            else:
                with self._fs.open_input_stream(path, compression=None) as f:
                    data = f.read_buffer()
            if data.size != shard["bytes"] or hashlib.sha256(data).hexdigest() != shard["sha256"]:
                raise ProposalCacheError(f"{path}: shard checksum mismatch (truncated or altered)")
            try:
                pf = pq.ParquetFile(pa.BufferReader(data))
            except (pa.ArrowException, OSError) as e:
                raise ProposalCacheError(f"{path}: unreadable Parquet shard ({e})") from e
            if pf.metadata.num_rows != shard["rows"]:
                raise ProposalCacheError(f"{path}: shard has {pf.metadata.num_rows} rows, the manifest says {shard['rows']}")
            self._open[pos] = pf
        return self._open[pos]

    def _list_shard_dir(self) -> tuple[dict[str, int], set[str]]:
        """({shard id: bytes} of committed .parquet files, {shard ids with a sidecar}); temporaries skipped."""
        selector = pafs.FileSelector(self._path(SHARDS_DIR), allow_not_found=True)
        parquet, sidecars = {}, set()
        for info in self._fs.get_file_info(selector):
            name = info.base_name
            if info.type != pafs.FileType.File or name.startswith(TMP_PREFIX):
                continue
            if name.endswith(".parquet"):
                parquet[name[: -len(".parquet")]] = info.size
            elif name.endswith(".json"):
                sidecars.add(name[: -len(".json")])
        return parquet, sidecars

    def _read_json(self, rel: str) -> dict:
        path = self._path(rel)
        try:
            with self._fs.open_input_stream(path, compression=None) as f:
                return json.loads(f.read().decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise ProposalCacheError(f"{path}: unreadable JSON ({e})") from e

    def _atomic_write(self, rel: str, data) -> None:
        """Write to a unique temporary name in the target's directory, then rename over the target."""
        final = self._path(rel)
        directory, _, name = final.rpartition("/")
        tmp = f"{directory}/{TMP_PREFIX}{uuid.uuid4().hex}-{name}"
        try:
            with self._fs.open_output_stream(tmp, compression=None) as f:
                f.write(data)
            self._fs.move(tmp, final)
        except BaseException:
            if self._fs.get_file_info(tmp).type != pafs.FileType.NotFound:
                self._fs.delete_file(tmp)
            raise


def _resolve(root: str | os.PathLike, filesystem: pafs.FileSystem | None) -> tuple[pafs.FileSystem, str]:
    root = os.fspath(root)
    if filesystem is not None:
        return filesystem, root.rstrip("/")
    if "://" in root:
        fs, path = pafs.FileSystem.from_uri(root)
        return fs, path.rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(root)


def _check_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ProposalCacheError(f"metadata must map str to str; got {k!r}: {v!r}")
    return dict(metadata)


def _json_bytes(obj: dict) -> bytes:
    return json.dumps(obj, sort_keys=True).encode("utf-8")


def _to_table(shard_id: str, items: Iterable, metadata: dict[str, str]) -> pa.Table:
    """Validate items and build the shard table (one row per image)."""
    ids, boxes, scores, levels = [], [], [], []
    seen = set()
    for item in items:
        if not isinstance(item, (tuple, list)) or len(item) != 4:
            raise ProposalCacheError(f"shard {shard_id!r}: items must be (image_id, boxes, scores, levels) tuples")
        image_id, b, s, lv = item
        if isinstance(image_id, (bool, np.bool_)) or not isinstance(image_id, (int, np.integer)):
            raise ProposalCacheError(f"shard {shard_id!r}: image id {image_id!r} is not an integer")
        image_id = int(image_id)
        if image_id in seen:
            raise ProposalCacheError(f"shard {shard_id!r}: image id {image_id} appears twice")
        seen.add(image_id)
        b, s, lv = np.asarray(b), np.asarray(s), np.asarray(lv)
        if b.ndim != 2 or b.shape[1] != 4:
            raise ProposalCacheError(f"image id {image_id}: boxes must have shape [K, 4], got {list(b.shape)}")
        k = b.shape[0]
        if s.shape != (k,) or lv.shape != (k,):
            raise ProposalCacheError(f"image id {image_id}: scores and levels must have shape [{k}], got {list(s.shape)} and {list(lv.shape)}")
        if k and not (np.issubdtype(b.dtype, np.floating) and np.issubdtype(s.dtype, np.floating)):
            raise ProposalCacheError(f"image id {image_id}: boxes and scores must be floating point, got {b.dtype} and {s.dtype}")
        if k and not np.issubdtype(lv.dtype, np.integer):
            raise ProposalCacheError(f"image id {image_id}: levels must be integers, got {lv.dtype}")
        ids.append(image_id)
        boxes.append(b.astype(np.float32, copy=False).reshape(-1))
        scores.append(s.astype(np.float32, copy=False))
        levels.append(lv)
    counts = np.array([len(s) for s in scores], dtype=np.int64)
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    if offsets[-1] * 4 > np.iinfo(np.int32).max:
        raise ProposalCacheError(f"shard {shard_id!r}: {offsets[-1]} proposals is too many for one shard; split it")
    flat_boxes = np.concatenate(boxes) if boxes else np.zeros(0, np.float32)
    flat_scores = np.concatenate(scores) if scores else np.zeros(0, np.float32)
    flat_levels = np.concatenate(levels).astype(np.int64, copy=False) if levels else np.zeros(0, np.int64)
    for name, values, per in (("boxes", flat_boxes, 4), ("scores", flat_scores, 1)):
        bad = ~np.isfinite(values)
        if bad.any():
            raise ProposalCacheError(f"image id {_owner(ids, offsets, np.argmax(bad) // per)}: {name} contain NaN or inf")
    bad = (flat_levels < 0) | (flat_levels > np.iinfo(np.int8).max)
    if bad.any():
        raise ProposalCacheError(f"image id {_owner(ids, offsets, np.argmax(bad))}: levels must be in 0..127")

    def lists(values: np.ndarray, per: int) -> pa.ListArray:
        return pa.ListArray.from_arrays(pa.array((offsets * per).astype(np.int32)), pa.array(values))

    stamp = {"schema_version": SCHEMA_VERSION, "metadata": metadata}
    return pa.Table.from_arrays(
        [
            pa.array(ids, type=pa.int64()),
            lists(flat_boxes, 4),
            lists(flat_scores, 1),
            lists(flat_levels.astype(np.int8), 1),
        ],
        schema=SCHEMA.with_metadata({METADATA_KEY: json.dumps(stamp, sort_keys=True).encode("utf-8")}),
    )


def _owner(ids: list[int], offsets: np.ndarray, proposal: int) -> int:
    """Image id of the image holding flat proposal index ``proposal``."""
    return ids[int(np.searchsorted(offsets, proposal, side="right")) - 1]


def _list_row(column: pa.ChunkedArray, row: int) -> np.ndarray:
    """Values of one list row as a writable numpy array."""
    return column[row].values.to_numpy(zero_copy_only=False).copy()


def _split(column: pa.ChunkedArray, dtype=None) -> list[np.ndarray]:
    """A list column -> one writable numpy array per row (views into one copied buffer)."""
    lists = column.combine_chunks()
    flat = np.array(lists.flatten().to_numpy(zero_copy_only=False), dtype=dtype)  # copy: writable
    offsets = lists.offsets.to_numpy()
    return np.split(flat, (offsets[1:-1] - offsets[0]).tolist()) if len(lists) else []
