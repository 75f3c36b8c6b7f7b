"""Hand-computed anchor-location and anchor-shape targets."""
import math

import pytest
import torch
from torchvision.ops import box_iou

from ga_models import location_targets, shape_targets
from ga_models.anchors import approx_shapes, assign_levels
from ga_models.targets import approx_anchors, sample_shape_locations

STRIDES = [4, 8, 16]
SIZES = [(16, 16), (8, 8), (4, 4)]  # a 64 x 64 input


def expected_map(size, ignore=(), positive=()):
    """A level map from inclusive (r0, r1, c0, c1) rectangles: ignore first, then positive."""
    target = torch.zeros(size)
    for r0, r1, c0, c1 in ignore:
        target[r0 : r1 + 1, c0 : c1 + 1] = -1
    for r0, r1, c0, c1 in positive:
        target[r0 : r1 + 1, c0 : c1 + 1] = 1
    return target


def test_level_assignment_boundaries():
    # s_min = 4, base 8: scale < 32*sqrt(2) -> P2, < 64*sqrt(2) -> P3, ... clamped to the last level
    side = torch.tensor([10.0, 45.0, 45.5, 90.0, 91.0, 181.0, 182.0, 1000.0])
    boxes = torch.stack([torch.zeros_like(side), torch.zeros_like(side), side, side], 1)
    assert assign_levels(boxes, [4, 8, 16, 32, 64]).tolist() == [0, 0, 1, 1, 2, 2, 3, 4]


def test_single_box_centre_ignore_and_adjacent_level():
    # 32x32 box -> level 0; grid box [2, 2, 10, 10]: CR (r=0.4) = 5..7, IR (r=0.25) = 4..8;
    # adjacent level 1: grid box [1, 1, 5, 5], IR = 2..4; level 2 is two levels away: all negative.
    targets = location_targets(torch.tensor([[8.0, 8.0, 40.0, 40.0]]), SIZES, STRIDES)
    assert torch.equal(targets[0], expected_map((16, 16), ignore=[(4, 8, 4, 8)], positive=[(5, 7, 5, 7)]))
    assert torch.equal(targets[1], expected_map((8, 8), ignore=[(2, 4, 2, 4)]))
    assert torch.equal(targets[2], torch.zeros(4, 4))


def test_centre_region_beats_other_boxes_ignore_region():
    # A = [8, 8, 40, 40]: CR cols 5..7; B = [20, 8, 52, 40] (grid [5, 2, 13, 10]): IR cols 7..11,
    # CR cols 8..10. Column 7 is A's CR and B's IR: the paper's rule keeps it positive.
    boxes = torch.tensor([[8.0, 8.0, 40.0, 40.0], [20.0, 8.0, 52.0, 40.0]])
    targets = location_targets(boxes, SIZES, STRIDES)
    expected = expected_map((16, 16), ignore=[(4, 8, 4, 8), (4, 8, 7, 11)], positive=[(5, 7, 5, 7), (5, 7, 8, 10)])
    assert torch.equal(targets[0], expected)
    assert targets[0][5:8, 7].eq(1).all()
    # the order of the boxes does not matter
    assert torch.equal(location_targets(boxes.flip(0), SIZES, STRIDES)[0], expected)


def test_box_at_image_border_is_clamped_to_the_grid():
    # 4x4 box in the bottom-right corner: grid [15, 15, 16, 16]; CR rounds to 15..16 -> clamped to 15.
    targets = location_targets(torch.tensor([[60.0, 60.0, 64.0, 64.0]]), SIZES, STRIDES)
    assert targets[0][15, 15] == 1
    assert (targets[0] == 1).sum() == 1
    assert targets[1][7, 7] == -1  # adjacent-level ignore, clamped too


def test_no_boxes_gives_all_negative_maps():
    targets = location_targets(torch.zeros(0, 4), SIZES, STRIDES)
    assert [tuple(t.shape) for t in targets] == SIZES
    assert all((t == 0).all() for t in targets)


@pytest.mark.parametrize(
    "boxes, message",
    [
        (torch.tensor([1.0, 2.0, 3.0, 4.0]), "shape"),
        (torch.tensor([[1, 2, 3, 4]]), "floating point"),
    ],
)
def test_malformed_boxes_are_rejected(boxes, message):
    # only the structure is checked here; box values (finite, x2 > x1) are the caller's, see
    # test_ga_rpn.py::test_bad_input_raises_a_clear_value_error
    with pytest.raises(ValueError, match=message):
        location_targets(boxes, SIZES, STRIDES)
    with pytest.raises(ValueError, match=message):
        shape_targets(boxes, approx_anchors(SIZES, STRIDES, 9, torch.device("cpu")), SIZES)


