"""GA-RetinaNet: the mode contract (torchvision's loss keys plus the GA ones; detections in the
original pixels), gradients, sparse (masked) inference equal to dense inference at the kept
locations, batch-size independence, clear errors, and a real learning signal (COCO AP50 on the
images it was trained on). Tiny backbone, 128 px images."""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from ga_models import GARetinaNet, GARetinaNetHead
from ga_models.backbones import build_backbone, tiny_body
from ga_models.retinanet import RETINA_GUIDANCE, SMOOTH_L1_BETA
from stages.common.metrics import evaluate_detections

NUM_CLASSES = 3  # background + 2 classes
LOSS_KEYS = {"classification", "bbox_regression", "loss_anchor_loc", "loss_anchor_shape"}
ALL_LOCATIONS = 16 * 16 + 8 * 8 + 4 * 4 + 2 * 2 + 1  # P3-P7 of a 128 x 128 input
COLOURS = {1: (0.9, 0.1, 0.1), 2: (0.1, 0.2, 0.9)}
# Two scenes of (box xyxy, label); sizes 24-60 px, so P3-P4 with the base scale 4 (32 px at P3).
SCENES = [
    [((12, 16, 52, 48), 1), ((70, 60, 118, 116), 2), ((20, 80, 44, 112), 2)],
    [((40, 10, 100, 50), 2), ((8, 70, 56, 120), 1), ((84, 84, 116, 108), 1)],
]


def p3p7_backbone(channels=32):
    """The tiny body with a P3-P7 FPN (strides 8-128), RetinaNet's layout."""
    return BackboneWithFPN(
        tiny_body(), {"c3": "0", "c4": "1", "c5": "2"}, [48, 64, 96], channels, extra_blocks=LastLevelP6P7(channels, channels)
    )


def model_p3p7(**kwargs):
    return GARetinaNet(p3p7_backbone(), NUM_CLASSES, min_size=128, max_size=128, **kwargs)


def scene(objects):
    """A 128 x 128 grey image with the objects painted in their class colour, and its target."""
    image = torch.full((3, 128, 128), 0.5)
    for (x1, y1, x2, y2), label in objects:
        image[:, y1:y2, x1:x2] = torch.tensor(COLOURS[label])[:, None, None]
    boxes = torch.tensor([box for box, _ in objects], dtype=torch.float32)
    return image, {"boxes": boxes, "labels": torch.tensor([label for _, label in objects])}


@pytest.fixture(scope="module")
def trained():
    """GA-RetinaNet trained on the first scene (200 Adam steps, about 8 s on 2 cores), and both
    scenes' images (the second one unseen) and targets.

    Adam rather than SGD: with torchvision's head init (N(0, 0.01)) a 32-channel tower shrinks the
    signal ~6x per conv, and SGD (lr 0.01-0.1, momentum 0.9) left the outputs spatially constant
    for 200 steps; Adam's per-parameter steps do not depend on that scale. On this seed AP50 on
    the training image is 0.67 after 80 steps, 0.92 after 120 and 1.0 after 200."""
    torch.manual_seed(0)
    model = model_p3p7()
    images, targets = zip(*(scene(s) for s in SCENES))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(200):
        losses = model([images[0]], [targets[0]])
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    return model.eval(), list(images), list(targets)


def test_a_training_step_gives_the_four_losses_and_gradients_to_every_branch():
    torch.manual_seed(0)
    model = model_p3p7().train()
    image, target = scene(SCENES[0])
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    losses = model([image, torch.rand(3, 128, 128)], [target, empty])
    assert set(losses) == LOSS_KEYS
    assert all(v.dim() == 0 and torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    branches = ("conv_loc", "conv_shape", "feature_adaption_cls", "feature_adaption_reg", "conv_cls", "conv_reg", "cls_convs", "reg_convs")
    for name in branches:
        grads = [p.grad for n, p in model.head.named_parameters() if n.startswith(name)]
        assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads), name
    assert model.anchor_generator is None and not any("anchor_generator" in k for k in model.state_dict())


def test_images_without_boxes_train():
    torch.manual_seed(0)
    model = model_p3p7().train()
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    losses = model([torch.rand(3, 128, 128)], [empty])
    assert losses["bbox_regression"].item() == 0.0 and losses["loss_anchor_shape"].item() == 0.0
    assert losses["classification"].item() > 0 and losses["loss_anchor_loc"].item() > 0  # all negatives
    sum(losses.values()).backward()


