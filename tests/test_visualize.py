"""The visualize stage through ``run`` on tiny inputs (the smoke data, randomly initialised proposers
of the smoke preset saved as trained ones, their proposal caches from the proposals stage), and
its pure helpers on hand-built maps."""

import json
import struct
from dataclasses import replace

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from ga_models import build_proposer, introspect
from pipeline.config import resolve
from stages import data, proposals, visualize
from stages.common import anchor_stats, figures
from stages.common.datasets import open_split
from stages.common.io import save_torch
from stages.contract import LocalExecutor, local_input, local_output

SMOKE = resolve("smoke")
RPN, GA_RPN = SMOKE.proposer_for("rpn"), SMOKE.proposer_for("ga_rpn")
CFG = visualize.VisualizeConfig(RPN, GA_RPN, num_images=2, top_proposals=5, shape_images=3)
NO_LOCATION = replace(GA_RPN, use_location=False)
NO_SHAPE = replace(GA_RPN, use_shape=False, use_feature_adaption=False)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def trained_node(root, data_input, cfg, seed):
    """train/<kind> (a random model saved as the trained one) and proposals/<kind> (its val cache)."""
    kind = cfg.kind
    train_dir = root / f"train_{kind}_{seed}"
    train_dir.mkdir()
    torch.manual_seed(seed)
    save_torch(build_proposer(cfg).state_dict(), train_dir / "model.pt")
    train = local_input(f"train/{kind}", train_dir, {"outputs": {"model": "model.pt"}})
    out = local_output(root / f"proposals_{kind}_{seed}")
    stage_cfg = proposals.ProposalsStageConfig(cfg, proposals.ProposalsConfig(num_shards=1, batch_size=4))
    result = proposals.run(stage_cfg, {"data": data_input, train.node_id: train}, out, LocalExecutor())
    return {train.node_id: train, f"proposals/{kind}": local_input(f"proposals/{kind}", out.dir, {"outputs": result.outputs})}


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    """Node inputs by id: the data, both proposers, and GA-RPNs without location ("ga_no_loc") or
    shape ("ga_no_shape") branch."""
    root = tmp_path_factory.mktemp("visualize")
    out = local_output(root / "data")
    result = data.run(SMOKE.data, {}, out, LocalExecutor())
    data_input = local_input("data", out.dir, {"outputs": result.outputs})
    return {
        "data": data_input,
        **trained_node(root, data_input, RPN, seed=0),
        **trained_node(root, data_input, GA_RPN, seed=1),
        "ga_no_loc": trained_node(root, data_input, NO_LOCATION, seed=2),
        "ga_no_shape": trained_node(root, data_input, NO_SHAPE, seed=3),
    }


def inputs_with(nodes, ga_nodes=None):
    inputs = {k: v for k, v in nodes.items() if not k.startswith("ga_no_")}
    return {**inputs, **(ga_nodes or {})}


@pytest.fixture(scope="module")
def visualized(nodes, tmp_path_factory):
    out = local_output(tmp_path_factory.mktemp("visualize_out"))
    return out, visualize.run(CFG, inputs_with(nodes), out, LocalExecutor())


