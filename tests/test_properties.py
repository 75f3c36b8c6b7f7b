"""Property-based tests (hypothesis): random valid inputs never crash and keep the invariants of
the GA targets, the anchor and box transforms, the proposal cache and the config parser."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import box_iou

from ga_models.anchors import MAX_LOG_RATIO, assign_levels, boxes_from_centers, decode_shape
from ga_models.ga_rpn import PROPOSAL_DELTA_STDS
from ga_models.targets import approx_anchors, approx_viou, location_targets, shape_targets
from pipeline.config import ConfigError, build_config, flatten, resolve, to_dict
from stages.common.proposal_cache import ProposalCache

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
STRIDES = [4, 8, 16, 32, 64]


@st.composite
def images_with_boxes(draw, max_boxes=8):
    """(size, boxes Tensor[K, 4] xyxy inside a size x size image, each at least 2 px a side)."""
    size = draw(st.sampled_from([64, 96, 128, 256]))
    boxes = []
    for _ in range(draw(st.integers(0, max_boxes))):
        x1 = draw(st.floats(0, size - 2, allow_nan=False))
        y1 = draw(st.floats(0, size - 2, allow_nan=False))
        x2 = draw(st.floats(x1 + 2, size, allow_nan=False))
        y2 = draw(st.floats(y1 + 2, size, allow_nan=False))
        boxes.append((x1, y1, x2, y2))
    return size, torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)


def featmap_sizes(size):
    return [(math.ceil(size / s), math.ceil(size / s)) for s in STRIDES]


@SETTINGS
@given(images_with_boxes(), st.sampled_from([0.0, 0.5]), st.sampled_from([(0.2, 0.5), (0.1, 0.2), (0.5, 1.0)]),
       st.sampled_from([4.0, 8.0]))
def test_location_targets_are_ternary_and_every_box_has_a_positive_cell(image, offset, ratios, base):
    size, boxes = image
    sizes = featmap_sizes(size)
    targets = location_targets(boxes, sizes, STRIDES, *ratios, octave_base_scale=base, center_offset=offset)
    assert [tuple(t.shape) for t in targets] == sizes
    for t in targets:
        assert set(t.unique().tolist()) <= {-1.0, 0.0, 1.0}
    levels = assign_levels(boxes, STRIDES, base)
    for box, level in zip(boxes, levels.tolist()):
        stride, (height, width) = STRIDES[level], sizes[level]
        # the cell of the box centre (rounded in cell units, as the region edges) is positive
        cx, cy = ((box[:2] + box[2:]) / 2 / stride - offset).tolist()
        col = min(max(math.floor(cx + 0.5), 0), width - 1)
        row = min(max(math.floor(cy + 0.5), 0), height - 1)
        assert targets[level][row, col] == 1.0


@SETTINGS
@given(images_with_boxes(), st.sampled_from([3, 9, 15]))
def test_shape_labels_follow_the_viou_thresholds(image, samples):
    size, boxes = image
    approx = approx_anchors(featmap_sizes(size), STRIDES, samples, torch.device("cpu"), 4.0)
    t = shape_targets(boxes, approx, featmap_sizes(size), pos_iou=0.7, neg_iou=0.3, min_pos_iou=0.3)
    assert set(t.labels.unique().tolist()) <= {-1, 0, 1}
    assert bool((t.viou >= 0).all() and (t.viou <= 1 + 1e-6).all())
    assert bool((t.viou[t.labels == 0] < 0.3).all())  # negatives: below neg_iou for every box
    positive = t.labels == 1
    assert bool((t.viou[positive] >= 0.3 - 1e-6).all())  # positives: above min_pos_iou at least
    if len(boxes):
        # each positive's matched box is one of the ground truth
        matches = (t.matched_boxes[positive][:, None, :] == boxes[None]).all(-1).any(-1)
        assert bool(matches.all())
    assert bool((t.matched_boxes[~positive] == 0).all())


@SETTINGS
@given(images_with_boxes(), st.sampled_from([3, 9, 15]), st.sampled_from([0.0, 0.5]))
def test_grid_viou_is_box_iou_to_the_bit(image, samples, offset):
    """``approx_viou`` (separable per row and column) equals the best IoU of box_iou over the
    approximate anchors exactly: the same operations on the same operands."""
    size, boxes = image
    sizes = featmap_sizes(size)
    approx = approx_anchors(sizes, STRIDES, samples, torch.device("cpu"), 4.0, offset)  # [A, S, 4]
    expected = box_iou(boxes, approx.reshape(-1, 4)).view(len(boxes), len(approx), samples).amax(dim=2)
    assert torch.equal(approx_viou(boxes, approx, sizes), expected)


@st.composite
def boxes_and_anchors(draw, n=6):
    def box():
        x, y = draw(st.floats(-500, 500)), draw(st.floats(-500, 500))
        w, h = draw(st.floats(1, 800)), draw(st.floats(1, 800))
        return (x, y, x + w, y + h)

    boxes = torch.tensor([box() for _ in range(n)], dtype=torch.float64)
    anchors = torch.tensor([box() for _ in range(n)], dtype=torch.float64)
    return boxes, anchors


@SETTINGS
@given(boxes_and_anchors(), st.sampled_from([(1.0, 1.0, 1.0, 1.0), tuple(1.0 / s for s in PROPOSAL_DELTA_STDS)]))
def test_box_coding_round_trips(pair, weights):
    boxes, anchors = pair
    coder = BoxCoder(weights, bbox_xform_clip=math.log(1e6))
    ratio = (boxes[:, 2:] - boxes[:, :2]) / (anchors[:, 2:] - anchors[:, :2])
    assume(bool((ratio.log().abs() < math.log(1e6)).all()))
    decoded = coder.decode_single(coder.encode_single(boxes, anchors), anchors)
    torch.testing.assert_close(decoded, boxes, rtol=1e-9, atol=1e-6)


@SETTINGS
@given(st.floats(0.5, 2000), st.floats(0.5, 2000), st.sampled_from(STRIDES), st.sampled_from([4.0, 8.0]),
       st.floats(-100, 100), st.floats(-100, 100))
def test_guided_anchor_shapes_and_centres_round_trip(w, h, stride, base, cx, cy):
    wh = torch.tensor([w, h], dtype=torch.float64)
    pred = (wh / (base * stride)).log() / 0.14  # the inverse of decode_shape
    assert bool((pred.abs() * 0.14 <= MAX_LOG_RATIO).all())
    torch.testing.assert_close(decode_shape(pred, stride, base, 0.14), wh, rtol=1e-9, atol=0)
    box = boxes_from_centers(torch.tensor([cx, cy], dtype=torch.float64), wh)
    torch.testing.assert_close((box[:2] + box[2:]) / 2, torch.tensor([cx, cy], dtype=torch.float64))
    torch.testing.assert_close(box[2:] - box[:2], wh)


finite32 = st.floats(-1e6, 1e6, allow_nan=False, width=32)


@st.composite
def shards(draw):
    """Shards of distinct image ids: [[(image_id, boxes, scores, levels), ...], ...]."""
    ids = draw(st.lists(st.integers(0, 2**62), min_size=1, max_size=12, unique=True))
    items = []
    for image_id in ids:
        k = draw(st.integers(0, 5))
        boxes = np.array(draw(st.lists(finite32, min_size=4 * k, max_size=4 * k)), dtype=np.float32).reshape(k, 4)
        scores = np.array(draw(st.lists(finite32, min_size=k, max_size=k)), dtype=np.float32)
        levels = np.array(draw(st.lists(st.integers(0, 127), min_size=k, max_size=k)), dtype=np.int64)
        items.append((image_id, boxes, scores, levels))
    cut = draw(st.integers(1, len(items)))
    return [items[:cut], items[cut:]] if cut < len(items) else [items]


@SETTINGS
@given(shards(), st.integers(1, 4))
def test_proposal_cache_round_trip_is_exact(tmp_path_factory, parts, rows_per_group):
    root = tmp_path_factory.mktemp("cache")
    writer = ProposalCache(root, {"model": "x"}, rows_per_group=rows_per_group)
    for i, items in enumerate(parts):
        writer.write_shard(f"shard-{i}", items)
    reader = ProposalCache(root, {"model": "x"})
    everything = reader.read_all()
    expected = [item for items in parts for item in items]
    assert reader.image_ids() == [image_id for image_id, *_ in expected]
    for image_id, boxes, scores, levels in expected:
        for got in (reader.get(image_id), everything[image_id]):
            assert [a.tobytes() for a in got] == [boxes.tobytes(), scores.tobytes(), levels.tobytes()]
            assert [a.dtype for a in got] == [np.float32, np.float32, np.int64] and got[0].shape == (len(boxes), 4)


DEFAULT = flatten(to_dict(resolve("default")))


ANY_VALUE = st.one_of(st.booleans(), st.integers(), st.floats(), st.text(max_size=8), st.none(),
                      st.lists(st.integers(-2, 20), max_size=4))
TYPED = {bool: st.booleans(), int: st.integers(-5, 5000), float: st.floats(-1e3, 1e3, allow_nan=False),
         list: st.lists(st.integers(-2, 20), max_size=4), str: st.text(max_size=8), type(None): st.none()}


@SETTINGS
@pytest.mark.parametrize("kind", list(TYPED), ids=lambda k: k.__name__)
@given(data=st.data())
def test_any_override_is_applied_or_refused_naming_its_key(kind, data):
    """Every key, with values of its own type (most should apply) and of any other (refused)."""
    key = data.draw(st.sampled_from(sorted(k for k, v in DEFAULT.items() if type(v) is kind)))
    value = data.draw(TYPED[kind] | ANY_VALUE)
    text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
    try:
        cfg = resolve("default", [f"{key}={text}"])
    except ConfigError as e:
        assert key.rsplit(".", 1)[-1] in str(e) or key.split(".")[0] in str(e), (key, text, str(e))
        return
    got = flatten(to_dict(cfg))[key]
    expected = yaml.safe_load(text) if text else ""
    if isinstance(got, float):
        assert got == pytest.approx(float(expected)), (key, text)
    else:
        assert got == expected, (key, text)
    assert build_config(to_dict(cfg)) == cfg  # the resolved config reads back as itself
