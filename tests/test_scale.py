"""COCO scale on this machine (issue 13), through benchmarks/bench_scale.py's measured runs of the
real CLI: the data node validates a COCO-sized dataset, and a 20,000-image val split is cached
and evaluated, each within a memory bound. Minutes each: `make test-slow`."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_scale  # noqa: E402

pytestmark = pytest.mark.slow
MAX_PEAK_PROCESS_GB = 4.0  # no process of the run may hold more than this (the machine has 24)


def test_the_data_node_validates_a_coco_sized_dataset_in_bounded_memory(tmp_path):
    result = bench_scale.measure_coco(tmp_path / "coco", bench_scale.COCO_TRAIN["images"], bench_scale.COCO_TRAIN["boxes"])
    assert result["peak_process_rss_gb"] < MAX_PEAK_PROCESS_GB, result


def test_20000_images_are_cached_and_evaluated_in_bounded_memory(tmp_path):
    result = bench_scale.measure_images(tmp_path / "images", 20_000)
    assert result["cached_images"] == {"val": 20_000, "train": 8}, result
    assert 0 < result["AR_1000"] <= 1, result
    assert result["peak_process_rss_gb"] < MAX_PEAK_PROCESS_GB, result