def test_approx_shape_sets():
    for k in (3, 9, 15):
        shapes = approx_shapes(k, stride=8)
        assert shapes.shape == (k, 2)
        # every sampled shape has an area of (8 * s * scale)^2 with scale in 2^(0, 1/3, 2/3)
        sides = (shapes[:, 0] * shapes[:, 1]).sqrt() / 64
        assert all(any(math.isclose(s, 2 ** (i / 3), rel_tol=1e-5) for i in range(3)) for s in sides.tolist())
    with pytest.raises(ValueError, match="approx_samples"):
        approx_shapes(4, stride=8)


def test_shape_targets_hand_checked():
    # one level, stride 8, 8x8 grid, K = 3 shapes (90.5x45.3, 64x64, 45.3x90.5) centred at ((j+.5)8, (i+.5)8).
    approx = approx_anchors([(8, 8)], [8], 3, torch.device("cpu"), center_offset=0.5)
    gt = torch.tensor([[-20.0, -20.0, 44.0, 44.0]])  # exactly the 64x64 sample at (i, j) = (1, 1)
    result = shape_targets(gt, approx, [(8, 8)])
    at = lambda i, j: i * 8 + j  # noqa: E731
    assert result.viou[at(1, 1)] == pytest.approx(1.0)
    assert result.viou[at(1, 2)] == pytest.approx(3584 / 4608)  # shifted 8 px: 56*64 / (2*64*64 - 56*64)
    assert result.viou[at(2, 2)] == pytest.approx(3136 / 5056)  # shifted 8 px both ways
    assert result.labels[at(1, 1)] == 1 and result.labels[at(1, 2)] == 1  # >= 0.7
    assert result.labels[at(2, 2)] == -1  # between 0.3 and 0.7: ignored
    # shifted 16 px both ways: the square sample gives 48*48 / (8192 - 48*48) = 0.391, the wide
    # 90.5 x 45.3 one overlaps 61.25 x 38.63 -> 2366 / (4096 + 4096 - 2366) = 0.406: vIoU takes the max.
    wide = 64 * 2**0.5
    inter = (44 - (28 - wide / 2)) * (44 - (28 - wide / 4))
    assert result.viou[at(3, 3)] == pytest.approx(max(2304 / 5888, inter / (8192 - inter)), rel=1e-5)
    assert result.labels[at(3, 3)] == -1
    assert result.labels[at(7, 7)] == 0  # shifted 48 px both ways: far below 0.3
    assert torch.equal(result.matched_boxes[at(1, 1)], gt[0])
    assert (result.matched_boxes[result.labels != 1] == 0).all()


@pytest.mark.parametrize("k", [3, 9, 15])
def test_viou_is_at_least_the_iou_of_every_sample(k):
    torch.manual_seed(k)
    approx = approx_anchors(SIZES, STRIDES, k, torch.device("cpu"))
    xy = torch.rand(6, 2) * 40
    gt = torch.cat([xy, xy + 24 + torch.rand(6, 2) * 36], dim=1)  # sides 24-60: every GT reaches vIoU >= 0.3
    result = shape_targets(gt, approx, SIZES)
    iou = box_iou(gt, approx.reshape(-1, 4)).view(6, -1, k)  # [K, A, S]
    assert (result.viou[None, :, None] >= iou - 1e-6).all()
    assert (result.labels == 1).any()
    # every GT claims at least one location (the min-pos rule)
    matched = result.matched_boxes[result.labels == 1]
    assert all((matched == g).all(dim=1).any() for g in gt)


def test_shape_targets_without_boxes_and_sampler():
    approx = approx_anchors(SIZES, STRIDES, 9, torch.device("cpu"))
    empty = shape_targets(torch.zeros(0, 4), approx, SIZES)
    assert (empty.labels == 0).all() and empty.labels.shape == (approx.shape[0],)
    labels = torch.full((1000,), 0, dtype=torch.int64)
    labels[:300] = 1
    sampled, negatives = sample_shape_locations([labels, torch.zeros(1000, dtype=torch.int64)], batch_size_per_image=256)
    assert sampled[0].sum() == 128 and sampled[0][300:].sum() == 0  # at most half of 256, positives only
    assert negatives[0].sum() == 128 and negatives[0][:300].sum() == 0  # the rest of 256, negatives
    assert sampled[1].sum() == 0 and negatives[1].sum() == 256


def test_location_loss_weights_and_normalisation_hand_computed():
    from ga_models.losses import location_loss

    # p = 0.5 everywhere: focal = alpha_t * 0.5^2 * ln 2; positives weigh 1, negatives 0.1,
    # ignored 0; the sum is divided by (4 locations / 200).
    focal = lambda alpha: alpha * 0.25 * math.log(2)  # noqa: E731
    loss = location_loss(torch.zeros(4), torch.tensor([1.0, 0.0, -1.0, 0.0]))
    expected = (focal(0.25) + 2 * 0.1 * focal(0.75)) / (4 / 200)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_bounded_iou_shape_loss_hand_computed():
    from ga_models.losses import bounded_iou_shape_loss

    # w: min(10/20, 20/10) = 0.5 -> gap 0.5 > beta: 0.5 - 0.1; h exact -> 0; second: gap 0.1 < beta: 0.5 * 0.1^2 / 0.2
    loss = bounded_iou_shape_loss(torch.tensor([[10.0, 20.0], [18.0, 30.0]]), torch.tensor([[20.0, 20.0], [20.0, 30.0]]))
    torch.testing.assert_close(loss, torch.tensor([0.4, 0.025]))


