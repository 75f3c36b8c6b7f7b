"""stages.common.proposal_cache: round trips, concurrent writers, random access, the checks a reader makes."""

from __future__ import annotations

import json
import multiprocessing
import re

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch

from stages.common.proposal_cache import METADATA_KEY, ProposalCache, ProposalCacheError

META = {"model_key": "ga_rpn-3f2a", "image_size": "original_pixels", "config_hash": "abc123"}


def make_items(image_ids, seed=0, max_k=40):
    """Deterministic (image_id, boxes float32[K,4], scores float32[K], levels int64[K]); some K = 0."""
    rng = np.random.default_rng(seed)
    items = []
    for image_id in image_ids:
        k = 0 if image_id % 5 == 0 else int(rng.integers(1, max_k))
        xy = rng.uniform(0, 500, (k, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(1, 300, (k, 2))], axis=1).astype(np.float32)
        scores = np.sort(rng.random(k).astype(np.float32))[::-1].copy()
        levels = rng.integers(0, 5, k)
        items.append((image_id, boxes, scores, levels))
    return items


def assert_same(got, item):
    _, boxes, scores, levels = item
    assert got[0].dtype == np.float32 and got[0].shape == boxes.shape
    assert got[1].dtype == np.float32 and got[2].dtype == np.int64
    np.testing.assert_array_equal(got[0], boxes)
    np.testing.assert_array_equal(got[1], scores)
    np.testing.assert_array_equal(got[2], levels)


def build(root, shards=(range(0, 10), range(10, 25)), rows_per_group=4):
    cache = ProposalCache(root, META, rows_per_group=rows_per_group)
    items = {}
    for n, ids in enumerate(shards):
        shard_items = make_items(ids, seed=n)
        cache.write_shard(f"part-{n:03d}", shard_items)
        items.update({it[0]: it for it in shard_items})
    return items


def test_round_trip_is_exact(tmp_path):
    items = build(tmp_path / "c")
    cache = ProposalCache(tmp_path / "c")
    assert cache.image_ids() == list(range(25)) and len(cache) == 25
    everything = cache.read_all()
    assert sorted(everything) == list(range(25))
    for image_id, item in items.items():
        assert_same(cache.get(image_id), item)
        assert_same(everything[image_id], item)
    empty = cache.get(5)  # K = 0
    assert empty[0].shape == (0, 4) and empty[1].shape == (0,) and empty[2].shape == (0,)


def test_returned_arrays_are_writable_copies(tmp_path):
    build(tmp_path / "c")
    cache = ProposalCache(tmp_path / "c")
    boxes, _, _ = cache.get(1)
    boxes *= 2  # a data loader may rescale in place
    assert not np.array_equal(cache.get(1)[0], boxes)
    cache.read_all()[1][0][:] = 0


def test_float64_input_is_stored_as_float32(tmp_path):
    cache = ProposalCache(tmp_path / "c")
    boxes = np.array([[0.1, 0.2, 10.3, 20.4]])  # float64
    cache.write_shard("s", [(3, boxes, np.array([0.9]), np.array([2], dtype=np.int32))])
    got = ProposalCache(tmp_path / "c").get(3)
    np.testing.assert_array_equal(got[0], boxes.astype(np.float32))
    assert got[2].tolist() == [2]


def test_random_access_in_any_order(tmp_path):
    items = build(tmp_path / "c", shards=(range(0, 13), range(100, 117), range(50, 51)), rows_per_group=3)
    cache = ProposalCache(tmp_path / "c")
    order = np.random.default_rng(1).permutation(sorted(items))
    for image_id in order.tolist():
        assert_same(cache.get(image_id), items[image_id])
    assert 116 in cache and 99 not in cache
    with pytest.raises(ProposalCacheError, match="image id 99 "):
        cache.get(99)


def test_files_and_metadata(tmp_path):
    build(tmp_path / "c")
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["part-000.parquet", "part-001.parquet"]  # shards only
    assert ProposalCache(tmp_path / "c").metadata == META
    shard = pq.ParquetFile(tmp_path / "c" / "part-001.parquet")
    assert shard.metadata.num_rows == 15 and [shard.metadata.row_group(g).num_rows for g in range(4)] == [4, 4, 4, 3]
    assert json.loads(shard.schema_arrow.metadata[METADATA_KEY]) == {"schema_version": 1, "metadata": META}
    column = shard.metadata.row_group(0).column(1)
    assert column.compression == "ZSTD" and "BYTE_STREAM_SPLIT" in column.encodings
    ProposalCache(tmp_path / "c", META).get(1)  # the expected metadata: fine
    with pytest.raises(ProposalCacheError, match=r"part-000\.parquet: shard metadata .* differs"):
        ProposalCache(tmp_path / "c", {**META, "config_hash": "other"}).get(1)