def test_eval_gives_torchvision_detections_in_the_original_pixels():
    torch.manual_seed(0)
    model = model_p3p7(loc_threshold=0.0, score_thresh=0.0, detections_per_img=50).eval()  # untrained: scores ~0.01
    images = [torch.rand(3, 100, 150), torch.rand(3, 128, 96)]
    with torch.no_grad():
        outputs = model(images)
    for image, out in zip(images, outputs):
        assert set(out) == {"boxes", "scores", "labels", "num_anchors"}
        boxes, scores, labels = out["boxes"], out["scores"], out["labels"]
        assert 0 < boxes.shape[0] <= 50 and boxes.shape[1] == 4 and scores.shape == labels.shape == boxes.shape[:1]
        height, width = image.shape[-2:]
        assert (boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= width).all()
        assert (boxes[:, 1::2] >= 0).all() and (boxes[:, 1::2] <= height).all()
        assert (boxes[:, 2:] >= boxes[:, :2]).all()
        assert ((scores >= 0) & (scores <= 1)).all() and (scores[:-1] >= scores[1:]).all()
        assert labels.dtype == torch.int64 and labels.min() >= 1 and labels.max() < NUM_CLASSES
        assert out["num_anchors"].dtype == torch.int64 and out["num_anchors"].dim() == 0


def test_strides_4_to_64_on_the_p2_p6_backbone():
    torch.manual_seed(0)
    model = GARetinaNet(build_backbone("tiny", 32), NUM_CLASSES, replace(RETINA_GUIDANCE, strides=(4, 8, 16, 32, 64)),
                        min_size=128, max_size=128)
    image, target = scene(SCENES[0])
    losses = model.train()([image], [target])
    assert set(losses) == LOSS_KEYS
    sum(losses.values()).backward()
    model.eval().loc_threshold = 0.0
    with torch.no_grad():
        out = model([image])[0]
    assert out["num_anchors"] == 32 * 32 + 16 * 16 + 8 * 8 + 4 * 4 + 2 * 2


def test_overfits_its_training_image(trained, tmp_path):
    """COCO AP50 on the training image, with pycocotools through stages.common.metrics."""
    model, images, targets = trained
    images, targets = images[:1], targets[:1]
    with torch.no_grad():
        outputs = model(images)
    coco = {
        "images": [{"id": i + 1, "width": 128, "height": 128, "file_name": f"{i}.png"} for i in range(len(images))],
        "categories": [{"id": 1, "name": "red"}, {"id": 2, "name": "blue"}],
        "annotations": [
            {"id": 10 * i + k + 1, "image_id": i + 1, "category_id": int(label), "bbox": [x1, y1, x2 - x1, y2 - y1], "iscrowd": 0}
            for i, t in enumerate(targets)
            for k, ((x1, y1, x2, y2), label) in enumerate(zip(t["boxes"].tolist(), t["labels"]))
        ],
    }
    ann_file = tmp_path / "train.json"
    ann_file.write_text(json.dumps(coco))
    detections = {i + 1: (o["boxes"].numpy(), o["scores"].numpy(), o["labels"].numpy()) for i, o in enumerate(outputs)}
    metrics = evaluate_detections(ann_file, detections)
    assert metrics["AP50"] > 0.5, metrics
    assert all(np.isfinite(v) for k, v in metrics.items() if k in ("AP", "AP50", "AP75"))


def test_location_threshold_keeps_fewer_anchors(trained):
    model, images, _ = trained
    counts = {}
    with torch.no_grad():
        for threshold in (0.0, 0.01, 0.5):
            model.loc_threshold = threshold
            counts[threshold] = [int(o["num_anchors"]) for o in model(images)]
    model.loc_threshold = 0.01
    for dense, default, high in zip(counts[0.0], counts[0.01], counts[0.5]):
        assert dense == ALL_LOCATIONS and high < default <= dense
    assert counts[0.5][0] > 0  # the training image's object centres pass 0.5


