"""GA-RPN, the RPN baseline and the standalone proposer: the mode contract, gradients,
ablation switches, the torchvision drop-in, a real learning signal, state dicts, bad input."""
import io

import pytest
import torch
from torchvision.models.detection import FasterRCNN
from torchvision.ops import box_iou

from ga_models import GARPN, ProposerConfig, build_proposal_network, build_proposer, load_state_dict_checked
from ga_models.backbones import build_backbone

GA_LOSSES = {"loss_objectness", "loss_rpn_box_reg", "loss_anchor_loc", "loss_anchor_shape"}
BOXES = torch.tensor([[10.0, 20.0, 30.0, 100.0], [50.0, 40.0, 120.0, 56.0], [70.0, 70.0, 110.0, 110.0]])


def toy_image():
    """A 128 x 128 image with the three BOXES painted in distinct colours: Tensor[3, 128, 128]."""
    image = torch.full((3, 128, 128), 0.2)
    for box, colour in zip(BOXES.long(), torch.eye(3)):
        image[:, box[1] : box[3], box[0] : box[2]] = colour[:, None, None]
    return image


def small(kind="ga_rpn", **overrides):
    return ProposerConfig(kind=kind, min_size=128, max_size=128, fpn_channels=32, **overrides)


def test_training_returns_the_four_losses_and_finite_gradients_everywhere():
    torch.manual_seed(0)
    model = build_proposer(small())
    model.train()
    empty = {"boxes": torch.zeros(0, 4)}
    losses = model([toy_image(), torch.rand(3, 128, 128)], [{"boxes": BOXES}, empty])
    assert set(losses) == GA_LOSSES
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, name
            assert torch.isfinite(param.grad).all(), name


def test_grids_cached_under_inference_mode_train_afterwards():
    """The undeformed sampling grid and the anchor centres are cached per map size: made first
    under ``torch.inference_mode`` (as the visualize stage runs), they still serve a training step of
    the same size in the same process, with the losses and gradients of a fresh process's."""
    from ga_models.anchors import grid_centers
    from ga_models.layers import _base_grid

    def step():
        torch.manual_seed(0)
        model = build_proposer(small()).train()
        losses = model([toy_image()], [{"boxes": BOXES}])
        sum(losses.values()).backward()
        return {k: v.item() for k, v in losses.items()}, model.rpn.head.feature_adaption.conv_offset.weight.grad

    _base_grid.cache_clear(), grid_centers.cache_clear()
    fresh_losses, fresh_grad = step()
    _base_grid.cache_clear(), grid_centers.cache_clear()
    with torch.inference_mode():
        build_proposer(small()).eval()([toy_image()])
    assert _base_grid.cache_info().currsize and grid_centers.cache_info().currsize
    losses, grad = step()
    assert losses == fresh_losses
    torch.testing.assert_close(grad, fresh_grad, rtol=0, atol=0)


def test_an_image_without_boxes_trains_with_zero_shape_loss():
    torch.manual_seed(0)
    model = build_proposer(small())
    model.train()
    losses = model([torch.rand(3, 128, 128)], [{"boxes": torch.zeros(0, 4)}])
    assert losses["loss_anchor_shape"].item() == 0.0
    assert losses["loss_anchor_loc"].item() > 0  # every location is a negative
    sum(losses.values()).backward()


@pytest.mark.parametrize("kind", ["rpn", "ga_rpn"])
def test_eval_returns_scored_boxes_inside_the_original_image(kind):
    torch.manual_seed(0)
    model = build_proposer(small(kind, post_nms_top_n=50)).eval()
    images = [torch.rand(3, 100, 150), torch.rand(3, 128, 128)]
    with torch.no_grad():
        outputs = model(images)
    for image, out in zip(images, outputs):
        assert set(out) == {"boxes", "scores", "levels", "num_anchors"}
        boxes, scores = out["boxes"], out["scores"]
        assert boxes.shape[1] == 4 and 0 < boxes.shape[0] <= 50 and scores.shape == boxes.shape[:1]
        height, width = image.shape[-2:]
        assert (boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= width).all()
        assert (boxes[:, 1::2] >= 0).all() and (boxes[:, 1::2] <= height).all()
        assert (scores[:-1] >= scores[1:]).all() and ((scores >= 0) & (scores <= 1)).all()
        assert out["levels"].min() >= 0 and out["levels"].max() <= 4
        assert out["num_anchors"] > 0