def test_shards_with_different_metadata_are_rejected(tmp_path):
    build(tmp_path / "c")
    ProposalCache(tmp_path / "c", {**META, "model_key": "other"}).write_shard("part-002", make_items(range(30, 33)))
    with pytest.raises(ProposalCacheError, match=r"part-002\.parquet: shard metadata .*'other'.* differs .*part-000\.parquet"):
        ProposalCache(tmp_path / "c").image_ids()


def test_uri_root(tmp_path):
    items = build(tmp_path / "c")
    cache = ProposalCache((tmp_path / "c").as_uri())
    assert_same(cache.get(7), items[7])


def test_non_local_filesystem(tmp_path):
    fsspec = pytest.importorskip("fsspec")
    fs = pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem("memory")))
    items = make_items(range(8))
    root = f"/{tmp_path.name}/cache"  # fsspec's memory store is shared by the whole process
    ProposalCache(root, META, filesystem=fs).write_shard("only", items)
    cache = ProposalCache(root, filesystem=fs)
    assert cache.image_ids() == list(range(8))
    for item in items:
        assert_same(cache.get(item[0]), item)


def _write_worker(root, shard, ids):
    ProposalCache(root, META, rows_per_group=4).write_shard(shard, make_items(ids, seed=ids[0]))


def test_concurrent_writers(tmp_path):
    root = str(tmp_path / "c")
    ranges = [list(range(w * 30, w * 30 + 30)) for w in range(3)]
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_write_worker, args=(root, f"worker-{w}", ids)) for w, ids in enumerate(ranges)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    cache = ProposalCache(root, META)
    assert cache.image_ids() == list(range(90))  # shard id order: worker-0, worker-1, worker-2
    for ids in ranges:
        for item in make_items(ids, seed=ids[0]):
            assert_same(cache.get(item[0]), item)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [f"worker-{w}.parquet" for w in range(3)]  # no temporaries


class CacheReads(torch.utils.data.Dataset):
    """A loader's view of a cache: item i is image ``ids[i]``'s proposals, read by ``get``."""

    def __init__(self, cache: ProposalCache, ids: list[int]):
        self.cache, self.ids = cache, ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        return self.ids[i], self.cache.get(self.ids[i])


@pytest.mark.filterwarnings("ignore:This DataLoader will create 4 worker processes")  # 2 cores here
@pytest.mark.parametrize("opened_before_fork", [True, False])
def test_four_concurrent_loaders_read_random_images_exactly(tmp_path, opened_before_fork):
    """Four DataLoader worker processes read random images at once through one reader (its shards
    memory-mapped and its index built before the fork, or built in each worker); every image comes
    back exactly as written."""
    items = build(tmp_path / "c", shards=[range(s * 300, s * 300 + 300) for s in range(4)], rows_per_group=16)
    cache = ProposalCache(tmp_path / "c", META)
    if opened_before_fork:
        assert len(cache) == 1200
    order = np.random.default_rng(0).permutation(list(items)).tolist() * 2  # every image, twice
    loader = torch.utils.data.DataLoader(CacheReads(cache, order), batch_size=None, num_workers=4,
                                         multiprocessing_context="fork")
    seen = []
    for image_id, got in loader:
        assert_same(tuple(t.numpy() for t in got), items[image_id])
        seen.append(image_id)
    assert seen == order


@pytest.mark.parametrize("root", ["missing", "."])
def test_no_shards_is_an_error(tmp_path, root):
    root = (tmp_path / root).resolve()
    cache = ProposalCache(root)
    for read in (cache.image_ids, cache.read_all, lambda: cache.get(1), lambda: 1 in cache, lambda: len(cache)):
        with pytest.raises(ProposalCacheError, match=f"no proposal cache shards .* under {re.escape(str(root))}$"):
            read()


