"""Parquet cache of per-image proposals, written in shards by parallel workers.

Layout under ``root`` (a local path or a URI that ``pyarrow.fs.FileSystem.from_uri`` accepts)::

    <shard_id>.parquet   one per write_shard() call, committed atomically (``stages.common.io.atomic_write``)

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
where ``metadata`` is the producer's ``str -> str`` mapping (the proposals stage stamps
``model_key``, the cache key of the trained model, and ``image_size``, the pixel convention of
the boxes). JSON and Parquet only: nothing is pickled.

Integrity: completeness and checksums are the artifact store's job. The cache lives inside a
store node whose manifest, listing every shard with its size and sha256, is written only after
every shard is done, so a consumer of a complete node sees a complete, intact cache. What a
reader still checks on its first read, raising ``ProposalCacheError`` naming the file: that
there is at least one shard, that every shard is readable Parquet with the schema and schema
version above, that every shard carries the same metadata (the one passed to the constructor,
if any), and that no image id is in two shards. The id -> (shard, row) index is built then from
each shard's footer and ``image_id`` column alone.

Concurrency: distinct shard ids may be written by several processes at once; a temporary file
a crashed writer left behind starts with a dot and is ignored. Writing a shard id again replaces
it. An instance is not thread-safe: use one per thread. Processes forked from one that has
read (DataLoader workers) may share it: shards are memory-mapped read-only and read positionally
(tested with 4 workers reading random images at once).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from stages.common.io import atomic_write, filesystem_for

SCHEMA_VERSION = 1
METADATA_KEY = b"ga_proposal_cache"
ROWS_PER_GROUP = 16
READ_BATCH_ROWS = 1024  # images per batch of ``read_all``
SHARD_SUFFIX = ".parquet"

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
    """A proposal cache is missing, unreadable or inconsistent, or was given bad input."""


class ProposalCache:
    """A sharded Parquet proposal cache rooted at ``root`` (see the module docstring).

    ``metadata`` (``str -> str``) is stamped into every shard a writer writes; a reader that
    passes it gets an error if a shard was produced with different metadata. ``filesystem``
    overrides the one inferred from ``root`` (``root`` is then a path inside it).
    ``rows_per_group`` applies to writing; a reader takes the row groups from each file.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        metadata: Mapping[str, str] | None = None,
        *,
        filesystem: pafs.FileSystem | None = None,
        rows_per_group: int = ROWS_PER_GROUP,
    ):
        self._fs, self._root = (filesystem, os.fspath(root).rstrip("/")) if filesystem else filesystem_for(root)
        self._metadata = None if metadata is None else _check_metadata(metadata)
        if rows_per_group < 1:
            raise ProposalCacheError(f"rows_per_group must be >= 1, got {rows_per_group}")
        self._rows_per_group = int(rows_per_group)
        self._shards: list[tuple[str, pq.ParquetFile]] | None = None  # (path, open file), on first read
        self._shard_metadata: dict[str, str] = {}  # the metadata every shard carries
        self._index: dict[int, tuple[int, int, int]] = {}  # image id -> (shard position, row group, row in it)

    @property
    def root(self) -> str:
        return self._root

    @property
    def metadata(self) -> dict[str, str]:
        """The metadata given to the constructor, else the one the shards carry (read on first use)."""
        if self._metadata is not None:
            return dict(self._metadata)
        self._load()
        return dict(self._shard_metadata)

    # ---- writing ---------------------------------------------------------------------------

    def write_shard(self, shard_id: str, items: Iterable[tuple[int, np.ndarray, np.ndarray, np.ndarray]]) -> None:
        """Write ``<root>/<shard_id>.parquet`` atomically, streamed into the cache's filesystem.

        ``items``: ``(image_id, boxes [K, 4] float, scores [K] float, levels [K] int)`` per image;
        K may be 0; float arrays are stored as float32. Raises ``ProposalCacheError`` naming the
        image id for bad shapes, non-finite values, levels outside 0..127 or a repeated image id.
        """
        if not isinstance(shard_id, str) or not _SHARD_ID.fullmatch(shard_id):
            raise ProposalCacheError(f"invalid shard id {shard_id!r}: use letters, digits, '_', '-', '.' (max 128)")
        table = _to_table(shard_id, items, self._metadata or {})
        path = f"{self._root}/{shard_id}{SHARD_SUFFIX}"
        atomic_write(path, lambda f: pq.write_table(table, f, row_group_size=self._rows_per_group, **_PARQUET_OPTIONS),
                     filesystem=self._fs)
        self._shards = None  # the next read lists the shards again

    # ---- reading ---------------------------------------------------------------------------

    def image_ids(self) -> list[int]:
        """Every cached image id, in shard id order, then row order."""
        self._load()
        return list(self._index)

    def __len__(self) -> int:
        self._load()
        return len(self._index)

    def __contains__(self, image_id: int) -> bool:
        self._load()
        return int(image_id) in self._index

    def get(self, image_id: int) -> Proposals:
        """Proposals of one image: ``(boxes float32[K, 4], scores float32[K], levels int64[K])``."""
        shards = self._load()
        try:
            pos, group, row = self._index[int(image_id)]
        except KeyError:
            raise ProposalCacheError(f"image id {image_id} is not in the proposal cache at {self._root}") from None
        path, pf = shards[pos]
        with _naming(path):
            table = pf.read_row_group(group, use_threads=False)
        boxes, scores, levels = (_list_row(table.column(name), row) for name in ("boxes", "scores", "levels"))
        return boxes.reshape(-1, 4), scores, levels.astype(np.int64)

    def read_all(self) -> dict[int, Proposals]:
        """Every image's proposals, ``{image_id: (boxes [K, 4], scores [K], levels [K])}``.

        Read ``READ_BATCH_ROWS`` images at a time and Arrow's freed memory handed back at the end,
        so the reader's peak is the arrays returned plus one batch, not a second copy of the cache.
        """
        out = {}
        for path, pf in self._load():
            with _naming(path):
                for batch in pf.iter_batches(batch_size=READ_BATCH_ROWS, use_threads=False):
                    ids = batch.column("image_id").to_numpy()
                    boxes = _split(batch.column("boxes"))
                    scores = _split(batch.column("scores"))
                    levels = _split(batch.column("levels"), dtype=np.int64)
                    for i, image_id in enumerate(ids.tolist()):
                        out[image_id] = (boxes[i].reshape(-1, 4), scores[i], levels[i])
        pa.default_memory_pool().release_unused()
        return out

    # ---- internals -------------------------------------------------------------------------

    def _load(self) -> list[tuple[str, pq.ParquetFile]]:
        """Open every shard once, check it (module docstring) and build the image id index."""
        if self._shards is not None:
            return self._shards
        paths = self._shard_paths()
        if not paths:
            raise ProposalCacheError(f"no proposal cache shards (*{SHARD_SUFFIX}) under {self._root}")
        shards, index = [], {}
        expected, source = self._metadata, "the expected metadata"
        for pos, path in enumerate(paths):
            pf = self._open(path)
            metadata = _stamped_metadata(path, pf)
            if expected is None:
                expected, source = metadata, path
            elif metadata != expected:
                raise ProposalCacheError(f"{path}: shard metadata {metadata} differs from {expected} ({source})")
            for image_id, (group, row) in zip(*_row_locations(path, pf)):
                other = index.setdefault(image_id, (pos, group, row))
                if other != (pos, group, row):
                    raise ProposalCacheError(f"image id {image_id} is in two shards: {paths[other[0]]} and {path}")
            shards.append((path, pf))
        self._shards, self._index, self._shard_metadata = shards, index, expected
        return shards

    def _shard_paths(self) -> list[str]:
        """Committed shard files, sorted by shard id; temporaries (dot files) skipped."""
        selector = pafs.FileSelector(self._root, allow_not_found=True)
        return sorted(
            info.path
            for info in self._fs.get_file_info(selector)
            if info.type == pafs.FileType.File and info.base_name.endswith(SHARD_SUFFIX) and not info.base_name.startswith(".")
        )

    def _open(self, path: str) -> pq.ParquetFile:
        """Open a shard (memory-mapped when local) and check its schema; reads only the footer."""
        with _naming(path):
            source = pa.memory_map(path) if self._fs.type_name == "local" else self._fs.open_input_file(path)
            pf = pq.ParquetFile(source)
        if not pf.schema_arrow.equals(SCHEMA):
            raise ProposalCacheError(f"{path}: schema {pf.schema_arrow} is not the proposal cache schema")
        return pf