def test_location_threshold_reduces_anchors_and_batches_match_single_images():
    torch.manual_seed(0)
    model = build_proposer(small()).eval()
    images = [torch.rand(3, 128, 128) for _ in range(3)]
    with torch.no_grad():
        batched = model(images)
        singles = [model([image])[0] for image in images]
        model.rpn.loc_threshold = 0.0
        dense = model(images)
    for b, s, d in zip(batched, singles, dense):
        torch.testing.assert_close(b["boxes"], s["boxes"])
        torch.testing.assert_close(b["scores"], s["scores"])
        assert b["num_anchors"] < d["num_anchors"] == 32 * 32 + 16 * 16 + 8 * 8 + 4 * 4 + 2 * 2  # all P2-P6 locations


def param_names(**switches):
    return {name for name, _ in build_proposal_network(small(**switches), 32).named_parameters()}


def test_ablation_switches_change_the_parameter_set():
    full = param_names()
    assert {"head.conv_loc.weight", "head.conv_shape.weight", "head.feature_adaption.weight"} <= full
    assert not any(n.startswith("head.conv_loc") for n in param_names(use_location=False))
    assert not any("feature_adaption" in n for n in param_names(use_feature_adaption=False))
    no_shape = param_names(use_shape=False, use_feature_adaption=False)
    assert not any("conv_shape" in n for n in no_shape)
    no_ca = build_proposal_network(small(center_alignment=False), 32).head
    assert no_ca.conv_shape.out_channels == 4 and no_ca.feature_adaption.conv_offset.in_channels == 4
    plain = build_proposal_network(small(adaption="plain_deform"), 32).head
    assert plain.feature_adaption.conv_offset.in_channels == 32 and plain.feature_adaption.conv_offset.kernel_size == (3, 3)
    with pytest.raises(ValueError, match="use_feature_adaption"):
        small(use_shape=False)  # shape-guided adaption without a shape branch


@pytest.mark.parametrize(
    "switches",
    [dict(use_location=False), dict(use_shape=False, adaption="plain_deform"), dict(center_alignment=False), dict(approx_samples=15)],
)
def test_ablations_train_and_infer(switches):
    torch.manual_seed(0)
    model = build_proposer(small(**switches))
    losses = model.train()([toy_image()], [{"boxes": BOXES}])
    expected = set(GA_LOSSES)
    if not switches.get("use_location", True):
        expected.discard("loss_anchor_loc")
    if not switches.get("use_shape", True):
        expected.discard("loss_anchor_shape")
    assert set(losses) == expected
    sum(losses.values()).backward()
    with torch.no_grad():
        assert model.eval()([toy_image()])[0]["boxes"].shape[0] > 0


def test_ga_rpn_drops_into_torchvision_faster_rcnn_and_trains_a_step():
    torch.manual_seed(0)
    backbone = build_backbone("tiny", 32)
    detector = FasterRCNN(backbone, num_classes=4, min_size=128, max_size=128)
    detector.rpn = build_proposal_network(small(), backbone.out_channels)
    assert isinstance(detector.rpn, GARPN)
    optimizer = torch.optim.SGD(detector.parameters(), lr=0.01)
    losses = detector([toy_image()], [{"boxes": BOXES, "labels": torch.tensor([1, 2, 3])}])
    assert GA_LOSSES <= set(losses) and {"loss_classifier", "loss_box_reg"} <= set(losses)
    sum(losses.values()).backward()
    optimizer.step()
    detector.eval()
    with torch.no_grad():
        detections = detector([toy_image()])
    assert set(detections[0]) == {"boxes", "labels", "scores"}


def recall_at(model, iou=0.5, top=100):
    with torch.no_grad():
        out = model.eval()([toy_image()])[0]
    return (box_iou(BOXES, out["boxes"][:top]).max(dim=1).values >= iou).float().mean().item()


def test_ga_rpn_overfits_one_image():
    """A real learning signal: a few dozen steps on one image find all three boxes."""
    torch.manual_seed(0)
    model = build_proposer(ProposerConfig(kind="ga_rpn", min_size=128, max_size=128))
    before = recall_at(model, iou=0.7)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(100):
        losses = model.train()([toy_image()], [{"boxes": BOXES}])
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    assert recall_at(model, iou=0.5) == 1.0
    assert recall_at(model, iou=0.7) > before


def test_state_dict_round_trip_and_renamed_layers_fail_clearly():
    torch.manual_seed(0)
    model = build_proposer(small()).eval()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    restored = build_proposer(small()).eval()
    load_state_dict_checked(restored, state)
    image = [toy_image()]
    with torch.no_grad():
        torch.testing.assert_close(restored(image)[0]["boxes"], model(image)[0]["boxes"])
    renamed = {k.replace("conv_loc", "location_conv"): v for k, v in state.items()}
    with pytest.raises(ValueError, match="missing: rpn.head.conv_loc.bias.*unexpected: rpn.head.location_conv"):
        load_state_dict_checked(restored, renamed, "ckpt.pt")
    with pytest.raises(ValueError, match="shape mismatch"):
        load_state_dict_checked(build_proposer(small(center_alignment=False)), state)