def test_truncated_shard_is_named(tmp_path):
    build(tmp_path / "c")
    shard = tmp_path / "c" / "part-001.parquet"
    shard.write_bytes(shard.read_bytes()[:-100])
    cache = ProposalCache(tmp_path / "c")
    for read in (lambda: cache.get(1), cache.read_all, cache.image_ids):
        with pytest.raises(ProposalCacheError, match=r"part-001\.parquet: unreadable Parquet shard"):
            read()


def test_wrong_schema_and_missing_stamp_are_named(tmp_path):
    build(tmp_path / "c")
    stray = tmp_path / "c" / "stray.parquet"
    pq.write_table(pa.table({"image_id": [100]}), stray)
    with pytest.raises(ProposalCacheError, match=r"stray\.parquet: schema .* is not the proposal cache schema"):
        ProposalCache(tmp_path / "c").get(1)
    pq.write_table(pq.read_table(tmp_path / "c" / "part-000.parquet").replace_schema_metadata(None), stray)
    with pytest.raises(ProposalCacheError, match=r"stray\.parquet: no valid ga_proposal_cache schema metadata"):
        ProposalCache(tmp_path / "c").get(1)


def test_duplicate_image_id_across_shards_names_both(tmp_path):
    cache = ProposalCache(tmp_path / "c", META)
    cache.write_shard("a", make_items(range(3)))
    cache.write_shard("b", make_items(range(2, 4)))
    with pytest.raises(ProposalCacheError, match=r"image id 2 is in two shards: .*/a\.parquet and .*/b\.parquet"):
        cache.read_all()
    cache.write_shard("b", make_items(range(3, 6)))  # rewriting a shard id replaces it
    assert cache.image_ids() == [0, 1, 2, 3, 4, 5]


def test_leftover_temporary_files_are_ignored(tmp_path):
    items = build(tmp_path / "c")
    (tmp_path / "c" / ".part-009.parquet.deadbeef.tmp").write_bytes(b"partial")  # as a crashed writer leaves it
    (tmp_path / "c" / ".part-008.parquet").write_bytes(b"partial")
    assert_same(ProposalCache(tmp_path / "c").get(3), items[3])


@pytest.mark.parametrize(
    "item, message",
    [
        ((4, np.zeros((2, 3)), np.zeros(2), np.zeros(2, int)), r"image id 4: boxes must have shape \[K, 4\]"),
        ((4, np.zeros((2, 4)), np.zeros(3), np.zeros(2, int)), r"image id 4: scores and levels must have shape \[2\]"),
        ((4, np.array([[0, 0, np.nan, 1.0]]), np.ones(1), np.zeros(1, int)), "image id 4: boxes contain NaN"),
        ((4, np.ones((1, 4)), np.array([np.inf]), np.zeros(1, int)), "image id 4: scores contain NaN or inf"),
        ((4, np.ones((1, 4)), np.ones(1), np.array([200])), r"image id 4: levels must be in 0\.\.127"),
        ((4, np.ones((1, 4)), np.ones(1), np.array([1.0])), "image id 4: levels must be integers"),
        ((4, np.ones((1, 4), int), np.ones(1), np.array([1])), "image id 4: boxes and scores must be floating"),
        (("4", np.ones((1, 4)), np.ones(1), np.array([1])), "image id '4' is not an integer"),
    ],
)
def test_bad_items_are_rejected(tmp_path, item, message):
    good = make_items([1, 2, 3])
    with pytest.raises(ProposalCacheError, match=message):
        ProposalCache(tmp_path / "c").write_shard("s", [*good, item])
    assert not (tmp_path / "c").exists()


def test_bad_shard_ids_and_metadata(tmp_path):
    cache = ProposalCache(tmp_path / "c")
    for bad in ("../escape", "a/b", "", ".hidden", "x\n"):
        with pytest.raises(ProposalCacheError, match="invalid shard id"):
            cache.write_shard(bad, [])
    with pytest.raises(ProposalCacheError, match="appears twice"):
        cache.write_shard("s", make_items([1, 1]))
    with pytest.raises(ProposalCacheError, match="metadata must map str to str"):
        ProposalCache(tmp_path / "c", {"config_hash": 123})


def test_empty_shard(tmp_path):
    ProposalCache(tmp_path / "c", META).write_shard("empty", [])
    reader = ProposalCache(tmp_path / "c", META)
    assert reader.image_ids() == [] and reader.read_all() == {} and len(reader) == 0 and 1 not in reader