@contextlib.contextmanager
def _naming(path: str):
    """Re-raise pyarrow's read errors as a ``ProposalCacheError`` naming the shard file."""
    try:
        yield
    except (pa.ArrowException, OSError) as e:
        raise ProposalCacheError(f"{path}: unreadable Parquet shard ({e})") from e


def _stamped_metadata(path: str, pf: pq.ParquetFile) -> dict[str, str]:
    """The producer metadata in a shard's ``ga_proposal_cache`` schema metadata (version checked)."""
    try:
        stamp = json.loads(pf.schema_arrow.metadata[METADATA_KEY])
        version, metadata = stamp["schema_version"], stamp["metadata"]
    except (TypeError, ValueError, KeyError) as e:
        raise ProposalCacheError(f"{path}: no valid {METADATA_KEY.decode()} schema metadata ({e!r})") from e
    if version != SCHEMA_VERSION:
        raise ProposalCacheError(f"{path}: schema version {version}, this reader reads version {SCHEMA_VERSION}")
    return metadata


def _row_locations(path: str, pf: pq.ParquetFile) -> tuple[list[int], list[tuple[int, int]]]:
    """(image ids, (row group, row within it) of each), from the footer and the image_id column."""
    with _naming(path):
        ids = pf.read(columns=["image_id"], use_threads=False).column("image_id").to_numpy()
    sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
    starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])  # first row of each group
    rows = np.arange(len(ids))
    groups = np.searchsorted(starts, rows, side="right") - 1  # row group of each row
    return ids.tolist(), list(zip(groups.tolist(), (rows - starts[groups]).tolist()))


def _check_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ProposalCacheError(f"metadata must map str to str; got {k!r}: {v!r}")
    return dict(metadata)


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
            raise ProposalCacheError(
                f"image id {image_id}: scores and levels must have shape [{k}], got {list(s.shape)} and {list(lv.shape)}")
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


def _split(column: pa.Array | pa.ChunkedArray, dtype=None) -> list[np.ndarray]:
    """A list column -> one writable numpy array per row (views into one copied buffer)."""
    lists = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    flat = np.array(lists.flatten().to_numpy(zero_copy_only=False), dtype=dtype)  # copy: writable
    offsets = lists.offsets.to_numpy()
    return np.split(flat, (offsets[1:-1] - offsets[0]).tolist()) if len(lists) else []
