"""Every detector of the pipeline (``ga_models.detectors``) through its public contract: one
training step with torchvision's loss keys plus the GA ones, evaluation output in the image's
pixels; GA detectors overfit one image; the backbone hand-over from a trained proposer; the
cached proposals a Fast R-CNN reads (per image id, flipped with the image, a missing id named)."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from ga_models import ProposerConfig, build_proposer
from ga_models.detectors import DetectorConfig, RCNNSettings, backbone_parts, build_detector, load_backbone
from stages.common.detection import CachedProposals
from stages.common.metrics import evaluate_detections
from stages.common.proposal_cache import ProposalCache
from stages.contract import local_input

PROPOSER = dict(min_size=96, max_size=128, fpn_channels=16, octave_base_scale=4.0)
RCNN = {False: RCNNSettings(200, 100, 0.5, 64), True: RCNNSettings(50, 50, 0.6, 32)}
TORCHVISION_KEYS = {
    "fast_rcnn": {"loss_classifier", "loss_box_reg"},
    "faster_rcnn": {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"},
    "retinanet": {"classification", "bbox_regression"},
}
GA_KEYS = {"loss_anchor_loc", "loss_anchor_shape"}
NUM_CLASSES = 3  # labels 1, 2


def config(kind, guided, **proposer):
    return DetectorConfig(kind, guided, ProposerConfig(kind="ga_rpn" if guided else "rpn", **{**PROPOSER, **proposer}),
                          rcnn=None if kind == "retinanet" else RCNN[guided], representation_size=64,
                          retina_octave_base_scale=2.0, retina_group_norm=kind == "retinanet")


def scene(height=96, width=128):
    """An image with three flat rectangles (two of class 1, one of class 2) on grey, and its target."""
    image = torch.full((3, height, width), 0.5)
    boxes = torch.tensor([[10.0, 12.0, 40.0, 30.0], [60.0, 40.0, 76.0, 88.0], [90.0, 10.0, 120.0, 50.0]])
    labels = torch.tensor([1, 1, 2])
    colours = {1: (0.9, 0.1, 0.1), 2: (0.1, 0.2, 0.9)}
    for (x1, y1, x2, y2), label in zip(boxes.int().tolist(), labels.tolist()):
        image[:, y1:y2, x1:x2] = torch.tensor(colours[label])[:, None, None]
    return image, {"boxes": boxes, "labels": labels}


def proposals_around(boxes, seed=0):
    """Jittered copies of the boxes and random boxes, scored at random: stand-in cached proposals."""
    g = torch.Generator().manual_seed(seed)
    jitter = boxes.repeat(20, 1) + torch.randn(20 * len(boxes), 4, generator=g) * 4
    xy = torch.rand(60, 2, generator=g) * 90
    random = torch.cat([xy, xy + 8 + torch.rand(60, 2, generator=g) * 30], dim=1)
    out = torch.cat([jitter, random])
    out = torch.stack([out[:, 0], out[:, 1], torch.maximum(out[:, 2], out[:, 0] + 1), torch.maximum(out[:, 3], out[:, 1] + 1)], 1)
    return {"boxes": out, "scores": torch.rand(len(out), generator=g)}


@pytest.mark.parametrize("kind", ["fast_rcnn", "faster_rcnn", "retinanet"])
@pytest.mark.parametrize("guided", [False, True])
def test_one_training_step_and_evaluation(kind, guided):
    torch.manual_seed(0)
    model = build_detector(config(kind, guided), NUM_CLASSES)
    (a, ta), (b, tb) = scene(), scene(80, 100)
    tb = {"boxes": tb["boxes"][:1], "labels": tb["labels"][:1]}
    extra = {"proposals": [proposals_around(ta["boxes"]), proposals_around(tb["boxes"])]} if kind == "fast_rcnn" else {}
    losses = model([a, b], [ta, tb], **extra)
    assert set(losses) == TORCHVISION_KEYS[kind] | (GA_KEYS if guided and kind != "fast_rcnn" else set())
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())
    model.eval()
    with torch.no_grad():
        outputs = model([a, b], **extra)
    for out, (h, w) in zip(outputs, [(96, 128), (80, 100)]):
        boxes = out["boxes"]
        assert boxes.shape[1] == 4 and len(out["scores"]) == len(boxes) == len(out["labels"])
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
        assert ((out["scores"] >= 0) & (out["scores"] <= 1)).all()
        assert ((out["labels"] >= 1) & (out["labels"] < NUM_CLASSES)).all()


def coco_of(image_id, target, height, width, path):
    anns = [{"id": i + 1, "image_id": image_id, "category_id": int(c), "bbox": [x1, y1, x2 - x1, y2 - y1],
             "area": (x2 - x1) * (y2 - y1), "iscrowd": 0}
            for i, ((x1, y1, x2, y2), c) in enumerate(zip(target["boxes"].tolist(), target["labels"].tolist()))]
    path.write_text(json.dumps({"images": [{"id": image_id, "width": width, "height": height, "file_name": "x.png"}],
                                "annotations": anns, "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}))
    return path


@pytest.mark.parametrize("kind, steps", [("fast_rcnn", 60), ("faster_rcnn", 120)])
def test_ga_two_stage_detectors_overfit_one_image(kind, steps, tmp_path):
    """GA-Fast R-CNN (on given proposals) and GA-Faster R-CNN (end to end) learn their own image."""
    torch.manual_seed(0)
    image, target = scene()
    model = build_detector(config(kind, True), NUM_CLASSES)
    extra = {"proposals": [proposals_around(target["boxes"])]} if kind == "fast_rcnn" else {}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for _ in range(steps):
        loss = sum(model([image], [target], **extra).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        out = model([image], **extra)[0]
    metrics = evaluate_detections(coco_of(1, target, 96, 128, tmp_path / "gt.json"),
                                  {1: (out["boxes"].numpy(), out["scores"].numpy(), out["labels"].numpy())})
    assert metrics["AP50"] > 0.5, metrics


def test_backbone_from_a_trained_proposer():
    proposer = build_proposer(ProposerConfig(kind="rpn", **PROPOSER))
    state = {k: v + 1.0 if v.is_floating_point() else v for k, v in proposer.state_dict().items()}
    rcnn = build_detector(config("faster_rcnn", True), NUM_CLASSES)
    cfg = config("retinanet", False)
    retina = build_detector(cfg, NUM_CLASSES)
    assert backbone_parts(cfg) == ("body",)  # RetinaNet's P3-P7 FPN differs; its body is the same
    n_rcnn = load_backbone(rcnn, state, backbone_parts(config("faster_rcnn", True)), "train/rpn")
    n_retina = load_backbone(retina, state, ("body",), "train/rpn")
    assert n_rcnn > n_retina > 0
    for model in (rcnn, retina):
        own = model.state_dict()
        assert all(torch.equal(own[k], state[k]) for k in own if k.startswith("backbone.body."))
    assert torch.equal(rcnn.state_dict()["backbone.fpn.layer_blocks.0.0.weight"], state["backbone.fpn.layer_blocks.0.0.weight"])
    with pytest.raises(ValueError, match="train/x: cannot initialise the backbone"):
        load_backbone(rcnn, {k: v for k, v in state.items() if "body" not in k}, ("body",), "train/x")


def test_cached_proposals_by_image_id_flipped_with_the_image(tmp_path):
    boxes = np.array([[10, 20, 30, 60], [0, 0, 5, 5]], np.float32)
    cache = ProposalCache(tmp_path / "node" / "cache" / "train")
    cache.write_shard("shard-0000", [(7, boxes, np.array([0.9, 0.1], np.float32), np.zeros(2, np.int8))])
    node = local_input("proposals/ga_rpn", tmp_path / "node", {"outputs": {"caches": {"train": "cache/train"}}})
    source = CachedProposals(node, "train")
    image = torch.zeros(3, 80, 100)
    plain, flipped = source.batch([image, image], [{"image_id": torch.tensor(7)},
                                                   {"image_id": torch.tensor(7), "hflipped": torch.tensor(True)}])
    assert torch.equal(plain["boxes"], torch.from_numpy(boxes)) and torch.equal(plain["scores"], torch.tensor([0.9, 0.1]))
    assert torch.equal(flipped["boxes"], torch.tensor([[70.0, 20.0, 90.0, 60.0], [95.0, 0.0, 100.0, 5.0]]))  # x -> 100 - x
    with pytest.raises(ValueError, match=r"image id 8 has no cached proposals in proposals/ga_rpn \(train split\)"):
        source.batch([image], [{"image_id": torch.tensor(8)}])
    with pytest.raises(ValueError, match="proposals/ga_rpn has no proposals for the val split"):
        CachedProposals(node, "val")


def test_retinanet_heads_with_and_without_group_norm():
    for guided in (False, True):
        plain = build_detector(dataclasses.replace(config("retinanet", guided), retina_group_norm=False), NUM_CLASSES)
        normed = build_detector(config("retinanet", guided), NUM_CLASSES)
        assert not any(isinstance(m, torch.nn.GroupNorm) for m in plain.head.modules())
        assert sum(isinstance(m, torch.nn.GroupNorm) for m in normed.head.modules()) == 8  # 4 convs x 2 towers


def test_retinanet_tower_depth_in_both_heads():
    """``retina_num_convs`` sets each tower's 3x3 convs in the dense and the guided head alike, each
    conv N(0, 0.01) with zero bias (torchvision's init); a tower of 4 has torchvision's keys."""
    from torchvision.models.detection.retinanet import RetinaNetHead

    from ga_models.retinanet import conv_tower

    for guided in (False, True):
        for depth in (1, 2, 6):
            model = build_detector(dataclasses.replace(config("retinanet", guided), retina_num_convs=depth, retina_group_norm=False),
                                   NUM_CLASSES)
            towers = ((model.head.cls_convs, model.head.reg_convs) if guided
                      else (model.head.classification_head.conv, model.head.regression_head.conv))
            for tower in towers:
                convs = [m for m in tower.modules() if isinstance(m, torch.nn.Conv2d)]
                assert len(convs) == depth and all(c.kernel_size == (3, 3) for c in convs)
                assert all(float(c.bias.abs().max()) == 0 for c in convs)
                assert all(0.007 < float(c.weight.std()) < 0.013 for c in convs)  # 16 x 16 x 9 draws of N(0, 0.01)
            model.eval()(torch.rand(2, 3, 96, 128).unbind(0))  # both heads run at any depth
    torchvision_tower = RetinaNetHead(16, 9, NUM_CLASSES).classification_head.conv
    conv_tower(16, 4).load_state_dict(torchvision_tower.state_dict())  # strict: the same keys and shapes


def test_ga_retinanet_anchor_coder_std_is_its_own():
    """GA-RetinaNet decodes anchor shapes with ``retina_shape_delta_std`` (the reference's 1.0),
    GA-RPN (and GA-Faster R-CNN's RPN) with the proposer's ``shape_delta_std`` (0.14)."""
    retina = build_detector(config("retinanet", True), NUM_CLASSES)
    assert retina.guidance.shape_delta_std == 1.0
    retina = build_detector(dataclasses.replace(config("retinanet", True), retina_shape_delta_std=0.5), NUM_CLASSES)
    assert retina.guidance.shape_delta_std == 0.5
    faster = build_detector(dataclasses.replace(config("faster_rcnn", True), retina_shape_delta_std=0.5), NUM_CLASSES)
    assert faster.rpn.guidance.shape_delta_std == ProposerConfig.shape_delta_std == 0.14


def test_detector_section_passes_retina_settings_to_the_retinanets_only():
    """The ``detector`` section's RetinaNet settings reach the models that read them and leave the
    others' configs (so their cache keys) at the defaults."""
    from stages.common.detection import DetectorsConfig

    section = DetectorsConfig(retina_num_convs=2, retina_shape_delta_std=0.5, retina_group_norm=True)
    proposer = ProposerConfig(**PROPOSER)
    ga = section.spec("ga_retinanet", proposer)
    dense = section.spec("retinanet", proposer)
    faster = section.spec("ga_faster_rcnn", proposer)
    assert (ga.retina_num_convs, ga.retina_shape_delta_std) == (2, 0.5)
    assert (dense.retina_num_convs, dense.retina_shape_delta_std) == (2, DetectorConfig.retina_shape_delta_std)
    assert (faster.retina_num_convs, faster.retina_shape_delta_std, faster.retina_group_norm) == (4, 1.0, False)


def test_config_checks():
    with pytest.raises(ValueError, match="does not match guided"):
        DetectorConfig("faster_rcnn", True, ProposerConfig(kind="rpn"), RCNNSettings())
    with pytest.raises(ValueError, match="two-stage detectors only"):
        DetectorConfig("retinanet", False, ProposerConfig(kind="rpn"), RCNNSettings())
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        build_detector(config("retinanet", True), 1)
    with pytest.raises(ValueError, match="retina_num_convs must be an integer >= 1"):
        dataclasses.replace(config("retinanet", True), retina_num_convs=0)
    with pytest.raises(ValueError, match=r"retina_shape_delta_std must be in \(0, 10\]"):
        dataclasses.replace(config("retinanet", True), retina_shape_delta_std=0.0)


def test_evaluation_drops_labels_that_are_no_category_id():
    """A sigmoid RetinaNet's background slot 0, or a gap in COCO's ids, can come out as a label."""
    from stages.eval_detector import only_categories

    image_id, boxes, scores, labels = only_categories(
        (7, np.arange(12, dtype=np.float32).reshape(3, 4), np.array([0.9, 0.5, 0.1]), np.array([0, 2, 5])), {1: "a", 2: "b"})
    assert image_id == 7 and labels.tolist() == [2] and scores.tolist() == [0.5] and boxes.tolist() == [[4, 5, 6, 7]]


@pytest.mark.parametrize("kind", ["fast_rcnn", "faster_rcnn"])
def test_rcnn_pools_with_the_gather_roi_align_as_torchvisions_would(kind):
    """The R-CNNs pool their RoIs with ``GatherRoIAlign``; swapping in torchvision's
    MultiScaleRoIAlign gives the same losses and gradients (the sampler draws the same RoIs)."""
    from torchvision.ops import MultiScaleRoIAlign

    from ga_models.roi_align import GatherRoIAlign

    (a, ta), (b, tb) = scene(), scene(80, 100)
    extra = {"proposals": [proposals_around(ta["boxes"]), proposals_around(tb["boxes"])]} if kind == "fast_rcnn" else {}
    runs = []
    for pooler in ("gather", "torchvision"):
        torch.manual_seed(0)
        model = build_detector(config(kind, False), NUM_CLASSES).double()
        assert isinstance(model.roi_heads.box_roi_pool, GatherRoIAlign)
        if pooler == "torchvision":
            model.roi_heads.box_roi_pool = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
        torch.manual_seed(1)  # the same RoI samples
        extra_d = {"proposals": [{k: v.double() for k, v in p.items()} for p in extra["proposals"]]} if extra else {}
        losses = model([a.double(), b.double()], [ta, tb], **extra_d)
        sum(losses.values()).backward()
        runs.append(({k: float(v.detach()) for k, v in losses.items()}, model.roi_heads.box_head.fc6.weight.grad.clone()))
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-9)
    torch.testing.assert_close(runs[0][1], runs[1][1], rtol=1e-8, atol=1e-10)