def test_masked_head_equals_the_dense_head_at_the_kept_locations(trained):
    """The final 3x3 convs read the adapted features around each kept location: the adaption runs on
    the mask dilated by 3x3, so the kept outputs are exactly the dense ones."""
    model, images, _ = trained
    with torch.no_grad():
        features = list(model.backbone(model.transform(images)[0].tensors).values())
        dense = model.head(features, 0.0)
        sparse = model.head(features, 0.3)
    kept = 0
    for d, s in zip(dense, sparse):
        assert d.mask is None and s.mask is not None
        mask = s.mask[:, None].expand_as(s.cls)  # [N, K, H, W]
        torch.testing.assert_close(s.cls[mask], d.cls[mask], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(s.reg[s.mask[:, None].expand_as(s.reg)], d.reg[s.mask[:, None].expand_as(d.reg)], rtol=1e-4, atol=1e-5)
        assert (s.cls[~mask] == 0).all()
        kept += int(s.mask.sum())
    assert 0 < kept < ALL_LOCATIONS * len(images)


def test_masked_inference_keeping_every_location_equals_dense_inference(trained):
    model, images, _ = trained
    with torch.no_grad():
        model.loc_threshold = 0.0  # dense: no mask
        dense = model(images)
        model.loc_threshold = torch.finfo(torch.float32).tiny  # masked path, every location kept
        masked = model(images)
        model.loc_threshold = 0.01
    for d, m in zip(dense, masked):
        assert int(m["num_anchors"]) == int(d["num_anchors"]) == ALL_LOCATIONS
        torch.testing.assert_close(m["boxes"], d["boxes"], rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(m["scores"], d["scores"], rtol=1e-4, atol=1e-5)
        assert torch.equal(m["labels"], d["labels"])


@pytest.mark.parametrize("threshold", [0.0, 0.3])  # dense; sparse with per-image masks
def test_an_image_gets_the_same_detections_alone_and_in_a_batch(trained, threshold):
    model, images, _ = trained
    model.loc_threshold = threshold
    with torch.no_grad():
        batched = model(images)
        singles = [model([image])[0] for image in images]
    model.loc_threshold = 0.01
    for b, s in zip(batched, singles):
        assert b["boxes"].shape[0] > 0 and int(b["num_anchors"]) == int(s["num_anchors"])
        torch.testing.assert_close(b["boxes"], s["boxes"], rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(b["scores"], s["scores"], rtol=1e-4, atol=1e-5)
        assert torch.equal(b["labels"], s["labels"])


def test_head_defaults_follow_the_reference():
    head = GARetinaNetHead(32, NUM_CLASSES)
    assert len(head.cls_convs) == len(head.reg_convs) == 4
    assert head.conv_cls.kernel_size == head.conv_reg.kernel_size == (3, 3)
    assert head.conv_cls.out_channels == NUM_CLASSES and head.conv_reg.out_channels == 4 and head.conv_shape.out_channels == 2
    assert head.feature_adaption_cls.conv_offset.out_channels == 4 * 2 * 9  # deform_groups 4
    torch.testing.assert_close(head.conv_cls.bias, torch.full((NUM_CLASSES,), -4.59512), atol=1e-5, rtol=0)
    assert head.smooth_l1_beta == SMOOTH_L1_BETA == 0.04 and head.box_coder.weights == (1.0, 1.0, 1.0, 1.0)
    model = model_p3p7()
    assert model.box_coder is model.head.box_coder  # one coder encodes the targets and decodes the detections
    assert model.proposal_matcher.high_threshold == 0.5 and model.proposal_matcher.low_threshold == 0.5
    g = model.guidance
    assert g.strides == (8, 16, 32, 64, 128) and g.octave_base_scale == 4.0
    assert (g.shape_pos_iou, g.shape_neg_iou, g.shape_min_pos_iou) == (0.5, 0.4, 0.4)


def test_bad_setups_and_inputs_raise_clear_errors():
    with pytest.raises(TypeError, match="anchor_generator"):
        model_p3p7(anchor_generator=object())
    image, target = scene(SCENES[0])
    four_levels = GARetinaNet(p3p7_backbone(), NUM_CLASSES, replace(RETINA_GUIDANCE, strides=(8, 16, 32, 64)), min_size=128,
                              max_size=128).train()
    with pytest.raises(ValueError, match="5 FPN levels but strides has 4"):
        four_levels([image], [target])
    wrong_strides = GARetinaNet(build_backbone("tiny", 32), NUM_CLASSES, min_size=128, max_size=128).train()  # P2-P6 maps, P3-P7 strides
    with pytest.raises(ValueError, match="do the strides"):
        wrong_strides([image], [target])
    model = model_p3p7().train()
    with pytest.raises(ValueError, match=r"labels'\] must be in \[1, 3\)"):
        model([image], [{"boxes": target["boxes"], "labels": torch.tensor([1, 3, 2])}])
    with pytest.raises(ValueError, match="int64 Tensor"):
        model([image], [{"boxes": target["boxes"]}])
    with pytest.raises(ValueError, match="x2 <= x1"):
        model([image], [{"boxes": torch.tensor([[5.0, 5.0, 5.0, 9.0]]), "labels": torch.tensor([1])}])
    with pytest.raises(ValueError, match="targets are required"):
        model([image])
