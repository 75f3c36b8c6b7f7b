"""stages.proposal_cache: round trips, concurrent writers, random access, integrity checks."""

from __future__ import annotations

import json
import multiprocessing

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from stages.proposal_cache import METADATA_KEY, ProposalCache, ProposalCacheError

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
    cache.finalize()
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
    cache.verify()


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
    cache.finalize()
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


def test_metadata_round_trip(tmp_path):
    build(tmp_path / "c")
    assert ProposalCache(tmp_path / "c").metadata == META
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["metadata"] == META and manifest["schema_version"] == 1
    assert manifest["num_images"] == 25
    assert [s["rows"] for s in manifest["shards"]] == [10, 15]
    assert all(len(s["sha256"]) == 64 for s in manifest["shards"])
    stamp = json.loads(pq.read_schema(tmp_path / "c" / "shards" / "part-000.parquet").metadata[METADATA_KEY])
    assert stamp == {"schema_version": 1, "metadata": META}
    ProposalCache(tmp_path / "c", META).get(1)  # same metadata: fine
    with pytest.raises(ProposalCacheError, match="differs"):
        ProposalCache(tmp_path / "c", {**META, "config_hash": "other"}).get(1)


def test_uri_root(tmp_path):
    items = build(tmp_path / "c")
    cache = ProposalCache((tmp_path / "c").as_uri())
    assert_same(cache.get(7), items[7])


def test_non_local_filesystem(tmp_path):
    fsspec = pytest.importorskip("fsspec")
    fs = pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem("memory")))
    items = make_items(range(8))
    writer = ProposalCache("/mem-cache", META, filesystem=fs)
    writer.write_shard("only", items)
    writer.finalize()
    cache = ProposalCache("/mem-cache", filesystem=fs)
    cache.verify()
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
    ProposalCache(root, META).finalize()
    cache = ProposalCache(root)
    cache.verify()
    assert sorted(cache.image_ids()) == list(range(90))
    for ids in ranges:
        for item in make_items(ids, seed=ids[0]):
            assert_same(cache.get(item[0]), item)
    assert not [p for p in (tmp_path / "c" / "shards").iterdir() if p.name.startswith(".tmp-")]


def test_missing_manifest_is_an_incomplete_cache(tmp_path):
    cache = ProposalCache(tmp_path / "c", META)
    cache.write_shard("a", make_items(range(3)))
    assert not cache.is_complete()
    for read in (cache.image_ids, cache.read_all, cache.verify, lambda: cache.get(1)):
        with pytest.raises(ProposalCacheError, match="incomplete proposal cache.*manifest.json"):
            read()
    cache.finalize()
    assert cache.is_complete()
    cache.get(1)
    with pytest.raises(ProposalCacheError, match="already finalized"):
        cache.write_shard("b", make_items(range(3, 6)))


def test_truncated_shard_is_named(tmp_path):
    build(tmp_path / "c")
    shard = tmp_path / "c" / "shards" / "part-001.parquet"
    shard.write_bytes(shard.read_bytes()[:-100])
    cache = ProposalCache(tmp_path / "c")
    for read in (lambda: cache.get(12), cache.read_all, cache.verify):
        with pytest.raises(ProposalCacheError, match=r"part-001\.parquet.*truncated or altered"):
            read()


def test_altered_byte_is_detected(tmp_path):
    build(tmp_path / "c")
    shard = tmp_path / "c" / "shards" / "part-000.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, one bit flipped
    shard.write_bytes(bytes(data))
    cache = ProposalCache(tmp_path / "c")
    assert cache.get(12)[0].shape[1] == 4  # the other shard still reads
    with pytest.raises(ProposalCacheError, match=r"part-000\.parquet: shard checksum mismatch"):
        cache.get(1)
    with pytest.raises(ProposalCacheError, match=r"part-000\.parquet"):
        ProposalCache(tmp_path / "c").verify()


def test_shard_set_must_match_manifest(tmp_path):
    build(tmp_path / "c")
    shards = tmp_path / "c" / "shards"
    stray = shards / "stray.parquet"
    stray.write_bytes((shards / "part-000.parquet").read_bytes())
    with pytest.raises(ProposalCacheError, match=r"stray\.parquet.*not in the manifest"):
        ProposalCache(tmp_path / "c").get(1)
    stray.unlink()
    (shards / "part-001.parquet").unlink()
    with pytest.raises(ProposalCacheError, match=r"part-001\.parquet: shard listed in the manifest is missing"):
        ProposalCache(tmp_path / "c").get(1)


def test_leftover_temporary_files_are_ignored(tmp_path):
    items = build(tmp_path / "c")
    (tmp_path / "c" / "shards" / ".tmp-deadbeef-part-009.parquet").write_bytes(b"partial")
    assert_same(ProposalCache(tmp_path / "c").get(3), items[3])


def test_finalize_checks_shards(tmp_path):
    cache = ProposalCache(tmp_path / "c", META)
    cache.write_shard("a", make_items(range(3)))
    cache.write_shard("b", make_items(range(2, 4)))
    with pytest.raises(ProposalCacheError, match="image id 2 is in shards 'a' and 'b'"):
        cache.finalize()
    cache.write_shard("b", make_items(range(3, 6)))  # rewriting a shard id replaces it
    (tmp_path / "c" / "shards" / "b.json").unlink()  # as if its writer died before the sidecar
    with pytest.raises(ProposalCacheError, match=r"b\.parquet: shard has no sidecar"):
        cache.finalize()
    ProposalCache(tmp_path / "c", {"model_key": "other"}).write_shard("b", make_items(range(3, 6)))
    with pytest.raises(ProposalCacheError, match=r"b\.parquet: shard metadata"):
        cache.finalize()


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
    assert not (tmp_path / "c" / "shards" / "s.parquet").exists()


def test_bad_shard_ids_and_metadata(tmp_path):
    cache = ProposalCache(tmp_path / "c")
    for bad in ("../escape", "a/b", "", ".hidden", "x\n"):
        with pytest.raises(ProposalCacheError, match="invalid shard id"):
            cache.write_shard(bad, [])
    with pytest.raises(ProposalCacheError, match="appears twice"):
        cache.write_shard("s", make_items([1, 1]))
    with pytest.raises(ProposalCacheError, match="metadata must map str to str"):
        ProposalCache(tmp_path / "c", {"config_hash": 123})


def test_empty_shard_and_empty_cache(tmp_path):
    cache = ProposalCache(tmp_path / "c", META)
    cache.write_shard("empty", [])
    cache.finalize()
    reader = ProposalCache(tmp_path / "c")
    assert reader.image_ids() == [] and reader.read_all() == {}
    reader.verify()