@pytest.mark.parametrize(
    "images, targets, message",
    [
        ([torch.rand(3, 64, 64)], [{"boxes": torch.tensor([[5.0, 5.0, 5.0, 9.0]])}], "x2 <= x1"),
        ([torch.rand(3, 64, 64)], [{"boxes": torch.tensor([[5.0, float("nan"), 8.0, 9.0]])}], "not finite"),
        ([torch.rand(3, 64, 64)], [{"boxes": torch.tensor([5.0, 5.0, 8.0, 9.0])}], r"shape \[K, 4\]"),
        ([torch.rand(3, 64, 64)], [{"boxes": torch.tensor([[5, 5, 8, 9]])}], "floating point"),
        ([torch.rand(64, 64)], [{"boxes": torch.zeros(0, 4)}], r"images\[0\] must be a Tensor\[3, H, W\]"),
        ([torch.zeros(3, 64, 64, dtype=torch.uint8)], [{"boxes": torch.zeros(0, 4)}], "floating point"),
        ([torch.rand(3, 64, 64)], None, "targets are required"),
        ([torch.rand(3, 64, 64)], [{"labels": torch.zeros(0)}], "no 'boxes'"),
    ],
)
@pytest.mark.parametrize("kind", ["rpn", "ga_rpn"])
def test_bad_input_raises_a_clear_value_error(kind, images, targets, message):
    model = build_proposer(small(kind)).train()
    with pytest.raises(ValueError, match=message):
        model(images, targets)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="ProposerConfig.kind"):
        ProposerConfig(kind="fcos")
    with pytest.raises(ValueError, match="ProposerConfig.loc_threshold"):
        ProposerConfig(loc_threshold=1.5)
    with pytest.raises(ValueError, match="ProposerConfig.approx_samples"):
        ProposerConfig(approx_samples=4)
    with pytest.raises(ValueError, match="ProposerConfig.min_size"):
        ProposerConfig(min_size="256")
    with pytest.raises(ValueError, match="ProposerConfig.pretrained_backbone"):
        ProposerConfig(pretrained_backbone=True)  # the tiny backbone has no weights


def test_box_loss_beta_is_a_setting_per_network():
    """torchvision's loss at its beta 1/9 (same sampled anchors), and beta 1.0 by hand."""
    from torchvision.models.detection.rpn import RegionProposalNetwork

    torch.manual_seed(0)
    labels = [torch.tensor([1.0, 1.0, 0.0, 0.0, -1.0, 0.0]), torch.tensor([0.0, 1.0, 0.0, -1.0, 0.0, 0.0])]
    targets = [torch.randn(6, 4), torch.randn(6, 4)]
    deltas, objectness = torch.randn(12, 4), torch.randn(12)
    rpn = build_proposal_network(small("rpn"), 32)
    assert rpn.reg_beta == pytest.approx(1 / 9) and build_proposal_network(small(), 32).reg_beta == 1.0
    torch.manual_seed(1)
    ours = rpn.compute_loss(objectness, deltas, labels, targets)
    torch.manual_seed(1)
    theirs = RegionProposalNetwork.compute_loss(rpn, objectness, deltas, labels, targets)
    torch.testing.assert_close(ours, theirs)
    # every labelled anchor is sampled (2 + 1 positives, 3 + 4 negatives): box loss = sum over positives / 10
    rpn.reg_beta = 1.0
    _, box = rpn.compute_loss(objectness, deltas, labels, targets)
    pos = torch.cat(labels) == 1
    gap = (deltas[pos] - torch.cat(targets)[pos]).abs()
    expected = torch.where(gap < 1.0, 0.5 * gap**2, gap - 0.5).sum() / 10
    torch.testing.assert_close(box, expected)
    # each kind's setting is the other's default, so changing one never re-keys the other
    cfg = small(ga_reg_beta=0.5, rpn_reg_beta=0.25)
    assert cfg.for_kind("rpn").ga_reg_beta == 1.0 and cfg.for_kind("rpn").rpn_reg_beta == 0.25
    assert cfg.for_kind("ga_rpn").rpn_reg_beta == pytest.approx(1 / 9) and cfg.for_kind("ga_rpn").ga_reg_beta == 0.5
    with pytest.raises(ValueError, match="ProposerConfig.ga_reg_beta"):
        small(ga_reg_beta=-1.0)