def png_size(path):
    """(width, height) from the IHDR chunk, after checking the PNG signature."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def test_writes_pngs_of_the_expected_size_and_not_blank(visualized):
    out, result = visualized
    assert result.outputs == {"plots": ["examples.png", "anchor_shapes.png", "iou_distribution.png"],
                              "anchor_shapes": "anchor_shapes.json", "iou_distribution": "iou_distribution.json"}
    assert set(result.artifacts) == {"examples.png", "anchor_shapes.png", "iou_distribution.png", "anchor_shapes.json",
                                     "iou_distribution.json"}
    # figsize x 100: (5 x 3, 2 x 3), (10, 4), (5, 4)
    expected = {"examples.png": (1500, 600), "anchor_shapes.png": (1000, 400), "iou_distribution.png": (500, 400)}
    assert figures.examples_figsize(2) == (15.0, 6.0)
    for name, size in expected.items():
        assert png_size(out.dir / name) == size
        pixels = imread(out.dir / name)
        assert pixels.shape[:2] == size[::-1] and pixels[..., :3].var() > 0


def test_anchor_shapes_json_counts(visualized, nodes):
    out, result = visualized
    summary = json.loads((out.dir / "anchor_shapes.json").read_text())
    assert summary["shape_images"] == 3 and summary["loc_threshold"] == GA_RPN.loc_threshold
    sets = summary["sets"]
    assert list(sets) == ["ground_truth", "guided_anchors", "sliding_window_anchors"]
    val = open_split(nodes["data"].local_dir(), nodes["data"].outputs["splits"]["val"])
    assert sets["ground_truth"]["count"] == sum(len(val[i][1]["boxes"]) for i in range(3))
    # the RPN's anchors of one 128 px image: 3 ratios x (32^2 + 16^2 + 8^2 + 4^2 + 2^2) locations of P2-P6
    assert sets["sliding_window_anchors"]["count"] == 3 * 1364
    # the proposals stage counted the same anchors (the model's own num_anchors) on the same images
    stats = json.loads((nodes["proposals/rpn"].local_dir() / "stats.json").read_text())
    assert sets["sliding_window_anchors"]["count"] == stats["num_anchors"][0]
    ga_stats = json.loads((nodes["proposals/ga_rpn"].local_dir() / "stats.json").read_text())
    first = [n for i, n in zip(ga_stats["image_ids"], ga_stats["num_anchors"]) if i in val.image_ids[:3]]
    assert sets["guided_anchors"]["count"] == sum(first) == pytest.approx(3 * result.metrics["guided_anchors_per_image"])
    for stats in sets.values():
        for quantity in ("scale", "aspect_ratio"):
            hist = stats[quantity]
            assert sum(hist["counts"]) == stats["count"] and len(hist["bin_edges"]) == len(hist["counts"]) + 1
            if stats["count"]:
                assert hist["q10"] <= hist["median"] <= hist["q90"]


def test_location_metrics_are_fractions(visualized):
    _, result = visualized
    fit = {f"best_anchor_iou_{kind}{suffix}" for kind in ("rpn", "ga_rpn") for suffix in ("", "_tall", "_square", "_wide")}
    assert set(result.metrics) == {"loc_kept_fraction", "gt_centers_dropped", "guided_anchors_per_image",
                                   "proposals_iou70_rpn", "proposals_iou70_ga_rpn", *fit}
    assert 0 <= result.metrics["loc_kept_fraction"] <= 1 and 0 <= result.metrics["gt_centers_dropped"] <= 1
    assert 0 <= result.metrics["guided_anchors_per_image"] <= 1364
    assert 0 < result.metrics["best_anchor_iou_rpn"] <= 1 and 0 <= result.metrics["best_anchor_iou_ga_rpn"] <= 1


def test_best_anchor_iou_per_box_and_aspect_bin_by_hand():
    """Each box takes its own image's best anchor; the bins are the evaluation's (h / w >= 2 tall,
    < 1/2 wide); an image without anchors gives its boxes 0, an empty bin NaN."""
    gt = [torch.tensor([[0.0, 0.0, 10.0, 40.0], [0.0, 0.0, 10.0, 10.0]]), torch.tensor([[0.0, 0.0, 40.0, 10.0]])]
    anchors = [torch.tensor([[0.0, 0.0, 10.0, 20.0], [0.0, 0.0, 10.0, 10.0]]), torch.zeros(0, 4)]
    ious = anchor_stats.best_anchor_ious(gt, anchors)
    torch.testing.assert_close(ious, torch.tensor([0.5, 1.0, 0.0]))  # tall: 200 / 400; square: exact; no anchors
    means = anchor_stats.mean_by_aspect(torch.cat(gt), ious)
    assert means == {"tall": 0.5, "square": 1.0, "wide": 0.0}
    assert np.isnan(anchor_stats.mean_by_aspect(gt[0][1:], ious[1:2])["tall"])


def test_without_location_branch_everything_is_kept(nodes, tmp_path):
    cfg = replace(CFG, ga_rpn=NO_LOCATION, num_images=1)
    out = local_output(tmp_path)
    result = visualize.run(cfg, inputs_with(nodes, nodes["ga_no_loc"]), out, LocalExecutor())
    assert result.metrics["loc_kept_fraction"] == 1.0 and result.metrics["gt_centers_dropped"] == 0.0
    assert result.metrics["guided_anchors_per_image"] == 1364
    assert png_size(out.dir / "examples.png") == (1500, 300)


def test_without_shape_branch_guided_anchors_are_squares(nodes, tmp_path):
    out = local_output(tmp_path)
    visualize.run(replace(CFG, ga_rpn=NO_SHAPE, num_images=1), inputs_with(nodes, nodes["ga_no_shape"]), out, LocalExecutor())
    guided = json.loads((out.dir / "anchor_shapes.json").read_text())["sets"]["guided_anchors"]
    assert guided["count"] > 0 and guided["aspect_ratio"]["q10"] == guided["aspect_ratio"]["q90"] == pytest.approx(1.0)
    assert png_size(out.dir / "examples.png") == (1500, 300) and imread(out.dir / "examples.png")[..., :3].var() > 0


def test_proposals_of_another_model_are_refused(nodes, tmp_path):
    inputs = inputs_with(nodes)
    inputs["train/ga_rpn"] = replace(inputs["train/ga_rpn"], key="retrained")
    with pytest.raises(ValueError, match="proposals/ga_rpn: val proposals of model 'local'"):
        visualize.run(CFG, inputs, local_output(tmp_path), LocalExecutor())


@pytest.mark.parametrize("field, value, message", [
    ("num_images", 0, "visualize.num_images must be >= 1, got 0"),
    ("shape_images", -1, "visualize.shape_images must be >= 1, got -1"),
    ("rpn", GA_RPN, "visualize.rpn.kind must be 'rpn', got 'ga_rpn'"),
])
def test_config_errors_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        replace(CFG, **{field: value})


def test_max_over_levels_of_two_hand_built_levels():
    # a 4 x 4 image seen at its own size; level 0: stride 2, a 2 x 2 grid; level 1: stride 4, 1 x 1
    p0, v0 = torch.tensor([[0.1, 0.9], [0.3, 0.2]]), torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    p1, v1 = torch.tensor([[0.5]]), torch.tensor([[-1.0]])
    up = [introspect.level_to_pixels(m, s, 0.5, (4, 4), (4, 4)) for m, s in ((p0, 2), (v0, 2), (p1, 4), (v1, 4))]
    # level 0: pixel rows/cols 0-1 -> cell 0, 2-3 -> cell 1 (floor((y + 0.5) / 2)): 2 x 2 blocks
    assert torch.equal(up[0], p0.repeat_interleave(2, 0).repeat_interleave(2, 1))
    prob, value = introspect.max_over_levels(torch.stack([up[0], up[2]]), torch.stack([up[1], up[3]]))
    # only the top-right block (0.9) beats level 1's 0.5; there the value is level 0's 2, elsewhere level 1's -1
    assert torch.equal(prob, torch.tensor([[0.5, 0.5, 0.9, 0.9]] * 2 + [[0.5] * 4] * 2))
    assert torch.equal(value, torch.tensor([[-1.0, -1.0, 2.0, 2.0]] * 2 + [[-1.0] * 4] * 2))
    # an 8 x 8 original resized to the 4 x 4 input: each level-0 cell covers 4 x 4 original pixels
    assert torch.equal(introspect.level_to_pixels(p0, 2, 0.5, (4, 4), (8, 8)), p0.repeat_interleave(4, 0).repeat_interleave(4, 1))
    # anchor centres at j s (offset 0): pixel centres 0.5, 1.5, 2.5, 3.5 are nearest to cells 0, 1, 1, 2 -> clamped to 1
    assert introspect.level_to_pixels(p0, 2, 0.0, (4, 4), (4, 4))[:, 0].tolist() == pytest.approx([0.1, 0.3, 0.3, 0.3])


def test_dropped_centers_by_hand():
    prob = torch.tensor([[0.5, 0.5, 0.9, 0.9]] * 2 + [[0.5] * 4] * 2)
    boxes = torch.tensor([
        [0.0, 0.0, 4.0, 4.0],  # centre pixel (2, 2): p 0.5 < 0.6, dropped
        [2.0, 0.0, 4.0, 2.0],  # centre (3, 1): p 0.9, kept
        [3.0, 3.0, 5.0, 5.0],  # centre (4, 4) clamped to (3, 3): p 0.5, dropped
    ])
    assert introspect.dropped_centers(prob, boxes, 0.6).tolist() == [True, False, True]
    assert not introspect.dropped_centers(prob, boxes, 0.0).any()


def test_shape_summary_by_hand():
    gt = np.array([[0, 0, 2, 8], [0, 0, 8, 2]], dtype=np.float32)  # scales 4, 4; aspect ratios 4, 1/4
    summary = anchor_stats.shape_summary({"ground_truth": gt, "empty": np.zeros((0, 4), np.float32)})
    assert summary["ground_truth"]["count"] == 2 and summary["empty"]["count"] == 0
    assert summary["ground_truth"]["scale"]["median"] == pytest.approx(4.0)
    ratio = summary["ground_truth"]["aspect_ratio"]  # linear interpolation between 1/4 and 4
    assert (ratio["q10"], ratio["median"], ratio["q90"]) == pytest.approx((0.25 + 0.375, 2.125, 4.0 - 0.375))
    edges = summary["ground_truth"]["scale"]["bin_edges"]
    assert edges[0] == pytest.approx(2.0) and edges[-1] == pytest.approx(8.0)  # one value: widened 2x each way
    assert np.isnan(summary["empty"]["scale"]["median"]) and sum(summary["empty"]["aspect_ratio"]["counts"]) == 0


def test_iou_distribution_accumulates_with_decreasing_iou(visualized, nodes):
    out, result = visualized
    found = json.loads((out.dir / "iou_distribution.json").read_text())
    assert found["images"] == 3 and found["iou_thresholds"] == list(anchor_stats.IOU_THRESHOLDS)
    for kind in ("rpn", "ga_rpn"):
        counts = found["proposals_per_image"][kind]
        assert all(a >= b for a, b in zip(counts, counts[1:]))  # IoU >= 0.5 includes IoU >= 0.55 ...
        assert counts[4] == result.metrics[f"proposals_iou70_{kind}"]
        # at most the proposals cached for those images
        cache = visualize.val_cache(nodes[f"proposals/{kind}"], nodes[f"train/{kind}"])
        val = open_split(nodes["data"].local_dir(), nodes["data"].outputs["splits"]["val"])
        assert counts[0] <= sum(len(cache.get(i)[0]) for i in val.image_ids[:3]) / 3


def test_proposal_ious_by_hand():
    """Image 1: ground truth [0, 0, 10, 10]; proposals: itself (IoU 1), its left half (IoU 0.5),
    a disjoint box (0). Image 2: no ground truth, one proposal (0)."""

    class Cache:
        boxes = {1: np.array([[0, 0, 10, 10], [0, 0, 5, 10], [20, 20, 30, 30]], np.float32),
                 2: np.array([[0, 0, 4, 4]], np.float32)}

        def get(self, image_id):
            return self.boxes[image_id], None, None

    ious = anchor_stats.proposal_ious(Cache(), [1, 2], [torch.tensor([[0.0, 0, 10, 10]]), torch.zeros(0, 4)])
    np.testing.assert_allclose(ious, [1.0, 0.5, 0.0, 0.0])
    counts = anchor_stats.accumulated_counts(ious, num_images=2)
    assert counts[0] == 1.0 and counts[1:] == [0.5] * 9  # IoU >= 0.5: two of four proposals, per image