@pytest.mark.parametrize("norm", ["reference", "positives"])
def test_shape_loss_normalisations_hand_computed(norm):
    """One 8 x 8 level (stride 8, anchors 8 x 8 = 64 px squares where the shape output is 0) and
    one 40 x 64 box: every labelled location is sampled (P positives <= 128, P + Q <= 256), each
    positive costs the bounded-IoU loss of a 64 x 64 anchor against 40 x 64, and the sum is divided
    by P + Q ("reference": the sampled locations) or by P ("positives")."""
    from ga_models.guidance import AnchorGuidance
    from ga_models.head import LevelOutputs
    from ga_models.losses import bounded_iou_shape_loss
    from ga_models.targets import shape_targets

    guidance = AnchorGuidance((8,), octave_base_scale=8.0, shape_loss_norm=norm)
    box = torch.tensor([[12.0, 0.0, 52.0, 64.0]])
    out = LevelOutputs(None, torch.zeros(1, 2, 8, 8), torch.zeros(1, 1, 8, 8), torch.zeros(1, 4, 8, 8), None)
    labels = shape_targets(box, approx_anchors([(8, 8)], [8], 9, torch.device("cpu")), [(8, 8)]).labels
    positives, negatives = int((labels == 1).sum()), int((labels == 0).sum())
    assert 0 < positives <= 128 and positives + negatives <= 256
    per_location = bounded_iou_shape_loss(torch.tensor([[64.0, 64.0]]), torch.tensor([[40.0, 64.0]]))[0]
    divisor = positives + negatives if norm == "reference" else positives
    loss = guidance.shape_loss([out], [box], [(8, 8)])
    torch.testing.assert_close(loss, per_location * positives / divisor)


@pytest.mark.parametrize("offset", [0.0, 0.5])
def test_anchors_approx_anchors_and_location_targets_share_one_centre(offset):
    """On every level of a 512 px input (strides 4-64, base 8): a square box of 1.1 x the level's
    base size (35.2 x 2^l px), centred on the anchor centre of cell (k, k), gets the 3 x 3 positive
    cells around (k, k) (its centre region is +-0.88 cells), so the positives' anchor centres, and
    the approximate anchors' there, average exactly to the box centre."""
    from ga_models.anchors import grid_centers

    strides = [4, 8, 16, 32, 64]
    sizes = [(512 // s, 512 // s) for s in strides]
    approx = approx_anchors(sizes, strides, 9, torch.device("cpu"), center_offset=offset)  # [A, S, 4]
    starts = torch.tensor([0, *torch.tensor([h * w for h, w in sizes]).cumsum(0).tolist()])
    for level, (stride, (height, width)) in enumerate(zip(strides, sizes)):
        k = height // 2
        center = (k + offset) * stride
        half = 1.1 * 8 * stride / 2
        box = torch.tensor([[center - half, center - half, center + half, center + half]])
        targets = location_targets(box, sizes, strides, 0.2, 0.5, 8.0, center_offset=offset)
        positive = (targets[level] == 1).flatten()
        rows, cols = torch.nonzero(targets[level] == 1, as_tuple=True)
        assert sorted(set(rows.tolist())) == sorted(set(cols.tolist())) == [k - 1, k, k + 1], level
        centers = grid_centers(height, width, stride, torch.device("cpu"), offset)[positive]  # [9, 2]
        torch.testing.assert_close(centers.mean(0), torch.tensor([center, center]))
        approx_centers = approx[starts[level]:starts[level + 1]][positive].view(-1, 9, 2, 2).mean(dim=2)  # [9, S, 2]
        torch.testing.assert_close(approx_centers.mean(dim=(0, 1)), torch.tensor([center, center]))


def test_the_convention_before_sharing_one_put_positives_half_a_stride_off():
    """Targets on the j s grid under anchors at +0.5 stride (``targets_follow_offset=False``): the
    positive cells' anchors sit on average half a stride right of and below the box centre."""
    from ga_models.anchors import grid_centers

    box = torch.tensor([[16.0 - 17.6, 16.0 - 17.6, 16.0 + 17.6, 16.0 + 17.6]])  # centred on (16, 16), level 0
    positive = location_targets(box, [(16, 16)], [4], 0.2, 0.5, 8.0)[0] == 1  # the j s grid
    centers = grid_centers(16, 16, 4, torch.device("cpu"), 0.5)[positive.flatten()]
    torch.testing.assert_close(centers.mean(0), torch.tensor([18.0, 18.0]))  # +0.5 x stride 4