def test_code_defaults_are_the_consistent_reference_choices_and_the_default_preset_keeps_its_measured_ones():
    from pipeline.config import resolve

    for cfg, expected in ((small(), (0.0, True, "reference", 1.0)),
                          (resolve("default").proposer_for("ga_rpn"), (0.0, True, "positives", 1.0))):
        network = build_proposal_network(cfg, 32)
        g = network.guidance
        assert (g.center_offset, g.targets_follow_offset, g.shape_loss_norm, network.reg_beta) == pytest.approx(expected)


def test_rpn_nine_anchor_variant_has_three_times_the_anchors():
    torch.manual_seed(0)
    three = build_proposer(small("rpn")).eval()
    nine = build_proposer(small("rpn", rpn_anchor_scales=3)).eval()
    with torch.no_grad():
        assert nine([toy_image()])[0]["num_anchors"] == 3 * three([toy_image()])[0]["num_anchors"]


@pytest.mark.parametrize("name, channels", [("resnet18", 32), ("resnet50", 64)])
def test_resnet_fpn_backbones_give_five_levels_at_the_fpn_strides(name, channels):
    backbone = build_backbone(name, channels).eval()  # no pretrained weights: nothing downloaded
    with torch.no_grad():
        features = backbone(torch.rand(1, 3, 128, 128))
    assert [tuple(f.shape) for f in features.values()] == [(1, channels, 128 // s, 128 // s) for s in (4, 8, 16, 32, 64)]
    assert all(p.requires_grad for p in backbone.parameters())  # random init: every stage trains
    with pytest.raises(ValueError, match="backbone"):
        build_backbone("vgg16", channels)


# Seeded losses of the small models on the toy image, at initialisation and after one SGD step
# (torch 2.14.1, CPU), as detectron2 pins its RPN's: a refactor that changes targets, sampling,
# normalisation or gradients changes them. Change a number only with a reason in the commit.
PINNED_LOSSES = {
    "rpn": [{"loss_objectness": 0.691249, "loss_rpn_box_reg": 0.046763},
            {"loss_objectness": 0.690624, "loss_rpn_box_reg": 0.046604}],
    "ga_rpn": [{"loss_anchor_loc": 3.816881, "loss_anchor_shape": 0.068337, "loss_objectness": 0.692983,
                "loss_rpn_box_reg": 0.169169},
               {"loss_anchor_loc": 3.796021, "loss_anchor_shape": 0.068328, "loss_objectness": 0.690596,
                "loss_rpn_box_reg": 0.179645}],
}


@pytest.mark.parametrize("kind", ["rpn", "ga_rpn"])
def test_seeded_losses_are_pinned(kind):
    torch.manual_seed(0)
    model = build_proposer(small(kind)).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for expected in PINNED_LOSSES[kind]:
        losses = model([toy_image()], [{"boxes": BOXES}])
        assert {k: float(v.detach()) for k, v in losses.items()} == pytest.approx(expected, abs=1e-4)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()


def test_the_dense_and_the_sparse_head_path_give_the_same_outputs(monkeypatch):
    """A level where the masked path does not pay runs dense and zeroes the dropped locations after:
    the same outputs as the masked path (forced both ways here, half the locations kept), batch of
    two; and the measured rule (``sparse_pays``) on the level sizes of a 256 px input."""
    from ga_models import head as head_module

    torch.manual_seed(0)
    head = head_module.GuidedAnchorHead(32).eval()
    x = torch.randn(2, 32, 16, 16)
    with torch.no_grad():
        loc = head.conv_loc(torch.relu(head.rpn_conv(x))).sigmoid()
        threshold = float(loc.median())
        outs = {}
        for pays, path in ((True, "sparse"), (False, "dense")):
            monkeypatch.setattr(head_module, "sparse_pays", lambda mask, pays=pays: pays)
            outs[path] = head.forward_level(x, threshold)
    sparse, dense = outs["sparse"], outs["dense"]
    assert torch.equal(sparse.mask, dense.mask) and 0.3 < sparse.mask.float().mean() < 0.7
    for a, b in ((sparse.cls, dense.cls), (sparse.reg, dense.reg)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        assert (a[~sparse.mask[:, None].expand_as(a)] == 0).all()
    monkeypatch.undo()

    def kept(size, fraction):
        mask = torch.zeros(1, size, size, dtype=torch.bool)
        mask.view(-1)[: round(fraction * size * size)] = True
        return head_module.sparse_pays(mask)

    assert kept(64, 0.54) and not kept(64, 0.55)  # 0.58 x 4096 - 145 = 2231 locations (54.5%)
    assert kept(32, 0.43) and not kept(32, 0.45)
    assert kept(16, 0.01) and not kept(16, 0.02)
    assert not kept(8, 0.03)  # the fixed cost never pays on 64 locations
