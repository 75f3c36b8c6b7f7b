"""Benchmark the Parquet proposal cache against raw pyarrow on the same arrays, in one run.

Measures, for N images x K proposals (default 5000 x 1000):
- write throughput (proposals/s): ProposalCache.write_shard for every shard (validation, zstd +
  byte-stream-split, atomic commit) vs building the same Arrow tables and ``pq.write_table`` with
  pyarrow's defaults;
- read throughput (proposals/s): ``read_all()`` on a fresh reader (opening every shard, schema and
  metadata checks, the image id index, per-image numpy arrays) vs ``pq.read_table`` per shard
  split into the same per-image arrays (and, for reference, ``pq.read_table`` alone);
- the first read's cost on a fresh reader: open every shard and build the image id index;
- random single-image ``get()`` latency on a fresh reader (cold: the first call opens every shard
  and builds the index) and again once it is built (warm);
- bytes per proposal on disk.

Prints a table and writes JSON (default benchmarks/results/proposal_cache.json). Throughputs are
the best of ``--repeats`` runs, the order of raw and cache alternating within each.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from stages.common.proposal_cache import ROWS_PER_GROUP, SCHEMA, ProposalCache

GOALS = {"max_slowdown_vs_raw": 1.5, "max_random_read_ms": 5.0, "max_bytes_per_proposal": 20.0}


def make_proposals(num_images: int, k: int, seed: int, width: int = 1333, height: int = 800):
    """Proposal-like arrays per image: boxes float32[K, 4] xyxy clipped to the image (sizes 8..600 px,
    aspect ratios e^-2..e^2), scores float32[K] sorted descending, levels int64[K] in 0..4."""
    rng = np.random.default_rng(seed)
    items = []
    for image_id in range(num_images):
        c = rng.uniform((0, 0), (width, height), (k, 2))
        w = np.exp(rng.uniform(np.log(8), np.log(600), k))
        wh = np.stack([w, w * np.exp(rng.uniform(-2, 2, k))], axis=1)
        boxes = np.concatenate([c - wh / 2, c + wh / 2], axis=1).clip(0, [width, height, width, height])
        scores = np.sort(rng.random(k, dtype=np.float32))[::-1].copy()
        items.append((image_id, boxes.astype(np.float32), scores, rng.integers(0, 5, k)))
    return items


def raw_table(items) -> pa.Table:
    """The same rows as a plain Arrow table (same schema, no metadata)."""
    counts = np.array([len(it[2]) for it in items])
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)

    def lists(values: np.ndarray, per: int) -> pa.ListArray:
        return pa.ListArray.from_arrays(pa.array(offsets * per), pa.array(values))

    return pa.Table.from_arrays(
        [
            pa.array([it[0] for it in items], type=pa.int64()),
            lists(np.concatenate([it[1].reshape(-1) for it in items]), 4),
            lists(np.concatenate([it[2] for it in items]), 1),
            lists(np.concatenate([it[3] for it in items]).astype(np.int8), 1),
        ],
        schema=SCHEMA,
    )


def split_rows(table: pa.Table) -> dict[int, tuple]:
    """Per-image numpy arrays from a table, as ProposalCache.read_all returns them."""
    out = {}
    cols = {}
    for name, dtype in (("boxes", np.float32), ("scores", np.float32), ("levels", np.int64)):
        lists = table.column(name).combine_chunks()
        flat = np.array(lists.flatten().to_numpy(zero_copy_only=False), dtype=dtype)
        offsets = lists.offsets.to_numpy()
        cols[name] = np.split(flat, (offsets[1:-1] - offsets[0]).tolist())
    for i, image_id in enumerate(table.column("image_id").to_pylist()):
        out[image_id] = (cols["boxes"][i].reshape(-1, 4), cols["scores"][i], cols["levels"][i])
    return out


def timed(fn, *args):
    """(seconds, result) of ``fn(*args)``."""
    t0 = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - t0, result


def latency_summary(ms: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(ms)), "p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95)), "max": float(np.max(ms))}


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--proposals", type=int, default=1000, help="proposals per image")
    ap.add_argument("--shards", type=int, default=10)
    ap.add_argument("--rows-per-group", type=int, default=ROWS_PER_GROUP)
    ap.add_argument("--reads", type=int, default=1000, help="random single-image reads (per pass)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="where to write the files (default: a temporary dir)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "proposal_cache.json"))
    args = ap.parse_args(argv)

    items = make_proposals(args.images, args.proposals, args.seed)
    total = sum(len(it[2]) for it in items)
    shard_items = [items[s :: args.shards] for s in range(args.shards)]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_proposal_cache_"))
    work.mkdir(parents=True, exist_ok=True)
    meta = {"model_key": "bench", "image_size": "1333x800", "config_hash": "0"}

    def cache_write(root):
        cache = ProposalCache(root, meta, rows_per_group=args.rows_per_group)
        for s, chunk in enumerate(shard_items):
            cache.write_shard(f"part-{s:04d}", chunk)

    def raw_write(root):
        root.mkdir(parents=True)
        for s, chunk in enumerate(shard_items):
            pq.write_table(raw_table(chunk), root / f"part-{s:04d}.parquet")

    def raw_read(root, split):
        out = {}
        for s in range(args.shards):
            table = pq.read_table(root / f"part-{s:04d}.parquet")
            if split:
                out.update(split_rows(table))
        return out

    times = {k: [] for k in ("raw_write", "cache_write", "raw_read", "raw_read_table_only", "cache_read")}
    for r in range(args.repeats):
        raw_root, cache_root = work / f"raw{r}", work / f"cache{r}"
        for path in (raw_root, cache_root):
            shutil.rmtree(path, ignore_errors=True)
        first, second = (("raw", "cache") if r % 2 == 0 else ("cache", "raw"))
        for which in (first, second):
            if which == "raw":
                times["raw_write"].append(timed(raw_write, raw_root)[0])
            else:
                times["cache_write"].append(timed(cache_write, cache_root)[0])
        for which in (first, second):
            if which == "raw":
                t, got = timed(raw_read, raw_root, True)
                times["raw_read"].append(t)
                assert len(got) == args.images
                times["raw_read_table_only"].append(timed(raw_read, raw_root, False)[0])
            else:
                t, got = timed(ProposalCache(cache_root).read_all)
                times["cache_read"].append(t)
                assert len(got) == args.images
                np.testing.assert_array_equal(got[items[-1][0]][0], items[-1][1])

    open_ms = [1e3 * timed(len, ProposalCache(work / "cache0"))[0] for _ in range(args.repeats)]
    rng = np.random.default_rng(args.seed + 1)
    reader = ProposalCache(work / "cache0")
    cold, warm = [], []
    for lat, ids in ((cold, rng.integers(0, args.images, args.reads)), (warm, rng.integers(0, args.images, args.reads))):
        for image_id in ids.tolist():
            t0 = time.perf_counter()
            reader.get(image_id)
            lat.append((time.perf_counter() - t0) * 1e3)

    best = {k: min(v) for k, v in times.items()}
    result = {
        "config": {**vars(args), "total_proposals": total},
        "environment": {"pyarrow": pa.__version__, "numpy": np.__version__, "python": platform.python_version(),
                        "cpus": os.cpu_count(), "machine": platform.machine()},
        "seconds_all_repeats": times,
        "write_proposals_per_s": {"cache": total / best["cache_write"], "raw_pyarrow": total / best["raw_write"]},
        "read_proposals_per_s": {"cache": total / best["cache_read"], "raw_pyarrow": total / best["raw_read"],
                                 "raw_pyarrow_read_table_only": total / best["raw_read_table_only"]},
        "slowdown_vs_raw": {"write": best["cache_write"] / best["raw_write"], "read": best["cache_read"] / best["raw_read"],
                            "read_vs_read_table_only": best["cache_read"] / best["raw_read_table_only"]},
        "open_and_index_ms": min(open_ms),
        "random_read_ms": {"cold": latency_summary(cold), "warm": latency_summary(warm)},
        "bytes_per_proposal": {"cache": dir_bytes(work / "cache0") / total, "raw_pyarrow_default": dir_bytes(work / "raw0") / total,
                               "uncompressed_float32_payload": 4 * 4 + 4 + 1},
        "goals": GOALS,
    }
    result["goals_met"] = {
        "write_within_1.5x_raw": result["slowdown_vs_raw"]["write"] <= GOALS["max_slowdown_vs_raw"],
        "read_within_1.5x_raw": result["slowdown_vs_raw"]["read"] <= GOALS["max_slowdown_vs_raw"],
        "random_read_mean_under_5ms": result["random_read_ms"]["cold"]["mean"] < GOALS["max_random_read_ms"],
        "under_20_bytes_per_proposal": result["bytes_per_proposal"]["cache"] < GOALS["max_bytes_per_proposal"],
    }
    if args.workdir is None:
        shutil.rmtree(work)
    print_table(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")
    return result


def print_table(r: dict) -> None:
    c = r["config"]
    print(f"proposal cache benchmark: {c['images']} images x {c['proposals']} proposals, {c['shards']} shards, "
          f"{c['rows_per_group']} images/row group, best of {c['repeats']}")
    w, rd, s = r["write_proposals_per_s"], r["read_proposals_per_s"], r["slowdown_vs_raw"]
    rows = [
        ("write (Mproposals/s)", f"{w['cache'] / 1e6:.2f}", f"{w['raw_pyarrow'] / 1e6:.2f}", f"{s['write']:.2f}x"),
        ("read all (Mproposals/s)", f"{rd['cache'] / 1e6:.2f}", f"{rd['raw_pyarrow'] / 1e6:.2f}", f"{s['read']:.2f}x"),
        ("  raw read_table only", "", f"{rd['raw_pyarrow_read_table_only'] / 1e6:.2f}", f"{s['read_vs_read_table_only']:.2f}x"),
        ("bytes / proposal", f"{r['bytes_per_proposal']['cache']:.2f}", f"{r['bytes_per_proposal']['raw_pyarrow_default']:.2f}", ""),
        ("open + index (ms)", f"{r['open_and_index_ms']:.2f}", "", ""),
    ]
    for name in ("cold", "warm"):
        lat = r["random_read_ms"][name]
        rows.append((f"get() {name} ms mean / p95", f"{lat['mean']:.3f} / {lat['p95']:.3f}", "", ""))
    print(f"{'':28s} {'cache':>18s} {'raw pyarrow':>12s} {'cache/raw time':>15s}")
    for row in rows:
        print(f"{row[0]:28s} {row[1]:>18s} {row[2]:>12s} {row[3]:>15s}")
    print("goals met:", ", ".join(f"{k}={v}" for k, v in r["goals_met"].items()))


if __name__ == "__main__":
    main()
